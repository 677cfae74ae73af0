"""Paired per-seed differences between two folders of evaluated runs (run by hand; not a test).

    .venv/bin/python benchmarks/paired_runs.py BASE CANDIDATE [CANDIDATE ...] [--base-predictor NAME]

BASE and each CANDIDATE hold ``seedN`` run folders that ``mkd evaluate`` (or ``mkd compare``) has scored
(``seedN/metrics.json``, test volumes). For every predictor both runs have (MKD: ``ensemble``, ``syn``,
``real``) it prints the candidate's mean Dice per seed, the per-seed difference candidate − base over the
seeds both folders hold, and its mean ± std (population std, as ``mkd compare``). It pairs runs that
``mkd compare`` cannot put in one table: runs of two code versions, or of settings that are not a
registered variant (e.g. ``--out`` folders made with different ``--config`` files). ``--base-predictor``
pairs every predictor of the candidate with that one predictor of BASE (e.g. ``ummkd`` against MKD's).
"""

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np


def mean_dice(run):
    """``{predictor: mean Dice %}`` of an evaluated run (mean over structures of the mean over volumes,
    the ``mean Dice`` column of ``mkd compare``), or ``{}`` if it has not been evaluated."""
    path = Path(run) / "metrics.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())["summary"]
    return {predictor: 100 * rows["overall"]["dice"]["mean"] for predictor, rows in summary.items()}


def paired(base, candidate, base_predictor=None):
    """``{predictor: (seeds, candidate Dice per seed, candidate − base per seed)}`` over the seeds both hold
    (against BASE's ``base_predictor`` if given, else its predictor of the same name)."""
    seeds = sorted(int(p.name[4:]) for p in Path(candidate).glob("seed*") if p.name[4:].isdigit())
    result = {}
    for seed in seeds:
        ours, theirs = mean_dice(Path(candidate) / f"seed{seed}"), mean_dice(Path(base) / f"seed{seed}")
        if base_predictor is not None:
            theirs = dict.fromkeys(ours, theirs[base_predictor]) if base_predictor in theirs else {}
        for predictor in ours.keys() & theirs.keys():
            entry = result.setdefault(predictor, ([], [], []))
            entry[0].append(seed)
            entry[1].append(ours[predictor])
            entry[2].append(ours[predictor] - theirs[predictor])
    return result


def record_header(config, trained_at=None, command=None, machine=None):
    """The standard record header (benchmarks/README.md): date, commit, command, config, machine. The commit is
    ``trained_at`` (the runs' own, when the scoring checkout is a later one), else the checkout's HEAD; the
    command and machine are this script's and the current load unless given (the runs' own)."""
    if trained_at is not None and not re.fullmatch(r"[0-9a-f]{7,40}", trained_at):
        raise SystemExit(f"error: --trained-at: expected a commit hash, got {trained_at!r}")
    commit = (
        trained_at
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "command": command or f"python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:]),
        "config": config,
        "machine": machine
        or f"{os.cpu_count()} cores; load average "
        + ", ".join(f"{v:.2f}" for v in os.getloadavg())
        + " (scoring only: the runs' own machine notes are in the README)",
    }


def add_record_arguments(parser, out_default=None):
    """``--out``, ``--config`` and ``--trained-at``: the arguments of a script that writes a record pair
    (:func:`write_record`); ``out_default``: write one even without ``--out``."""
    help_out = "write OUT.md and OUT.json" if out_default else "also write OUT.md and OUT.json"
    parser.add_argument("--out", default=out_default, help=f"{help_out}, records with the standard header")
    parser.add_argument("--config", default="", help="the runs' settings, for the record's header")
    parser.add_argument("--trained-at", help="the commit the runs were trained at [the checkout's HEAD]")


def write_record(out, config, body, data, trained_at=None, command=None, machine=None):
    """Write ``OUT.md`` (the standard header, then the ``body`` lines) and ``OUT.json`` (``{"header": ...}``
    and ``data``'s keys): the record pair every script of this folder writes."""
    header = record_header(config, trained_at, command, machine)
    lines = ["<!-- record header -->", *(f"- {k}: {v}" for k, v in header.items()), "", *body]
    Path(f"{out}.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    Path(f"{out}.json").write_text(json.dumps({"header": header, **data}, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("candidates", nargs="+")
    parser.add_argument("--base-predictor", help="BASE's predictor to pair every candidate predictor with")
    add_record_arguments(parser)
    args = parser.parse_args()
    rows, lines = [], []
    base_dice = {p: (s, d) for p, (s, d, _) in paired(args.base, args.base, None).items()}
    for predictor, (seeds, dice) in sorted(base_dice.items()):
        rows.append({"run": args.base, "predictor": predictor, "seeds": seeds, "dice": dice, "minus_base": None})
    for candidate in args.candidates:
        for predictor, (seeds, dice, difference) in sorted(paired(args.base, candidate, args.base_predictor).items()):
            rows.append(
                {"run": candidate, "predictor": predictor, "seeds": seeds, "dice": dice, "minus_base": difference}
            )
            lines.append(
                f"{candidate} [{predictor}] seeds {seeds}: "
                + " / ".join(f"{d:.1f}" for d in dice)
                + f" ({np.mean(dice):.1f} ± {np.std(dice):.1f}); minus base "
                + ", ".join(f"{d:+.1f}" for d in difference)
                + f": {np.mean(difference):+.1f} ± {np.std(difference):.1f}"
            )
    print("\n".join(lines))
    if args.out:
        table = [
            "| run | predictor | seeds | mean Dice per seed | mean ± std | minus base per seed | mean ± std |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            difference = row["minus_base"]
            table.append(
                f"| {row['run']} | {row['predictor']} | {row['seeds']} | "
                + " / ".join(f"{d:.1f}" for d in row["dice"])
                + f" | {np.mean(row['dice']):.1f} ± {np.std(row['dice']):.1f} | "
                + ("base" if difference is None else ", ".join(f"{d:+.1f}" for d in difference))
                + " | "
                + ("" if difference is None else f"{np.mean(difference):+.1f} ± {np.std(difference):.1f}")
                + " |"
            )
        write_record(args.out, args.config, table, {"rows": rows}, args.trained_at)


if __name__ == "__main__":
    main()
