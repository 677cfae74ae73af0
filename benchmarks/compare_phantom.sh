#!/usr/bin/env bash
# The method comparison on the phantom with ONE labelled target (CT) volume (run by hand; not a test).
#   bash benchmarks/compare_phantom.sh [OUT] [SEEDS] [STEPS_PER_EPOCH] [EPOCHS] [TARGET_LABELED]
# Every method shares the cache (split), augmentation, network sizes (benchmarks/compare_phantom.yaml)
# and the step budget. Results: OUT/compare/comparison.md (+ .json, box plot .png, curves.png).
#
# METHOD_GROUPS (env): method groups trained in parallel, one `mkd compare` process per group (2 processes
# use 2 CPU cores better than one at 48x48); a last `mkd compare` over all methods then only
# evaluates the finished runs and writes the table. Default: everything, in one group.
# TUNE (env): passed on as `mkd compare --tune "$TUNE"`, e.g. TUNE=optimizer.segmentor_lr=5e-4,1e-3,2e-3,4e-3:
# every method at every value, each reported at its best value on validation Dice.
# ANATOMY (env): cardiac (default: MM-WHS layout, 7 structures, 3.2 mm) or abdomen (nnU-Net v2 layout, liver,
# kidneys, spleen, 4.5 mm: 48 x 4.5 mm holds every organ); benchmarks/compare_abdomen.sh sets it.
set -euo pipefail
anatomy=${ANATOMY:-cardiac}
case $anatomy in
  cardiac) default_out=bench-compare; phantom_args=(); target=ct_train; assistant=mr_train; spacing=3.2 ;;
  abdomen) default_out=bench-compare-abdomen; phantom_args=(--anatomy abdomen)
           target=Dataset501_AbdomenCT; assistant=Dataset502_AbdomenMR; spacing=4.5 ;;
  *) echo "error: ANATOMY: expected cardiac or abdomen, got '$anatomy'" >&2; exit 2 ;;
esac
out=${1:-$default_out}
seeds=${2:-3}
steps=${3:-100}
epochs=${4:-10}
labelled=${5:-1}
all="assistant-only,target-only,joint,finetune,finetune-switch-0.5,ummkd,mkd,mkd-no-iam,mkd-no-kd-s2r,mkd-no-kd-r2s,mkd-no-pretrain,mkd-no-domain-norm,mkd-syn-domain-norm,mkd-cyclegan-iam,mkd-no-syn-on-target"
groups=${METHOD_GROUPS:-$all}
here=$(cd "$(dirname "$0")" && pwd)
mkd=${MKD:-$here/../.venv/bin/mkd}
[ -d "$out/phantom" ] || "$mkd" phantom "$out/phantom" ${phantom_args[@]+"${phantom_args[@]}"} --ct 8 --mr 8 --seed 1
[ -d "$out/cache" ] || "$mkd" prepare --target "$out/phantom/$target" --assistant "$out/phantom/$assistant" \
    --out "$out/cache" --size 48 --spacing "$spacing" --split 0.5,0.125,0.375 --target-labelled 1 --seed 0 > /dev/null
"$mkd" info "$out/cache"
run() {
  "$mkd" compare "$out/cache" --out "$out/compare" --seeds "$seeds" --methods "$1" --target-labelled "$labelled" \
      --config "$here/compare_phantom.yaml" --epochs "$epochs" --steps-per-epoch "$steps" --quiet \
      ${TUNE:+--tune "$TUNE"}
}
pids=()
for group in $groups; do run "$group" > "$out/compare-$group.log" 2>&1 & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
methods=$(echo $groups | tr ' ' ',')
time run "$methods"
