"""Throughput of the tf.data slice pipeline, with and without augmentation (run by hand).

Builds a synthetic slice cache in a temporary folder (random intensities, blocky labels), then times
``slice_dataset`` batches after a warm-up and prints one line per setting::

    .venv/bin/python benchmarks/pipeline_throughput.py [--slices 2000] [--size 256] [--batches 400]

Not collected by pytest (no ``test_`` prefix).
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mkd_tf.data.cache import CacheWriter, SliceCache  # noqa: E402
from mkd_tf.data.pipeline import slice_dataset  # noqa: E402
from tests.conftest import cache_entry, cache_manifest  # noqa: E402  (a manifest as prepare writes it)

VOLUME_SLICES = 100


def build_cache(path, slices, size, seed=0):
    """A cache of ``slices`` target slices in volumes of 100, all train, every other volume labelled."""
    rng = np.random.default_rng(seed)
    with CacheWriter(path, size=size) as writer:
        for volume, start in enumerate(range(0, slices, VOLUME_SLICES)):
            count = min(VOLUME_SLICES, slices - start)
            images = rng.normal(size=(count, size, size)).astype(np.float32)
            labels = rng.integers(0, 8, size=(count, size // 16, size // 16), dtype=np.uint8)
            labels = labels.repeat(16, axis=1).repeat(16, axis=2)
            writer.add_volume(
                "target", images, labels, "train", volume % 2 == 0, cache_entry(f"synthetic{volume}", size)
            )
        writer.finish(cache_manifest(size, [f"class{i}" for i in range(8)]))
    return SliceCache(path, verify=False)


def measure(cache, batch_size, batches, warmup, augment):
    iterator = iter(slice_dataset(cache, "target", "train", batch_size, augment=augment, seed=0))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    batch["image"].numpy()
    elapsed = time.perf_counter() - start
    return batches * batch_size / elapsed, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cache = build_cache(Path(folder) / "cache", args.slices, args.size)
        print(
            f"cache: {args.slices} slices of {args.size}x{args.size} "
            f"({(args.slices * args.size * args.size * 5) / 2**20:.0f} MiB), batch {args.batch_size}, "
            f"{args.batches} timed batches after {args.warmup} warm-up, {os.cpu_count()} CPUs"
        )
        for augment in (False, True):
            rate, elapsed = measure(cache, args.batch_size, args.batches, args.warmup, augment)
            print(f"augment={'on ' if augment else 'off'}  {rate:8.0f} slices/s  ({elapsed:.2f} s)")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {peak:.0f} MiB (includes TensorFlow itself)")


if __name__ == "__main__":
    main()
