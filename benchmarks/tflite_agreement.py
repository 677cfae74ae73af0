"""How far each TFLite quantisation's labels agree with the SavedModel's, over several trained models
(run by hand). The default ``--min-agreement`` of each mode (``mkd_tf/export/tflite.py``) is set from
this distribution, not from one model.

It builds the test suite's export fixture (a 48 x 48 x 16 phantom, 32 x 32 slices at 3.2 mm, a
target-only U-Net with 8 base filters trained 300 steps) once per seed, exports it and converts it in
every mode with the threshold off, and prints per mode the Dice agreement on the 16 test slices:
each model's value, min, mean and max.

    .venv/bin/python benchmarks/tflite_agreement.py --seeds 8 [--out DIR]
    .venv/bin/python benchmarks/tflite_agreement.py --runs bench/compare/*/seed* [--out DIR]

With ``--runs`` it converts those trained runs instead (e.g. the phantom comparison's 48 x 48 runs,
parity on their cache's test slices).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mkd_tf.data.phantom import write_phantom  # noqa: E402
from mkd_tf.data.prepare import PrepareOptions, prepare_cache  # noqa: E402
from mkd_tf.data.preprocess import PreprocessConfig  # noqa: E402
from mkd_tf.export import tflite  # noqa: E402
from mkd_tf.export.serving import export_run  # noqa: E402
from mkd_tf.training import train  # noqa: E402

# The same run as tests/export/conftest.py's ``confident_run`` (but for the seed).
CONFIDENT = {
    "method": "target-only",
    "schedule": {"epochs": 6, "steps_per_epoch": 50},
    "data": {"batch_size": 8, "augment": False},
    "optimizer": {"segmentor_lr": 1e-2},
    "segmentor": {"base_filters": 8, "depth": 2},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--runs", nargs="*", default=None, help="trained run folders to convert instead")
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()
    out = Path(args.out or tempfile.mkdtemp(prefix="tflite-agreement-"))
    phantom = out / "phantom"
    if not args.runs and not phantom.exists():
        write_phantom(phantom, n_ct=5, n_mr=2, shape=(48, 48, 16))
    cache = out / "cache"
    if not args.runs and not cache.exists():
        prepare_cache(
            phantom / "ct_train",
            phantom / "mr_train",
            cache,
            PrepareOptions(preprocess=PreprocessConfig(spacing=(3.2, 3.2, 7.5), size=32), allow_crop=True),
        )
    agreements = {mode: [] for mode in tflite.QUANTIZATIONS}
    runs = [Path(run) for run in args.runs] if args.runs else range(args.seeds)
    for index, run in enumerate(runs):
        if isinstance(run, int):
            run = out / f"run{index}"
            train(cache, run, overrides={**CONFIDENT, "seed": index}, verbose=0)
        exported = export_run(run, out / "saved_models" / f"model{index}")
        for mode in tflite.QUANTIZATIONS:
            result = tflite.convert_to_tflite(
                exported["path"], out / f"model{index}_{mode}.tflite", mode, min_agreement=0.0
            )
            agreements[mode].append(result["agreement"])
            print(f"model {index} ({run}) {mode}: {result['agreement']:.4f}", flush=True)
    print("\n| mode | models | min | mean | max | per model |\n| --- | ---: | ---: | ---: | ---: | --- |")
    for mode, values in agreements.items():
        values = np.array(values)
        print(
            f"| {mode} | {values.size} | {values.min():.4f} | {values.mean():.4f} | {values.max():.4f} | "
            + ", ".join(f"{v:.4f}" for v in values)
            + " |"
        )


if __name__ == "__main__":
    main()
