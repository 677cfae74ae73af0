"""Size, latency and accuracy of each TFLite quantisation of a trained run (run by hand).

For RUN: `mkd export` (into OUT/saved_models/bench), then `mkd tflite` with each of none, float16,
dynamic, int8 (the parity threshold is switched off: this reports, it does not gate). For the
SavedModel and every .tflite it measures:

- file size (the SavedModel: saved_model.pb + variables/);
- latency per slice: batch 1, median over ``--runs`` invocations after 5 warm-up runs, on one
  target test slice; TFLite with ai-edge-litert's default XNNPACK delegate and ``--threads`` threads,
  the SavedModel's serving_default through ``tf.function`` (for reference);
- Dice against the ground truth on the cache's labelled target TEST slices, in cache space
  (intersections and sums pooled over the split, as `mkd train`'s validation Dice), mean over the
  foreground structures;
- Dice agreement with the SavedModel's labels and the max probability difference (the parity check).

    .venv/bin/python benchmarks/tflite_quantization.py RUN [--out DIR] [--which ensemble] [--runs 200]

Prints a Markdown table. Not collected by pytest (no ``test_`` prefix).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mkd_tf.data.cache import SliceCache  # noqa: E402
from mkd_tf.export import tflite  # noqa: E402
from mkd_tf.export.serving import export_run, read_model_asset  # noqa: E402


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and "assets.extra" not in f.parts)


def dice_against_truth(predicted, truth, num_classes):
    """Mean over foreground classes of the pooled Dice (a class absent from both scores 1)."""
    scores = []
    for c in range(1, num_classes):
        p, g = predicted == c, truth == c
        total = int(p.sum()) + int(g.sum())
        scores.append(2.0 * int((p & g).sum()) / total if total else 1.0)
    return float(np.mean(scores))


def median_latency(call, runs, warmup=5):
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder written by `mkd train`")
    parser.add_argument("--out", default=None, help="working folder [default: a temporary one]")
    parser.add_argument("--which", default="ensemble", help="predictor to export")
    parser.add_argument("--cache", default=None, help="slice cache [default: the run's]")
    parser.add_argument("--runs", type=int, default=200, help="timed invocations per model")
    parser.add_argument("--threads", type=int, default=1, help="TFLite interpreter threads")
    args = parser.parse_args()

    import tensorflow as tf

    work = Path(args.out or tempfile.mkdtemp(prefix="tflite-bench-"))
    exported = export_run(args.run, work / "saved_models" / "bench", which=args.which)
    saved_model = Path(exported["path"])
    asset = read_model_asset(saved_model)
    cache = SliceCache(args.cache or asset["cache"], verify=False)
    rows = cache.indices("target", "test", labelled=True)
    images = np.asarray(cache.images("target")[rows])
    truth = np.asarray(cache.labels("target")[rows])
    classes = len(asset["classes"])
    probe = images[len(images) // 2][None, ..., None]

    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    reference_labels, _ = tflite.run_saved_model(signature, images)
    probe_tensor = tf.constant(probe)
    results = [
        {
            "model": f"SavedModel ({asset['predictor']})",
            "bytes": folder_bytes(saved_model),
            "latency": median_latency(lambda: signature(image=probe_tensor)["labels"].numpy(), args.runs),
            "dice": dice_against_truth(reference_labels, truth, classes),
            "agreement": 1.0,
            "difference": 0.0,
        }
    ]
    for mode in tflite.QUANTIZATIONS:
        out = work / f"bench_{mode}.tflite"
        parity = tflite.convert_to_tflite(
            saved_model, out, mode, cache=args.cache, min_agreement=0.0, parity_slices=None
        )
        labels, _ = tflite.run_tflite(out, images)
        runner = tflite.interpreter(out, num_threads=args.threads).get_signature_runner("serving_default")
        runner(image=probe)  # resize to batch 1 once, outside the timing
        results.append(
            {
                "model": f"TFLite {mode}",
                "bytes": parity["bytes"],
                "latency": median_latency(lambda: runner(image=probe), args.runs),
                "dice": dice_against_truth(labels, truth, classes),
                "agreement": parity["agreement"],
                "difference": parity["max_probability_difference"],
            }
        )

    print(
        f"run {args.run} ({asset['method']}, predictor {asset['predictor']}), slices {asset['size']}x{asset['size']}, "
        f"{len(images)} labelled test slices; latency: batch 1, median of {args.runs}, TFLite {args.threads} thread(s)"
    )
    print("| model | size (KiB) | latency (ms/slice) | Dice vs truth | Dice agreement | max abs dprob |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['model']} | {row['bytes'] / 1024:.1f} | {row['latency']:.2f} | {row['dice']:.3f} | "
            f"{row['agreement']:.4f} | {row['difference']:.2e} |"
        )
    print(f"files in {work}")


if __name__ == "__main__":
    main()
