"""The demo's training (`mkd demo`, 600 steps) over several seeds and settings (run by hand; not a test).

    .venv/bin/python benchmarks/demo_seeds.py OUT [--seeds 0,1,2] [--variants demo,300-steps,...]

Trains and evaluates (on the demo's one CT test volume) each variant below for each seed into
``OUT/VARIANT/seedN`` (a finished run is only re-evaluated), on the demo's phantom and cache in
``OUT/data``, and prints mean Dice of S_syn, S_real and the ensemble. `mkd demo` itself always trains
seed 0; at 300 steps a run is on the steep part of its learning curve and one seed says little. Pair the
variants per seed with ``benchmarks/paired_runs.py OUT/demo OUT/VARIANT``.
"""

import argparse
from pathlib import Path

from paired_runs import mean_dice  # benchmarks/ is on sys.path when this script runs

from mkd_tf.demo import demo_cache, demo_settings
from mkd_tf.evaluation import evaluate_run
from mkd_tf.training import train

# Changes to the demo's settings (mkd_tf/demo.py, DEMO_TRAINING) that were measured against them.
CYCLEGAN_IAM = {"alignment": {"skip_kernel": 1}, "loss": {"cycle": 10.0, "structure": 0.0}}
VARIANTS = {
    "demo": {},
    "300-steps": {"schedule": {"epochs": 4}},
    # the 600-step re-tune of the two settings chosen at 300 steps: only 0.1 and 0.9 run, seed 0 (README, Demo)
    "warm-start-0.1": {"schedule": {"mkd_pretrain": 0.1}},
    "warm-start-0.4": {"schedule": {"mkd_pretrain": 0.4}},
    "ema-0.9": {"optimizer": {"ema_momentum": 0.9}},
    "ema-0.98": {"optimizer": {"ema_momentum": 0.98}},
    "cyclegan-iam": CYCLEGAN_IAM,
    "cyclegan-iam-one-set-per-segmentor": {**CYCLEGAN_IAM, "segmentor": {"domain_norm": False}},
    "cyclegan-iam-450-steps": {**CYCLEGAN_IAM, "schedule": {"epochs": 6}},
    "cyclegan-iam-300-steps": {**CYCLEGAN_IAM, "schedule": {"epochs": 4}},
    # the demo until 2026-11-29
    "cyclegan-iam-300-steps-one-set-per-segmentor": {
        **CYCLEGAN_IAM,
        "schedule": {"epochs": 4},
        "segmentor": {"domain_norm": False},
    },
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    _, cache = demo_cache(args.out / "data")
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            run = args.out / variant / f"seed{seed}"
            train(cache, run, None, demo_settings(changes={**VARIANTS[variant], "seed": seed}), verbose=0)
            evaluate_run(run, "test")  # writes run/metrics.json
            dice = mean_dice(run)
            print(f"{variant} seed {seed}: " + ", ".join(f"{p} {d:.1f}" for p, d in sorted(dice.items())), flush=True)


if __name__ == "__main__":
    main()
