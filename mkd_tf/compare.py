"""`mkd compare`: several methods, several seeds, one cache, one budget -> one table and a box plot.

Every run uses the same slice cache (so the same patient split), the same augmentation, architecture
size and step budget; only the method (and the seed) changes. Each method is scored by its main
predictor on the target test split (the ensemble for MKD, the single segmentor otherwise); MKD's
two segmentors are reported as extra rows (`mkd [syn]`, `mkd [real]`).

The table gives, per method, the mean ± std **over seeds** of the per-seed mean over test volumes,
then the **paired differences** of the first MKD entry against every other method: per seed (same
seed = same split, same data order) its mean Dice minus the other's, and their mean ± std.
The box plot shows per-volume mean Dice pooled over seeds; ``curves.png`` the learning curves: the
validation and test Dice of each method's main predictor (averaged weights, slices of the split
pooled) after every epoch, mean over seeds with a min–max band, so instability and over-fitting show.
The test curve is for looking only: checkpoints are selected on validation Dice.

With ``--tune SETTING=V1,V2,...`` (:func:`parse_tune`) every method trains at every value and is reported
at the value with the highest validation Dice averaged over the seeds, so each baseline gets the same
tuning as MKD; a second table lists each value's validation and test Dice.
"""

import copy
import json
from pathlib import Path

import numpy as np
import yaml

from mkd_tf import registry
from mkd_tf.config import load_config
from mkd_tf.data.cache import SliceCache
from mkd_tf.errors import MkdError, fail
from mkd_tf.evaluation import evaluate_run
from mkd_tf.files import atomic_path, write_text_atomic
from mkd_tf.run_files import read_history
from mkd_tf.training import train, usable_target_volumes


def _deep_update(base, update):
    for key, value in update.items():
        if isinstance(value, dict):
            base[key] = _deep_update(dict(base.get(key) or {}), value)
        else:
            base[key] = value
    return base


def run_overrides(name, seed, overrides):
    """Overrides of one compare entry: shared settings + its method (or registered variant) + its seed."""
    if name not in registry.names():
        fail("--methods", f"unknown method '{name}' (choose from {', '.join(registry.names())})")
    merged = _deep_update(copy.deepcopy(overrides or {}), copy.deepcopy(registry.variant_overrides(name)))
    merged.update(method=registry.method_of(name).name, seed=seed)
    return merged


def parse_tune(text):
    """``"optimizer.segmentor_lr=5e-4,1e-3"`` -> ``(("optimizer", "segmentor_lr"), [("5e-4", 0.0005), ("1e-3", 0.001)])``:
    the setting's path and each value as written and as parsed (int, float, else YAML: ``true``, a name)."""
    setting, _, values = (text or "").partition("=")
    path = tuple(part for part in setting.strip().split(".") if part)
    written = [value.strip() for value in values.split(",") if value.strip()]
    if not path or len(written) < 2 or len(set(written)) < len(written):
        fail("--tune", f"expected SETTING=VALUE,VALUE[,...] with two or more different values, got {text!r}")
    if path[0] in ("method", "seed"):
        fail("--tune", f"'{path[0]}' is chosen by --methods / --seeds, not tuned")
    return path, [(value, _parse_value(value)) for value in written]


def _parse_value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _nested(path, value):
    """``(("a", "b"), 1)`` -> ``{"a": {"b": 1}}``."""
    for key in reversed(path):
        value = {key: value}
    return value


