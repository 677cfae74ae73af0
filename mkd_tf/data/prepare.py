"""`mkd prepare`: two datasets (target, assistant) -> one verified slice cache.

Decisions:
- The patient-level split (`fractions` or an explicit split file) applies to the **target** modality.
  Every labelled assistant case goes to `train`: the assistant modality is there to teach, and the
  method is evaluated on target patients only. An explicit split file may still place assistant cases.
- A split file lists every case of each role it names, in train, val, test or ``exclude`` (left out of the
  cache); a case it does not list is refused by name rather than silently dropped.
- Target cases without a label file are training cases without labels. `target_labelled=N` keeps the
  labels of only the first N target training cases (in seeded order); the rest stay, unlabelled.
- Every option, the output path and the split are checked before anything is written. The crop window
  must hold every labelled voxel: a window that drops some is refused with the count per case, unless
  `allow_crop` is set, in which case the counts are printed and recorded in the manifest.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mkd_tf import __version__
from mkd_tf.data.cache import ROLES, SPLITS, CacheWriter, SliceCache, check_output, file_record
from mkd_tf.data.layouts import discover, match_labels
from mkd_tf.data.nifti import check_same_grid, load_image, load_label
from mkd_tf.data.preprocess import PreprocessConfig, preprocess_volume
from mkd_tf.errors import MkdError, fail
from mkd_tf.files import read_json


@dataclass
class PrepareOptions:
    """Everything `mkd prepare` can be told (see `mkd prepare --help`)."""

    target_modality: str | None = None
    assistant_modality: str | None = None
    structures: int | None = None
    ignore_unmatched: bool = False
    split: tuple = (0.6, 0.2, 0.2)
    split_file: str | None = None
    target_labelled: int | None = None
    seed: int = 0
    overwrite: bool = False
    # A crop window that cuts off labelled voxels: reported (progress, manifest) when allowed, an error
    # otherwise (`mkd prepare --allow-crop`).
    allow_crop: bool = False
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def check(self) -> PrepareOptions:
        """Refuse option values that cannot work, naming the option (before anything is read or written)."""
        self.preprocess.check()
        _check_fractions(self.split)
        if self.target_labelled is not None and (
            isinstance(self.target_labelled, bool)
            or not isinstance(self.target_labelled, (int, np.integer))
            or self.target_labelled < 0
        ):
            fail("--target-labelled", f"must be an integer >= 0, got {self.target_labelled!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            fail("--seed", f"must be an integer, got {self.seed!r}")
        if self.split_file is not None and Path(self.split_file).is_dir():
            fail(self.split_file, "split file is a folder, expected a JSON file")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PrepareOptions:
        """Options from a dict of their fields (``preprocess`` a dict of :class:`PreprocessConfig` fields).

        Raises:
            MkdError: naming a key that is not an option.
        """
        values = dict(values)
        preprocess = values.pop("preprocess", None)
        for where, given, known in (
            ("options", values, fields(cls)),
            ("options: preprocess", preprocess if isinstance(preprocess, Mapping) else {}, fields(PreprocessConfig)),
        ):
            unknown = sorted(set(given) - {f.name for f in known})
            if unknown:
                fail(where, f"unknown setting {', '.join(unknown)} (known: {', '.join(f.name for f in known)})")
        if isinstance(preprocess, Mapping):
            preprocess = PreprocessConfig(**preprocess)
        return cls(**values, preprocess=preprocess or PreprocessConfig())


def _check_fractions(fractions):
    try:
        values = [float(f) for f in fractions]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(f) and f >= 0 for f in values) or sum(values) <= 0:
        raise MkdError(f"--split {tuple(fractions)}: expected three non-negative fractions train,val,test")
    return values


def split_fractions(case_ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Seeded patient-level split: case id -> `"train"|"val"|"test"`.

    Counts are rounded; when a split has a nonzero fraction and there are at least three cases it
    gets at least one case, and train always keeps at least one.
    """
    fractions = _check_fractions(fractions)
    total = float(sum(fractions))
    order = sorted(case_ids)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = int(round(n * fractions[2] / total))
    n_val = int(round(n * fractions[1] / total))
    if n >= 3:
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
    while n - n_test - n_val < 1 and (n_test or n_val):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    assignment = {case: "test" for case in order[:n_test]}
    assignment.update({case: "val" for case in order[n_test : n_test + n_val]})
    assignment.update({case: "train" for case in order[n_test + n_val :]})
    return assignment


