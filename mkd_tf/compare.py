"""`mkd compare`: several methods, several seeds, one cache, one budget -> one table and a box plot.

Every run uses the same slice cache (so the same patient split), the same augmentation, architecture
size and step budget; only the method (and the seed) changes. Each method is scored by its main
predictor on the target test split (the ensemble for MKD, the single segmentor otherwise); MKD's
two segmentors are reported as extra rows (`mkd [syn]`, `mkd [real]`).

The table gives, per method, the mean ± std **over seeds** of the per-seed mean over test volumes.
The box plot shows per-volume mean Dice pooled over seeds.
"""

import copy
import json
import os
from pathlib import Path

import numpy as np

from mkd_tf.evaluation import evaluate_run
from mkd_tf.errors import fail
from mkd_tf.files import write_text_atomic
from mkd_tf.training import train

VARIANTS = {
    "mkd-no-iam": ("mkd", {"ablation": {"iam": False}}),
    "mkd-no-kd-s2r": ("mkd", {"ablation": {"kd_s2r": False}}),
    "mkd-no-kd-r2s": ("mkd", {"ablation": {"kd_r2s": False}}),
    "mkd-no-pretrain": ("mkd", {"schedule": {"mkd_pretrain": 0.0}}),
    "mkd-plain-iam": ("mkd", {"alignment": {"residual": False}}),
    "mkd-no-ema": ("mkd", {"optimizer": {"ema": False}}),
    "finetune-no-ema": ("finetune", {"optimizer": {"ema": False}}),
    "target-only-no-ema": ("target-only", {"optimizer": {"ema": False}}),
}


def _deep_update(base, update):
    for key, value in update.items():
        if isinstance(value, dict):
            base[key] = _deep_update(dict(base.get(key) or {}), value)
        else:
            base[key] = value
    return base


def run_overrides(name, seed, overrides):
    """Overrides of one compare entry: shared settings + its method (or MKD ablation) + its seed."""
    from mkd_tf.config import METHODS

    method, extra = VARIANTS.get(name, (name, {}))
    if method not in METHODS:
        fail("--methods", f"unknown method '{name}' (choose from {', '.join(list(METHODS) + list(VARIANTS))})")
    merged = _deep_update(copy.deepcopy(overrides or {}), extra)
    merged.update(method=method, seed=seed)
    return merged


def compare_methods(cache, methods, seeds, out, config_path=None, overrides=None, verbose=0, progress=None):
    """Train and evaluate each method for seeds 0..seeds-1; write comparison.{md,json,png} into `out`."""
    progress = progress or (lambda line: None)
    for name in methods:  # an unknown name fails now, not after the methods before it have trained
        run_overrides(name, 0, overrides)
    out = Path(out)
    rows = {}  # row name -> list over seeds of (summary, per-case overall dice list)
    for name in methods:
        for seed in range(seeds):
            run = out / name / f"seed{seed}"
            progress(f"== {name} seed {seed}: {run}")
            train(cache, run, config_path, run_overrides(name, seed, overrides), verbose=verbose)
            result = evaluate_run(run, "test")
            predictors = list(result["summary"])
            main = predictors[-1]
            reported = [(name, main)] + ([(f"{name} [{p}]", p) for p in predictors[:-1]] if len(predictors) > 1 else [])
            for row, predictor in reported:
                per_case = [float(np.mean([s["dice"] for s in case.values()]))
                            for case in result["cases"][predictor].values()]
                rows.setdefault(row, []).append((result["summary"][predictor], per_case))
    table, data = _table(rows)
    out.mkdir(parents=True, exist_ok=True)
    table_path, plot_path = out / "comparison.md", out / "comparison.png"
    write_text_atomic(table_path, table)
    write_text_atomic(out / "comparison.json", json.dumps(data, indent=1))
    _box_plot(rows, plot_path)
    return {"table": table, "table_path": str(table_path), "plot_path": str(plot_path), "data": data}


def _table(rows):
    structures = [s for s in next(iter(rows.values()))[0][0] if s != "overall"]
    header = "| method | " + " | ".join(f"{s} Dice" for s in structures) + " | mean Dice | ASSD (mm) | HD95 (mm) |"
    lines = [header, "|" + " --- |" * (len(structures) + 4)]
    data = {}
    for row, seeds in rows.items():
        cells, record = [], {}
        for structure in structures + ["overall"]:
            for metric in ("dice", "assd", "hd95"):
                values = np.array([summary[structure][metric]["mean"] for summary, _ in seeds])
                record[f"{structure}/{metric}"] = {"mean": float(values.mean()), "std": float(values.std()),
                                                   "seeds": values.tolist()}
        for structure in structures + ["overall"]:
            value = record[f"{structure}/dice"]
            cells.append(f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}")
        for metric in ("assd", "hd95"):
            value = record[f"overall/{metric}"]
            cells.append(f"{value['mean']:.2f} ± {value['std']:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
        data[row] = record
    note = f"\nmean ± std over {len(next(iter(rows.values())))} seed(s) of the mean over target test volumes\n"
    return "\n".join(lines) + "\n" + note, data


def _box_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    values = [[100 * v for _, per_case in rows[name] for v in per_case] for name in names]
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    axis.boxplot(values)
    axis.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    axis.set_ylabel("mean Dice over structures (%)")
    axis.set_title("target test volumes, all seeds")
    figure.tight_layout()
    temporary = Path(path).with_name(f".{Path(path).stem}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