def compare_methods(
    cache,
    methods,
    seeds,
    out,
    config_path=None,
    overrides=None,
    verbose=0,
    progress=None,
    first_seed=0,
    tune=None,
):
    """Train and evaluate each method for seeds ``first_seed .. first_seed + seeds - 1`` (run folders
    ``out/METHOD/seedN``; a finished run is only evaluated); write comparison.{md,json,png} into `out`.

    Several processes with different ``first_seed`` can train one method's seeds in parallel; a last
    call over all the seeds then only evaluates and writes the table.

    ``tune``: ``(setting path, [(value as written, value), ...])`` from :func:`parse_tune`. Each method then
    trains once per value (run folders ``out/METHOD/SETTING=VALUE/seedN``) and is reported at the value
    whose best validation Dice (the selected checkpoint's), averaged over the seeds, is highest — the first
    value on a tie. A second table gives every value's validation and test Dice, so a user sees how much
    the choice mattered; the test split plays no part in the choice."""
    seed_numbers = range(first_seed, first_seed + seeds)
    progress = progress or (lambda line: None)
    path, values = tune if tune else ((), [(None, None)])
    _check_methods(cache, methods, config_path, overrides, first_seed, tune)
    out = Path(out)
    rows = {}  # row name -> list over seeds of (summary, per-case overall dice list)
    tuning = {}  # method -> its chosen value and every value's per-seed validation and test Dice
    chosen_runs = {}
    for name in methods:
        scored = {}  # value as written -> per seed (best validation Dice, test result, run folder)
        for written, value in values:
            folder = out / name / (f"{path[-1]}={written}" if tune else "")
            scored[written] = [
                _train_and_evaluate(
                    cache, folder / f"seed{seed}", config_path, name, seed, overrides, path, value, progress, verbose
                )
                for seed in seed_numbers
            ]
        chosen = max(scored, key=lambda written: np.mean([validation for validation, _, _ in scored[written]]))
        if tune:
            tuning[name] = _tuning_record(scored, chosen)
        chosen_runs[name] = [run for _, _, run in scored[chosen]]
        for _, result, _ in scored[chosen]:
            _add_rows(rows, name, result)
    table, data = _table(rows)
    differences, paired = _paired_differences(data)
    table += differences
    if paired:
        data["paired_differences"] = paired  # row -> per-seed MKD minus row, in Dice points
    if tune:
        table += _tuning_table(".".join(path), [written for written, _ in values], tuning)
        data["tuning"] = {"setting": ".".join(path), "methods": tuning}
    return _write_comparison(out, table, data, rows, chosen_runs)


def _check_methods(cache, methods, config_path, overrides, first_seed, tune):
    """Every method name, setting and ``--tune`` value, and whether the cache can feed each run, is checked
    before any training: a bad one fails in one line."""
    if not methods:
        fail("--methods", "no method given (e.g. --methods target-only,mkd)")
    path, values = tune if tune else ((), [])
    slice_cache = SliceCache(cache, verify=False)  # train() verifies it; this only reads its manifest
    for name in methods:
        usable_target_volumes(slice_cache, load_config(config_path, run_overrides(name, first_seed, overrides)))
        for written, value in values:
            try:
                config = load_config(config_path, _run_settings(name, first_seed, overrides, path, value))
                usable_target_volumes(slice_cache, config)
            except MkdError as error:
                fail("--tune", f"value {written}: {str(error).split(': ', 1)[-1]}")
    if tune and not any(volume["label"] for volume in slice_cache.volumes("target", "val")):
        fail(cache, "--tune chooses by validation Dice, but the cache has no labelled target validation volumes")


def _write_comparison(out, table, data, rows, chosen_runs):
    """comparison.md, .json, the box plot and the learning curves in ``out``; returns what they hold."""
    out.mkdir(parents=True, exist_ok=True)
    table_path, plot_path, curves_path = out / "comparison.md", out / "comparison.png", out / "curves.png"
    write_text_atomic(table_path, table)
    write_text_atomic(out / "comparison.json", json.dumps(data, indent=1))
    _box_plot(rows, plot_path)
    _learning_curves(chosen_runs, curves_path)
    return {
        "table": table,
        "table_path": str(table_path),
        "plot_path": str(plot_path),
        "curves_path": str(curves_path),
        "data": data,
    }


def _run_settings(name, seed, overrides, path, value):
    """The overrides of one run: :func:`run_overrides`, plus the tuned setting's value if any."""
    settings = run_overrides(name, seed, overrides)
    return _deep_update(settings, _nested(path, value)) if path else settings


def _train_and_evaluate(cache, run, config_path, name, seed, overrides, path, value, progress, verbose):
    """Train (or resume, or only load) one run and score it: ``(best validation Dice, test result, run)``."""
    progress(f"== {name} seed {seed}: {run}")
    trained = train(cache, run, config_path, _run_settings(name, seed, overrides, path, value), verbose=verbose)
    return trained["best"]["score"], evaluate_run(run, "test"), run  # the score of the checkpoint `best/` holds


def _main_predictor(result):
    """The reported predictor of an :func:`~mkd_tf.evaluation.evaluate_run` result (the model's
    :meth:`~mkd_tf.models.cross_modality.CrossModalityModel.main_predictor`)."""
    return result["main_predictor"]


def _add_rows(rows, name, result):
    """Append one run's test ``result`` to ``rows``: its main predictor as ``name``, any other as ``name [p]``."""
    predictors = list(result["summary"])
    main = _main_predictor(result)
    reported = [(name, main)] + [(f"{name} [{p}]", p) for p in predictors if p != main]
    for row, predictor in reported:
        per_case = [float(np.mean([s["dice"] for s in case.values()])) for case in result["cases"][predictor].values()]
        rows.setdefault(row, []).append((result["summary"][predictor], per_case))