def _read_split_file(path, datasets):
    if Path(path).is_dir():
        fail(path, "split file is a folder, expected a JSON file")
    spec = read_json(path, "split file not found")
    if not isinstance(spec, dict):
        fail(path, 'expected a JSON object {"target": {"train": [...], "val": [...], "test": [...]}, "assistant": ...}')
    for key in spec:
        if key not in ROLES:
            fail(path, f'unknown key "{key}" (use target, assistant)')
    assignments = {}
    for role, dataset in datasets.items():
        known = {case.case_id for case in dataset.cases}
        assignment = {}
        section = spec.get(role) or {}
        if not isinstance(section, dict):
            fail(path, f'"{role}" must map train/val/test to lists of case ids')
        for split, cases in section.items():
            if split not in (*SPLITS, "exclude"):
                fail(path, f'unknown split "{split}" for {role} (use train, val, test, exclude)')
            if not isinstance(cases, list) or not all(isinstance(case, str) for case in cases):
                fail(path, f'{role} "{split}" must be a list of case ids')
            for case in cases:
                if case not in known:
                    fail(path, f'{role} case "{case}" is not in {dataset.root}')
                if case in assignment:
                    fail(path, f'{role} case "{case}" is listed in both {assignment[case]} and {split}')
                assignment[case] = split
        missing = sorted(known - set(assignment))
        if section and missing:  # a case left out must be left out on purpose
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            fail(
                path,
                f"{role} cases {', '.join(missing[:3])}{more} are in none of train, val, test; "
                f'list each, or under "exclude" to leave it out',
            )
        assignments[role] = (
            {case: split for case, split in assignment.items() if split != "exclude"} if section else None
        )
    return assignments


def plan_splits(datasets: dict[str, Any], options: PrepareOptions) -> dict[str, dict[str, str]]:
    """Case id -> split for each role, following the options (see module docstring)."""
    if options.split_file:
        plans = _read_split_file(options.split_file, datasets)
        for role, dataset in datasets.items():
            if plans[role] is None:  # a role missing from the file: all its labelled cases train
                plans[role] = {case.case_id: "train" for case in dataset.cases}
        return plans
    target = datasets["target"]
    labelled = [case.case_id for case in target.cases if case.label is not None]
    plans = {"target": split_fractions(labelled, options.split, options.seed)}
    plans["target"].update({case.case_id: "train" for case in target.cases if case.label is None})
    plans["assistant"] = {case.case_id: "train" for case in datasets["assistant"].cases}
    return plans


def _labelled_training_cases(dataset, plan, target_labelled, seed):
    """Which training cases keep their labels."""
    candidates = sorted(c.case_id for c in dataset.cases if plan.get(c.case_id) == "train" and c.label is not None)
    if target_labelled is None:
        return set(candidates)
    if target_labelled > len(candidates):
        fail(dataset.root, f"--target-labelled {target_labelled} but only {len(candidates)} labelled training cases")
    random.Random(seed + 1).shuffle(candidates)
    return set(candidates[:target_labelled])


