"""Validation Dice per epoch of each predictor, over the seeds of evaluated runs (run by hand; not a test).

    .venv/bin/python benchmarks/phase_curves.py FOLDER [FOLDER ...] [--out OUT] [--config TEXT] [--trained-at COMMIT]

Each FOLDER holds ``seedN`` run folders (as ``mkd compare`` makes them, or links to them). For every epoch
it prints the phase the run was in (``history.json``: warm start, distillation, ...) and, per predictor
(MKD: ``syn``, ``real``, ``ensemble``), the mean over seeds of the validation Dice (mean over structures,
%, the cache's validation slices) with the per-seed values. This is how to see what each phase of a
method does, not only its final number. ``--out`` writes OUT.md and OUT.json with the standard header.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from paired_runs import add_record_arguments, write_record


def curves(folder):
    """``[{epoch, phase, dice: {predictor: [per-seed Dice %]}}]`` over the ``seedN`` runs of ``folder``."""
    runs = sorted(p for p in Path(folder).glob("seed*") if (p / "history.json").exists())
    epochs = {}
    for run in runs:
        for record in json.loads((run / "history.json").read_text())["epochs"]:
            row = epochs.setdefault(
                record["epoch"], {"epoch": record["epoch"], "phase": record.get("phase"), "dice": {}}
            )
            for predictor, values in record["val_dice"].items():
                row["dice"].setdefault(predictor, []).append(100 * float(np.mean(values)))
    return [epochs[e] for e in sorted(epochs)], [run.name for run in runs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    add_record_arguments(parser)
    args = parser.parse_args()
    text, data = [], {}
    for folder in args.folders:
        rows, seeds = curves(folder)
        data[folder] = {"seeds": seeds, "epochs": rows}
        predictors = list(rows[0]["dice"]) if rows else []
        text += [f"## {folder} ({', '.join(seeds)})", "", "| epoch | phase | " + " | ".join(predictors) + " |"]
        text.append("| --- | --- | " + " | ".join("---" for _ in predictors) + " |")
        for row in rows:
            cells = [
                f"{np.mean(row['dice'][p]):.1f} ({' / '.join(f'{v:.1f}' for v in row['dice'][p])})" for p in predictors
            ]
            text.append(f"| {row['epoch']} | {row['phase'] or ''} | " + " | ".join(cells) + " |")
        text.append("")
    print("\n".join(text))
    if args.out:
        intro = ["Validation Dice (%, mean over structures) per epoch: mean over seeds (per seed).", ""]
        write_record(args.out, args.config, intro + text, {"runs": data}, args.trained_at)


if __name__ == "__main__":
    main()