def _tuning_record(scored, chosen):
    """The JSON record of one method's tuning: the chosen value, each value's per-seed validation and test Dice."""

    def test_dice(result):
        return result["summary"][_main_predictor(result)]["overall"]["dice"]["mean"]

    return {
        "chosen": chosen,
        "values": {
            written: {
                "validation": [validation for validation, _, _ in runs],
                "test": [test_dice(result) for _, result, _ in runs],
            }
            for written, runs in scored.items()
        },
    }


def _tuning_table(setting, written_values, tuning):
    """Markdown: per method and value, mean best validation Dice (test Dice), the chosen value marked."""
    heading = (
        f"\n`{setting}` tuned per method: mean over seeds of the best validation Dice (test Dice in brackets, "
        "not used for the choice); **bold** = the value reported above\n"
    )
    lines = [
        heading,
        "| method | " + " | ".join(written_values) + " |",
        "|" + " --- |" * (len(written_values) + 1),
    ]
    for name, record in tuning.items():
        cells = []
        for written in written_values:
            scores = record["values"][written]
            cell = f"{100 * np.mean(scores['validation']):.1f} ({100 * np.mean(scores['test']):.1f})"
            cells.append(f"**{cell}**" if written == record["chosen"] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _paired_differences(data):
    """Markdown lines and a dict: per seed, the first MKD row's mean Dice minus each other row's."""
    reference = next((row for row in data if row.split(" ")[0] == "mkd"), None)
    if reference is None or len(data) < 2:
        return "", {}
    ours = np.array(data[reference]["overall/dice"]["seeds"])
    lines = [
        f"\npaired differences of {reference} (mean Dice, points; per seed, then mean ± std over seeds)\n",
        "| against | per seed | mean ± std |",
        "| --- | --- | --- |",
    ]
    result = {}
    for row, record in data.items():
        if row == reference:
            continue
        difference = 100 * (ours - np.array(record["overall/dice"]["seeds"]))
        result[row] = {"seeds": difference.tolist(), "mean": float(difference.mean()), "std": float(difference.std())}
        lines.append(
            f"| {row} | "
            + ", ".join(f"{d:+.1f}" for d in difference)
            + f" | {difference.mean():+.1f} ± {difference.std():.1f} |"
        )
    return "\n".join(lines) + "\n", result


def learning_curve(run):
    """`(steps, validation Dice, test Dice)` after each epoch of a run (mean over structures of its
    main predictor; NaN where the split has no labelled slices)."""
    history = read_history(Path(run) / "history.json")
    steps_per_epoch = load_config(Path(run) / "config.yaml", recorded=True)["schedule"]["steps_per_epoch"]
    steps, curves = [], {"val_dice": [], "test_dice": []}
    for record in history["epochs"]:
        steps.append(record["epoch"] * steps_per_epoch)
        for key, values in curves.items():
            dice = record.get(key)
            values.append(float(np.mean(list(dice.values())[-1])) if dice else float("nan"))
    return np.array(steps), np.array(curves["val_dice"]), np.array(curves["test_dice"])


def _learning_curves(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    # the colour cycle has 10 colours: methods after the tenth get a dashed (then dotted ...) line
    styles = ("-", "--", ":", "-.")
    for number, (name, folders) in enumerate(runs.items()):
        curves = [learning_curve(folder) for folder in folders if (Path(folder) / "history.json").exists()]
        if not curves:
            continue
        length = min(len(steps) for steps, _, _ in curves)
        steps = curves[0][0][:length]
        for axis, index in zip(axes, (1, 2)):
            values = 100 * np.array([curve[index][:length] for curve in curves])
            style = styles[number // 10 % len(styles)]
            (line,) = axis.plot(steps, values.mean(axis=0), style, label=f"{name} ({len(curves)} seeds)")
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    for axis, title in zip(axes, ("validation", "test (not used for selection)")):
        axis.set_title(f"target {title}: mean Dice, averaged weights")
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice over structures (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    _save_figure(figure, path)


def _save_figure(figure, path):
    """Write a matplotlib ``figure`` to the PNG ``path`` atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=100)
    finally:
        plt.close(figure)


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
                record[f"{structure}/{metric}"] = {
                    "mean": float(values.mean()),
                    "std": float(values.std()),
                    "seeds": values.tolist(),
                }
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
    _save_figure(figure, path)
