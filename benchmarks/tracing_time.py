"""Seconds to train a tiny MKD run (2 epochs of 2 steps), by how its two compiled steps are built (run by hand).

    .venv/bin/python benchmarks/tracing_time.py [--repeats 2] [--out benchmarks/results/tracing_time]

A tiny run is almost all fixed cost: tracing the warm-start and the distillation step (Python building the
graphs) and their first calls (Grappler rewriting the graphs, kernels made). Every test that trains MKD in
process pays it, and so does every `mkd train` once. Each case runs in its own process, the cases
interleaved ``--repeats`` times (a slow minute of the machine then hits every case alike):

- ``mkd``: as `mkd train` builds the steps (``tf.function(..., autograph=False)``, Grappler on);
- ``autograph``: with AutoGraph converting the steps (``tf.function``'s default, which `mkd` used before);
- ``no grappler``: Grappler's rewrites off (``disable_meta_optimizer``), as the in-process tests run;
- ``autograph, no grappler``.

The record (``.md`` + ``.json``) opens with the standard header: date, commit, command, config, machine.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "mkd": {"autograph": False, "grappler": True},
    "autograph": {"autograph": True, "grappler": True},
    "no grappler": {"autograph": False, "grappler": False},
    "autograph, no grappler": {"autograph": True, "grappler": False},
}

TINY = {
    "method": "mkd",
    "seed": 0,
    "data": {"batch_size": 2},
    "segmentor": {"base_filters": 4, "depth": 2},
    "alignment": {"base_filters": 4, "num_blocks": 1, "disc_filters": 4, "disc_layers": 1},
    "schedule": {"epochs": 2, "steps_per_epoch": 2},
}

CHILD = r"""
import json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
tf.config.experimental.enable_op_determinism()
case = json.loads(sys.argv[1])
if not case["grappler"]:
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
from mkd_tf import training
if case["autograph"]:
    function = tf.function
    def with_autograph(*args, **kwargs):
        kwargs["autograph"] = True
        return function(*args, **kwargs)
    class TensorFlow:  # training's `tf`, with tf.function converting again
        function = staticmethod(with_autograph)
        def __getattr__(self, name):
            return getattr(tf, name)
    training.tf = TensorFlow()
start = time.perf_counter()
training.train(sys.argv[2], sys.argv[3], overrides=json.loads(sys.argv[4]), verbose=0)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def header(command):
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "command": command,
        "config": "tiny MKD: " + json.dumps(TINY),
        "machine": f"{os.cpu_count()} cores; load average {load} at the start",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args()
    command = "python benchmarks/tracing_time.py " + " ".join(sys.argv[1:])
    record = {"header": header(command), "seconds": {name: [] for name in CASES}}
    with tempfile.TemporaryDirectory() as folder:
        from mkd_tf.data.phantom import write_phantom
        from mkd_tf.data.prepare import PrepareOptions, prepare_cache
        from mkd_tf.data.preprocess import PreprocessConfig

        phantom = write_phantom(Path(folder) / "phantom", n_ct=3, n_mr=2, shape=(32, 32, 16), seed=0)
        cache = Path(folder) / "cache"
        options = PrepareOptions(seed=0, preprocess=PreprocessConfig(spacing=(6.4, 6.4, 10.0), size=32))
        prepare_cache(phantom / "ct_train", phantom / "mr_train", cache, options)
        for repeat in range(args.repeats):
            for name, case in CASES.items():
                run = Path(folder) / f"run-{repeat}-{name.replace(' ', '_').replace(',', '')}"
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(case), str(cache), str(run), json.dumps(TINY)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
                record["seconds"][name].append(seconds)
                print(f"{name}: {seconds:.1f} s", flush=True)
    base = statistics.mean(record["seconds"]["autograph"])
    lines = [
        "<!-- record header -->",
        *(f"- {key}: {value}" for key, value in record["header"].items()),
        "",
        "# Seconds to train a tiny MKD run (2 epochs x 2 steps), by how the compiled steps are built",
        "",
        "| case | seconds per run | mean | vs. autograph (before) |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, values in record["seconds"].items():
        mean = statistics.mean(values)
        runs = ", ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {name} | {runs} | {mean:.1f} | {100 * (mean / base - 1):+.0f} % |")
    print("\n".join(lines[7:]))
    if args.out:
        Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
        Path(f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
