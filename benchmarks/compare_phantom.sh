#!/usr/bin/env bash
# The method comparison on the phantom with ONE labelled target (CT) volume (run by hand; not a test).
#   bash benchmarks/compare_phantom.sh [OUT] [SEEDS] [STEPS_PER_EPOCH] [EPOCHS]
# Every method shares the cache (split), augmentation, network sizes (benchmarks/compare_phantom.yaml)
# and the step budget. Results: OUT/compare/comparison.md (+ .json, .png).
set -euo pipefail
out=${1:-bench-compare}
seeds=${2:-3}
steps=${3:-100}
epochs=${4:-10}
here=$(cd "$(dirname "$0")" && pwd)
mkd=${MKD:-$here/../.venv/bin/mkd}
[ -d "$out/phantom" ] || "$mkd" phantom "$out/phantom" --ct 8 --mr 8 --seed 1
[ -d "$out/cache" ] || "$mkd" prepare --target "$out/phantom/ct_train" --assistant "$out/phantom/mr_train" \
    --out "$out/cache" --size 48 --spacing 3.2 --split 0.5,0.125,0.375 --target-labeled 1 --seed 0 > /dev/null
"$mkd" info "$out/cache"
time "$mkd" compare "$out/cache" --out "$out/compare" --seeds "$seeds" \
    --methods assistant-only,target-only,joint,finetune,ummkd,mkd,mkd-no-iam,mkd-no-kd-s2r,mkd-no-kd-r2s \
    --config "$here/compare_phantom.yaml" --epochs "$epochs" --steps-per-epoch "$steps" --quiet
