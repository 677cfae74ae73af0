"""Is training bit-reproducible on this machine? (run by hand; not a test)

    .venv/bin/python benchmarks/determinism.py OUT [--processes 2] [--runs 2] [--method mkd] [--eager]
        [--onednn on|off] [--threads INTRA,INTER] [--grappler OPTION=on|off ...]

Writes the tests' tiny phantom and slice cache (``tests/scripts/tiny_runs.py``: 3 CT + 2 MRI volumes,
32 x 32 slices) into OUT, then starts PROCESSES processes at once, each training RUNS tiny runs of METHOD
one after the other with the same seed: the tests' tiny networks, 2 epochs x 4 steps (MKD's warm start
covers epoch 1, mutual distillation most of epoch 2), with ``tf.config.experimental.enable_op_determinism()``
as ``tests/conftest.py`` sets it, the train step compiled unless ``--eager``. ``--onednn off`` starts the
processes with ``TF_ENABLE_ONEDNN_OPTS=0`` (TensorFlow reads it once, at import); ``--threads 1,1`` gives each
process one intra-op and one inter-op thread (default: TensorFlow's, one per core); ``--grappler
remapping=off`` turns off one of Grappler's graph optimisations (``tf.config.optimizer.set_experimental_options``).

Each invocation trains into a new folder ``OUT/trialN``. Prints every run's losses and validation Dice that
differ from the first run's, and a last line: how many runs equal the first exactly. Not every run differs,
so use several processes and runs.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.scripts import tiny_runs

SCHEDULE = {"epochs": 2, "steps_per_epoch": 4}


def train_runs(out, trial, process, runs, method, eager, threads, grappler):
    """One process's share: RUNS trainings in ``trial``; each run's per-epoch losses and validation Dice to
    JSON."""
    import tensorflow as tf

    from mkd_tf.training import train

    tf.config.experimental.enable_op_determinism()
    tf.config.run_functions_eagerly(eager)
    tf.config.optimizer.set_experimental_options(grappler)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads[0])
        tf.config.threading.set_inter_op_parallelism_threads(threads[1])
    for run in range(runs):
        folder = trial / f"process{process}-run{run}"
        started = time.time()
        train(out / "cache", folder, overrides=tiny_runs.tiny_overrides(method=method, schedule=SCHEDULE), verbose=0)
        history = json.loads((folder / "history.json").read_text())
        record = [{"losses": e["losses"], "val_dice": e["val_dice"]} for e in history["epochs"]]
        (trial / f"process{process}-run{run}.json").write_text(json.dumps(record))
        print(f"process {process} run {run}: {time.time() - started:.0f} s", flush=True)


def differences(first, other):
    """``[(epoch, name, first value, other value)]`` for every logged value that is not bit-identical (a value
    only one run logged, or an epoch only one run has, counts, with None for the missing side)."""
    found = []
    for epoch in range(1, max(len(first), len(other)) + 1):
        a = first[epoch - 1] if epoch <= len(first) else {}
        b = other[epoch - 1] if epoch <= len(other) else {}
        for group in ("losses", "val_dice"):
            values_a, values_b = a.get(group, {}), b.get(group, {})
            for name in dict.fromkeys([*values_a, *values_b]):
                if values_a.get(name) != values_b.get(name):
                    found.append((epoch, name, values_a.get(name), values_b.get(name)))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--method", default="mkd")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--onednn", choices=("on", "off"), default="on")
    parser.add_argument("--threads", type=lambda text: [int(n) for n in text.split(",")], metavar="INTRA,INTER")
    parser.add_argument("--grappler", action="append", default=[], metavar="OPTION=on|off")
    # internal: a child process's trial folder and number
    parser.add_argument("--child", nargs=2, metavar=("TRIAL", "NUMBER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    grappler = {option: value == "on" for option, value in (setting.split("=") for setting in args.grappler)}
    out = args.out.resolve()
    if args.child is not None:
        train_runs(
            out, Path(args.child[0]), int(args.child[1]), args.runs, args.method, args.eager, args.threads, grappler
        )
        return
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "cache").exists():
        tiny_runs.write_tiny_cache(out)
    # a new folder per invocation: a finished run folder would be resumed (trains nothing), not retrained
    trial = next(out / f"trial{n}" for n in range(1, 10_000) if not (out / f"trial{n}").exists())
    trial.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="1" if args.onednn == "on" else "0")
    forwarded = [str(out), "--runs", str(args.runs), "--method", args.method] + (["--eager"] if args.eager else [])
    forwarded += ["--threads", ",".join(map(str, args.threads))] if args.threads else []
    forwarded += [f"--grappler={setting}" for setting in args.grappler]
    children = [
        subprocess.Popen([sys.executable, __file__, *forwarded, "--child", str(trial), str(n)], env=env)
        for n in range(args.processes)
    ]
    if any(child.wait() for child in children):
        sys.exit("a training process failed (its output is above)")
    names = [f"process{p}-run{r}" for p in range(args.processes) for r in range(args.runs)]
    records = {name: json.loads((trial / f"{name}.json").read_text()) for name in names}
    first = records[names[0]]
    identical = 0
    for name in names[1:]:
        found = differences(first, records[name])
        identical += not found
        for epoch, key, a, b in found:
            print(f"{name} epoch {epoch} {key}: {b!r} (first run {a!r})")
    mode = "eager" if args.eager else "compiled"
    settings = [args.method, mode, f"oneDNN {args.onednn}"]
    settings += [f"intra,inter threads {','.join(map(str, args.threads))}"] if args.threads else []
    settings += [f"grappler {setting}" for setting in args.grappler]
    print(f"{trial}: {identical + 1} of {len(names)} runs identical to the first ({', '.join(settings)})")


if __name__ == "__main__":
    main()
