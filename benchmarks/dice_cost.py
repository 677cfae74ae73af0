"""Dice against training cost, one panel per phantom (run by hand; not a test).

    .venv/bin/python benchmarks/dice_cost.py --cost COST.json [--cost ...] [--size 48]
        PHANTOM=RECORD.json [PHANTOM=RECORD.json ...] [--rename RECORD_NAME:OLD=NEW ...] --png docs/dice_cost.png \
        --out benchmarks/results/dice_cost

x: GFLOP per training step of each method, averaged over a run (a method with a warm start: its
``(run average)`` row; the others: their one step), **executed** count where the record has it, from
``benchmarks/training_cost.py`` records (``--cost``, several are pooled; the first that has a method wins).
y: the main predictor's mean test Dice (%), mean ± std over seeds, from a result record: ``mkd compare``'s
``comparison.json`` (method -> ``overall/dice``) or ``benchmarks/method_table.py``'s (``rows``). A method is
matched to its cost row by name. Several records of one phantom are merged, a later one's method replacing
an earlier one's of the same name; ``--rename`` first gives a record's method another name (e.g. the cost
row's). Methods without a cost row are listed and left out. ``--out`` writes the plotted numbers as OUT.md and OUT.json with the standard header.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_runs import write_record


def run_costs(paths, size):
    """``{method: GFLOP per step over a run}`` at ``size`` from training_cost records (first record wins)."""
    costs = {}
    for path in paths:
        rows = json.loads(Path(path).read_text())["rows"]
        by_method = {}
        for row in rows:
            if row["size"] != size:
                continue
            by_method.setdefault(row["method"], {})[row["phase"]] = row
        for method, phases in by_method.items():
            row = phases.get("run average") or phases.get("train")
            if row is None or method in costs:
                continue
            costs[method] = row.get("executed_flops", row["flops"]) / 1e9
    return costs


def record_scores(path):
    """``{method: [mean Dice (%) per seed]}`` of a comparison record (main predictors only)."""
    data = json.loads(Path(path).read_text())
    if "rows" in data:  # benchmarks/method_table.py
        return {row["method"]: [float(v["dice"]) for v in row["scores"].values()] for row in data["rows"]}
    return {
        method: [100.0 * v for v in values["overall/dice"]["seeds"]]
        for method, values in data.items()
        if isinstance(values, dict) and "overall/dice" in values and "[" not in method
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", metavar="PHANTOM=RECORD.json")
    parser.add_argument("--cost", action="append", required=True, help="a training_cost.py record (.json)")
    parser.add_argument("--size", type=int, default=48, help="the slice size of the cost rows [48]")
    parser.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="RECORD_NAME:OLD=NEW",
        help="call method OLD of the record whose file name (no suffix) is RECORD_NAME by NEW",
    )
    parser.add_argument("--png", required=True, help="the figure to write")
    parser.add_argument("--out", help="also write OUT.md and OUT.json, records with the standard header")
    parser.add_argument("--config", default="", help="the runs' settings, for the record's header")
    args = parser.parse_args()

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = run_costs(args.cost, args.size)
    renames = {}
    for item in args.rename:
        record_name, _, change = item.partition(":")
        old, _, new = change.partition("=")
        renames.setdefault(record_name, {})[old] = new
    panels = {}  # phantom -> {method: Dice per seed}; a later record of a phantom replaces an earlier one's method
    for item in args.records:
        phantom, record = item.split("=", 1)
        names = renames.get(Path(record).with_suffix("").name, {})
        for method, dice in record_scores(record).items():
            panels.setdefault(phantom, {})[names.get(method, method)] = dice
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    lines, points = [], []
    for axis, (phantom, scores) in zip(axes[0], panels.items()):
        lines += [f"## {phantom}", "", "| method | GFLOP/step (run average) | mean Dice | seeds |"]
        lines.append("| --- | ---: | ---: | --- |")
        for method, dice in scores.items():
            cost = costs.get(method)
            if cost is None:
                print(f"{phantom}: no cost row for {method!r}; left out", file=sys.stderr)
                continue
            mean, spread = float(np.mean(dice)), float(np.std(dice))
            axis.errorbar(cost, mean, yerr=spread, fmt="o", capsize=3)
            axis.annotate(method, (cost, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
            points.append({"phantom": phantom, "method": method, "gflop_per_step": cost, "dice_per_seed": dice})
            lines.append(
                f"| {method} | {cost:.2f} | {mean:.1f} ± {spread:.1f} | {' / '.join(f'{d:.1f}' for d in dice)} |"
            )
        lines.append("")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xticks([4, 8, 16, 32])
        axis.set_xlabel(f"GFLOP per training step, run average ({args.size}² slices)")
        axis.set_ylabel("mean test Dice (%), mean ± std over seeds")
        axis.set_title(f"{phantom} phantom")
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.png, dpi=110)
    print("\n".join(lines))
    if args.out:
        write_record(args.out, args.config, [f"Plotted in `{args.png}`.", "", *lines], {"points": points})
    print(f"wrote {args.png}" + (f", {args.out}.md and {args.out}.json" if args.out else ""))


if __name__ == "__main__":
    main()
