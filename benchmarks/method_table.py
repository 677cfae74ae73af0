"""The results table of evaluated runs kept in separate folders (run by hand; not a test).

    .venv/bin/python benchmarks/method_table.py NAME=FOLDER [NAME=FOLDER ...] [--out OUT] [--config TEXT] [--trained-at COMMIT]

Each FOLDER holds ``seedN`` run folders that ``mkd compare`` (or ``mkd evaluate``) has scored
(``seedN/metrics.json``, test volumes). For each NAME it prints the main predictor's mean Dice (%), ASSD and
HD95 (mm): mean ± std over seeds (population std, as ``mkd compare``) of the mean over test volumes, with the
per-seed Dice. It is ``mkd compare``'s table for runs that one ``mkd compare`` call cannot hold: methods
trained at different learning rates in separate processes (``--first-seed``), or several code versions.
``--out`` writes OUT.md and OUT.json with the standard header.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from paired_runs import add_record_arguments, write_record

METRICS = (("dice", "mean Dice", 100.0), ("assd", "ASSD (mm)", 1.0), ("hd95", "HD95 (mm)", 1.0))


def seed_scores(folder):
    """``{seed: {metric: value}}`` of the main predictor of each evaluated ``seedN`` run in ``folder``."""
    scores = {}
    for run in sorted(Path(folder).glob("seed*")):
        path = run / "metrics.json"
        if not run.name[4:].isdigit() or not path.exists():
            continue
        metrics = json.loads(path.read_text())
        main = metrics.get("main_predictor") or list(metrics["summary"])[-1]  # older runs: the last one
        overall = metrics["summary"][main]["overall"]
        scores[int(run.name[4:])] = {key: scale * overall[key]["mean"] for key, _, scale in METRICS}
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=FOLDER")
    add_record_arguments(parser)
    args = parser.parse_args()
    rows = []
    for item in args.runs:
        name, _, folder = item.partition("=")
        scores = seed_scores(folder)
        rows.append({"method": name, "folder": folder, "seeds": sorted(scores), "scores": scores})
    table = ["| method | seeds | Dice per seed | " + " | ".join(title for _, title, _ in METRICS) + " |"]
    table.append("| --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " |")
    for row in rows:
        values = list(row["scores"].values())
        if not values:
            table.append(f"| {row['method']} | none evaluated | | " + " | ".join("" for _ in METRICS) + " |")
            continue
        cells = [
            f"{np.mean([v[key] for v in values]):.{1 if key == 'dice' else 2}f} ± "
            f"{np.std([v[key] for v in values]):.{1 if key == 'dice' else 2}f}"
            for key, _, _ in METRICS
        ]
        per_seed = " / ".join(f"{v['dice']:.1f}" for v in values)
        table.append(f"| {row['method']} | {row['seeds']} | {per_seed} | " + " | ".join(cells) + " |")
    print("\n".join(table))
    if args.out:
        write_record(args.out, args.config, table, {"rows": rows}, args.trained_at)


if __name__ == "__main__":
    main()
