"""Training steps/s of every method (run by hand; not a test).

Builds a phantom slice cache at each requested size, trains each method for two short epochs with
`mkd_tf.training.train` (the first epoch includes tf.function tracing) and reports the second
epoch's steps/s as recorded in the run's history.json.

    .venv/bin/python benchmarks/training_speed.py --sizes 256,64 --batch-size 8 --steps 10
"""

import argparse
import json
import tempfile
from pathlib import Path

from mkd_tf.config import METHODS
from mkd_tf.data.phantom import write_phantom
from mkd_tf.data.prepare import PrepareOptions, prepare_cache
from mkd_tf.data.preprocess import PreprocessConfig
from mkd_tf.training import train

FIELD_OF_VIEW_MM = 153.6  # the phantom's in-plane field of view


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,64", help="slice sizes to measure")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (second epoch)")
    parser.add_argument("--config", default=None, help="YAML config (default: the full-size defaults)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mkd-speed-"))
    write_phantom(work / "phantom", n_ct=4, n_mr=4, seed=0)
    print(f"| size | method | steps/s | slices/s (per stream) |\n| --- | --- | --- | --- |")
    for size in (int(s) for s in args.sizes.split(",")):
        cache = work / f"cache{size}"
        spacing = FIELD_OF_VIEW_MM / size
        prepare_cache(
            work / "phantom" / "ct_train",
            work / "phantom" / "mr_train",
            cache,
            PrepareOptions(
                target_labelled=1, preprocess=PreprocessConfig(spacing=(spacing, spacing, max(spacing, 2.5)), size=size)
            ),
        )
        for method in args.methods.split(","):
            run = work / f"run-{size}-{method}"
            overrides = {
                "method": method,
                "data": {"batch_size": args.batch_size},
                "schedule": {"epochs": 2, "steps_per_epoch": args.steps},
            }
            train(cache, run, args.config, overrides, verbose=0)
            epoch = json.loads((run / "history.json").read_text())["epochs"][-1]
            speed = epoch["steps_per_second"]
            print(f"| {size}x{size} | {method} | {speed:.3f} | {speed * args.batch_size:.1f} |", flush=True)


if __name__ == "__main__":
    main()