def prepare_cache(
    target_path: str | os.PathLike,
    assistant_path: str | os.PathLike,
    out: str | os.PathLike,
    options: PrepareOptions | Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Read both datasets, preprocess every case and write the slice cache atomically (`mkd prepare`).

    Args:
        target_path: target-modality (e.g. CT) dataset folder, any layout :func:`discover` knows.
        assistant_path: assistant-modality (e.g. MRI) dataset folder.
        out: cache folder to create.
        options: :class:`PrepareOptions`, or a dict of its fields (:meth:`PrepareOptions.from_dict`);
            default: `mkd prepare`'s defaults.
        progress: optional `callable(str)` for one line per volume.

    Returns:
        Path of the finished cache.

    Example:
        >>> cache = prepare_cache("phantom/ct_train", "phantom/mr_train", "cache",
        ...                       {"target_labelled": 1, "preprocess": {"size": 48}})  # doctest: +SKIP
    """
    if isinstance(options, Mapping):
        options = PrepareOptions.from_dict(options)
    options = (options or PrepareOptions()).check()
    progress = progress or (lambda line: None)
    check_output(out, options.overwrite)
    datasets = {
        "target": discover(target_path, options.target_modality),
        "assistant": discover(assistant_path, options.assistant_modality),
    }
    classes = match_labels(datasets["target"], datasets["assistant"], options.structures, options.ignore_unmatched)
    plans = plan_splits(datasets, options)
    if not any(plans["target"].get(c.case_id) for c in datasets["target"].cases):
        fail(target_path, "no target cases to write")
    keep_labels = {role: _labels_kept(datasets[role], plans[role], role, options) for role in ROLES}
    manifest = _manifest(classes, options)
    cropped = {role: {} for role in ROLES}  # case id -> labelled voxels outside the window
    with CacheWriter(out, options.preprocess.size, overwrite=options.overwrite) as writer:
        for role in ROLES:
            dataset = datasets[role]
            manifest["modalities"][role] = {
                "name": dataset.modality,
                "layout": dataset.layout,
                "root": str(Path(dataset.root).resolve()),
                "label_values": {name: dataset.labels[name] for name in classes},
                "label_source": dataset.label_source,
            }
            for case in dataset.cases:
                split = plans[role].get(case.case_id)
                if split is None:
                    continue
                has_label = case.label is not None and (split != "train" or case.case_id in keep_labels[role])
                lost = _write_case(writer, role, dataset, case, split, has_label, classes, options, cropped)
                progress(
                    f"{role:9s} {case.case_id:24s} {split:5s} {'labelled' if has_label else 'unlabelled':10s} "
                    f"{lost[0]} slices" + (f", {lost[1]} labelled voxels outside the window" if lost[1] else "")
                )
        _check_crop(cropped, options)
        manifest["crop"] = {
            "allow_crop": bool(options.allow_crop),
            "dropped_label_voxels": {role: dict(cropped[role]) for role in ROLES},
        }
        return writer.finish(manifest)


def _labels_kept(dataset, plan, role, options):
    """The training cases of ``role`` that keep their labels (``--target-labelled`` of the target's); a
    validation or test case without a label file fails in one line."""
    for case in dataset.cases:
        split = plan.get(case.case_id)
        if split not in (None, "train") and case.label is None:
            fail(case.image, f"{split} case has no label file")
    return _labelled_training_cases(dataset, plan, options.target_labelled if role == "target" else None, options.seed)


def _manifest(classes, options):
    """The cache manifest before the volumes are written (their modalities and crops are added after)."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mkd_tf_version": __version__,
        "classes": classes,
        "preprocess": options.preprocess.to_dict(),
        "split": {
            "seed": options.seed,
            "fractions": list(options.split),
            "file": options.split_file,
            "target_labeled": options.target_labelled,
        },  # manifest key spelt as in earlier caches
        "modalities": {},
    }


def _write_case(writer, role, dataset, case, split, has_label, classes, options, cropped):
    """Read, check and preprocess one case and add its slices to the cache (unless a crop was already refused);
    returns ``(slices, labelled voxels outside the window)`` and records the latter in ``cropped``."""
    value_to_class = {value: (classes.index(name) if name in classes else 0) for name, value in dataset.labels.items()}
    image = load_image(case.image)
    label = None
    if case.label is not None:
        label = load_label(case.label)
        check_same_grid(image, label)
    slices, label_slices, params = preprocess_volume(image, label, dataset.modality, options.preprocess, value_to_class)
    lost = int(params.get("cropped_label_voxels", 0))
    if lost:
        cropped[role][case.case_id] = lost
    entry = {
        "case_id": case.case_id,
        "image": str(Path(case.image).resolve()),
        "label": str(Path(case.label).resolve()) if case.label is not None else None,
        "inverse": params,
    }
    if case.label is not None:  # `mkd evaluate` scores this file: it must still be this one
        entry["label_file"] = file_record(case.label)
    if options.allow_crop or not any(cropped.values()):  # once refused, only count
        writer.add_volume(role, slices, label_slices, split, has_label, entry)
    return slices.shape[0], lost


def _check_crop(cropped, options):
    """Fail in one line when the window cut labelled voxels off and ``--allow-crop`` was not given."""
    losses = _losses(cropped)
    if losses and not options.allow_crop:
        config = options.preprocess
        spacing = ",".join(f"{s:g}" for s in config.spacing)
        fail(
            f"--size {config.size}",
            f"the {config.size}x{config.size} window at --spacing {spacing} mm cuts off "
            f"labelled voxels: {losses}; use a larger --size or a coarser --spacing, or --allow-crop to "
            f"accept the loss",
        )


def _losses(cropped):
    """`"target ct_train_1001 loses 36, ..."` from role -> case id -> cropped labelled voxels."""
    return ", ".join(
        f"{role} {case_id} loses {count}"
        for role in ROLES
        if isinstance(cropped.get(role), dict)
        for case_id, count in cropped[role].items()
    )


def _field(record, *keys):
    """``record[k1][k2]...``, or `"?"` when a (hand-edited) manifest lacks it."""
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return "?"
        record = record[key]
    return record


def cache_summary(cache: SliceCache) -> str:
    """Human-readable summary of a :class:`mkd_tf.data.cache.SliceCache` (what `mkd info` prints)."""
    manifest = cache.manifest
    lines = [
        f"slice cache {cache.path}  ({manifest.get('created', '?')}, mkd-tf {manifest.get('mkd_tf_version', '?')})"
    ]
    lines.append(
        f"  slices {cache.size}x{cache.size}, spacing {_field(manifest, 'preprocess', 'spacing')} mm, "
        f"axis {_field(manifest, 'preprocess', 'axis')}, split seed {_field(manifest, 'split', 'seed')}"
    )
    lines.append(f"  classes ({cache.num_classes}): {', '.join(cache.classes)}")
    crop = manifest.get("crop")
    if isinstance(crop, dict) and isinstance(crop.get("dropped_label_voxels"), dict):
        losses = _losses(crop["dropped_label_voxels"])
        if losses:
            lines.append(f"  cropped with --allow-crop, labelled voxels outside the window: {losses}")
    for role in ROLES:
        modality = cache.modality(role)
        lines.append(f"  {role} [{_field(modality, 'name')}, {_field(modality, 'layout')}] {_field(modality, 'root')}")
        for split in SPLITS:
            volumes = cache.volumes(role, split)
            if not volumes:
                continue
            labelled = sum(v["labelled"] for v in volumes)
            slices = sum(v["slices"][1] - v["slices"][0] for v in volumes)
            lines.append(
                f"    {split:5s}: {len(volumes)} cases ({labelled} labelled, {len(volumes) - labelled} "
                f"unlabelled), {slices} slices"
            )
        labels = cache.labels(role)
        rows = cache.indices(role, labelled=True)
        counts = np.zeros(cache.num_classes, np.int64)
        for start in range(0, len(rows), 256):
            counts += np.bincount(labels[rows[start : start + 256]].ravel(), minlength=cache.num_classes)[
                : cache.num_classes
            ]  # an index beyond the classes can only come from an unverified, altered file
        lines.append(
            "    voxels per structure (labelled slices): "
            + ", ".join(f"{name} {int(count)}" for name, count in zip(cache.classes[1:], counts[1:]))
        )
    return "\n".join(lines)
