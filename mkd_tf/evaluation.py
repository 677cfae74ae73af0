"""`mkd evaluate`: whole target volumes, predicted slice by slice, scored on their original grid.

For each volume of the split, every predictor of the run (e.g. `syn`, `real`, `ensemble`) segments
the cached slices; the label map goes back to the file's own voxel grid with the exact inverse of
preprocessing, and Dice / ASSD / HD95 (mm, on the file's voxel spacing) are computed against the
original label file read again from disk, not against the cache. Structures the cache does not keep
(e.g. with `--structures 4`) count as background on both sides.

Writes `metrics.json` (per case and summary), `metrics.csv` (one row per predictor, case and
structure) and `metrics.md` (one mean ± std table per predictor) into the run folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mkd_tf import metrics
from mkd_tf.data.cache import SliceCache, file_record
from mkd_tf.data.layouts import defined_labels
from mkd_tf.data.nifti import load_label
from mkd_tf.data.preprocess import labels_to_original, map_label_values
from mkd_tf.errors import fail
from mkd_tf.files import write_text_atomic
from mkd_tf.inference import load_trained, predict_slices


def evaluate_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    which: str = "best",
    cache_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate every predictor of a run on one split of its cache.

    Args:
        run_dir: run folder written by `mkd train`.
        split: `"test"` or `"val"` (or `"train"`).
        which: `"best"` or `"last"` checkpoint.
        cache_path: the slice cache (default: the one the run was trained on).
        out_dir: where to write the metrics files (default: `run_dir`).

    Returns:
        dict `{"method", "split", "checkpoint", "main_predictor" (the one the run reports), "cases":
        {predictor: {case_id: {structure: {dice, assd, hd95}}}},
        "summary": {predictor: summary}, "table": markdown}`.

    Example:
        >>> result = evaluate_run("runs/mkd", split="test")  # doctest: +SKIP
        >>> result["summary"]["ensemble"]["overall"]["dice"]["mean"]  # doctest: +SKIP
        0.83
    """
    model, config, record = load_trained(run_dir, which)
    cache = SliceCache(cache_path or record["path"])
    check_same_preparation(cache, record, run_dir)
    if not any(v["label"] for v in cache.volumes("target", split)):
        fail(cache.path, f"no labelled target volumes in split '{split}'")
    for volume in cache.volumes("target", split):  # before the first prediction, not after some
        if volume["label"]:
            check_label_file(volume)
    structures = structure_indices(cache)
    predictors = model.predictor_names()
    cases = {name: {} for name in predictors}
    for volume, slices, reference, spacing in labelled_volumes(cache, split):
        for name in predictors:
            predicted = predict_slices(lambda batch: model.predict_probabilities(batch, name), slices)
            on_grid = labels_to_original(predicted, volume["inverse"])
            cases[name][volume["case_id"]] = metrics.evaluate_volume(on_grid, reference, spacing, structures)
    summary = {name: metrics.summarize(list(cases[name].values())) for name in predictors}
    table = "\n".join(
        f"### {config['method']} — {name} ({split}, {len(cases[name])} volumes)\n\n"
        + metrics.markdown_table(summary[name])
        for name in predictors
    )
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "method": config["method"],
        "split": split,
        "checkpoint": which,
        "main_predictor": model.main_predictor(),
        "cases": cases,
        "summary": summary,
    }
    write_text_atomic(out / "metrics.json", json.dumps(result, indent=1))
    write_text_atomic(out / "metrics.csv", _csv(cases))
    write_text_atomic(out / "metrics.md", table)
    result["table"] = table
    return result


def check_same_preparation(cache: SliceCache, record: dict, run_dir: str | os.PathLike) -> None:
    """Refuse a cache prepared otherwise than the one the run was trained on (``record``: its cache.json).

    The classes, the target's label values and every preprocessing parameter (spacing, size, axis, CT
    window, percentiles) must be the same: a model scores slices of another spacing or size without an
    error, and the numbers would mean nothing.
    """
    where = f"the run {run_dir} was trained on"
    if cache.classes != record["classes"]:
        fail(cache.path, f"classes {cache.classes} differ from the run's {record['classes']}")
    if cache.modality("target")["label_values"] != record["target"]["label_values"]:
        fail(
            cache.path,
            f"target label values {cache.modality('target')['label_values']} differ from the ones {where} "
            f"({record['target']['label_values']})",
        )
    prepared, trained = cache.manifest["preprocess"], record["preprocess"]
    for key in sorted(set(prepared) | set(trained)):
        if prepared.get(key) != trained.get(key):
            fail(
                cache.path,
                f"prepared with preprocess.{key} {prepared.get(key)}, but {where} {trained.get(key)}; "
                "evaluate on a cache prepared with the run's settings",
            )


def check_label_file(volume: dict) -> None:
    """Refuse a label file that is not the one ``mkd prepare`` cached (its size and SHA-256 are in the
    manifest). A cache written before that record existed cannot tell, and its label file is scored as is."""
    recorded = volume.get("label_file")
    if recorded is None:
        return
    path = Path(volume["label"])
    if not path.exists():
        fail(path, "label file not found (it was there when the cache was prepared)")
    if path.stat().st_size != recorded["bytes"] or file_record(path)["sha256"] != recorded["sha256"]:
        fail(path, "label file changed since `mkd prepare` cached it; prepare the cache again to score it")


def structure_indices(cache: SliceCache) -> dict[str, int]:
    """`{structure name: class index}` of the cache's classes, background excluded."""
    return {name: index for index, name in enumerate(cache.classes) if index > 0}


def labelled_volumes(
    cache: SliceCache, split: str
) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray, tuple[float, float, float]]]:
    """Each labelled target volume of ``split`` as ``(volume, slices, reference, spacing)``: its cache
    record, its cached slices `(slices, height, width)`, its label file read again from disk with the
    values mapped to the cache's class indices (structures the cache does not keep -> background) on the
    file's own grid, and that grid's voxel spacing in mm."""
    value_to_class = {
        int(value): cache.classes.index(name) if name in cache.classes else 0
        for name, value in defined_labels(cache.modality("target")).items()  # every label, kept or not
    }
    images = cache.images("target")
    for volume in cache.volumes("target", split):
        if not volume["label"]:
            continue
        reference_file = load_label(volume["label"])
        reference = map_label_values(reference_file.data, value_to_class, volume["label"])
        start, stop = volume["slices"]
        yield volume, np.asarray(images[start:stop]), reference, reference_file.spacing


def _csv(cases):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["predictor", "case", "structure", "dice", "assd_mm", "hd95_mm"])
    for predictor, per_case in cases.items():
        for case, per_structure in per_case.items():
            for structure, values in per_structure.items():
                writer.writerow(
                    [
                        predictor,
                        case,
                        structure,
                        f"{values['dice']:.6f}",
                        f"{values['assd']:.4f}",
                        f"{values['hd95']:.4f}",
                    ]
                )
    return buffer.getvalue()
