"""Shared fixtures: one tiny phantom per session and helpers that build datasets from it.

The phantom is written once (3 CT + 2 MRI cases, CT grid 32 x 32 x 16 at 4.8 x 4.8 x 7.5 mm, MRI grid
26 x 26 x 13 at 6 x 6 x 9 mm with permuted, flipped axes) and must never be modified: a test that
breaks files works on a copy (:func:`copy_phantom`).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

# Same seeds, kernels and reduction order: a model a test trains eagerly is the same in every run
# (tests/test_training.py checks it for MKD), so a threshold on it either always holds or never does.
# Compiled steps are not quite: MKD's distillation steps differ now and then in the seventh digit,
# through Grappler's rewrites (benchmarks/determinism.py), far inside every threshold's margin; with the
# rewrites off as well (`deterministic: true`) they are the same too (tests/test_training.py checks it).
tf.config.experimental.enable_op_determinism()

from mkd_tf.data.layouts import MMWHS_LABELS
from mkd_tf.data.nifti import load_label, save_volume
from mkd_tf.data.phantom import write_phantom
from mkd_tf.data.preprocess import PreprocessConfig

# Scripts run in subprocesses (multi-worker jobs): not test modules, and `--doctest-modules` must not
# import them (they start a cluster at import).
collect_ignore_glob = ["scripts/*"]

# `make test` runs `-n 2 --dist loadfile`: a worker takes a whole file at a time, and the wall time is that
# of the worker that ends last. So the longest files start first, longest first (measured with --durations;
# relative cost), and the short ones fill in at the end. xdist's own order (most tests first) queued the
# demo's file last, where it ran alone for minutes: pytest_configure turns it off.
LONGEST_FIRST = (
    "tests/test_training.py",
    "tests/models/test_mkd.py",
    "tests/test_multi_worker.py",
    "tests/export/test_serving.py",
    "tests/test_training_bad_inputs.py",
    "tests/cli/test_method_cli.py",
    "tests/test_python_api.py",
    "tests/cli/test_demo_cli.py",
    "tests/models/test_alignment.py",
    "tests/export/test_tflite.py",
    "tests/test_inference.py",
    "tests/models/test_moving_average.py",
    "tests/models/test_ummkd.py",
    "tests/test_evaluation.py",
    "tests/models/test_segmentor.py",
    "tests/cli/test_predict_cli.py",
    "tests/export/test_client.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist's --no-loadscope-reorder: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Order the files :data:`LONGEST_FIRST`, then the others in collection order (a stable sort)."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


PHANTOM_SHAPE = (32, 32, 16)
PHANTOM_CT, PHANTOM_MR = 3, 2
# Native CT spacing of the phantom (RAS order): with it, the cache is the CT grid itself.
CT_SPACING = (4.8, 4.8, 7.5)
# Native MRI spacing in canonical RAS order.
MR_SPACING = (6.0, 6.0, 9.0)
# A slice large enough to hold every resampled plane used in the tests (at most 38 x 38).
FAST_SIZE = 48
FAST_CONFIG = PreprocessConfig(spacing=CT_SPACING, size=FAST_SIZE)
# The same as `mkd prepare` options.
FAST_ARGS = ["--spacing", ",".join(str(s) for s in CT_SPACING), "--size", str(FAST_SIZE)]

# nnU-Net label tables with the same structure names but different ids per modality.
NNUNET_TARGET_LABELS = {
    "background": 0,
    "myocardium": 1,
    "left_atrium": 2,
    "left_ventricle": 3,
    "right_atrium": 4,
    "right_ventricle": 5,
    "ascending_aorta": 6,
    "pulmonary_artery": 7,
}
NNUNET_ASSISTANT_LABELS = {
    "background": 0,
    "left_ventricle": 1,
    "pulmonary_artery": 2,
    "myocardium": 3,
    "ascending_aorta": 4,
    "right_atrium": 5,
    "left_atrium": 6,
    "right_ventricle": 7,
}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """Read-only MM-WHS-layout phantom root holding `ct_train/` and `mr_train/`."""
    return write_phantom(
        tmp_path_factory.mktemp("phantom") / "data", n_ct=PHANTOM_CT, n_mr=PHANTOM_MR, shape=PHANTOM_SHAPE
    )


def copy_phantom(phantom_root, destination):
    """A private, writable copy of the phantom root (a few hundred kB)."""
    return Path(shutil.copytree(phantom_root, destination))


def case_files(root, modality, number):
    """`(image, label)` paths of an MM-WHS-layout phantom case, e.g. `("ct", 1001)`."""
    folder = Path(root) / f"{modality}_train"
    return (folder / f"{modality}_train_{number}_image.nii.gz", folder / f"{modality}_train_{number}_label.nii.gz")


def write_nnunet(folder, mmwhs_folder, labels, channel, drop_label_of=()):
    """Build an nnU-Net v2 raw dataset from MM-WHS-layout phantom volumes.

    Args:
        folder: the `DatasetXXX_Name` folder to create.
        mmwhs_folder: a phantom modality folder (`ct_train/`).
        labels: name -> id in this dataset; MM-WHS values are renamed by name, names not listed
            become background.
        channel: `channel_names["0"]`, e.g. `"CT"`.
        drop_label_of: case ids written without a label file.

    Returns:
        `(folder, {case_id: mmwhs_image_path})`.
    """
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    # Names the phantom does not draw (e.g. an extra structure) are listed but never painted.
    value_of = {MMWHS_LABELS[name]: value for name, value in labels.items() if name in MMWHS_LABELS}
    sources = {}
    for image in sorted(Path(mmwhs_folder).glob("*_image.nii.gz")):
        case_id = image.name[: -len("_image.nii.gz")]
        sources[case_id] = image
        shutil.copy(image, folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        if case_id in drop_label_of:
            continue
        mmwhs = load_label(image.with_name(image.name.replace("_image.", "_label.")))
        lookup = np.zeros(max(MMWHS_LABELS.values()) + 1, np.uint8)
        for value, new in value_of.items():
            lookup[value] = new
        save_volume(folder / "labelsTr" / f"{case_id}.nii.gz", lookup[mmwhs.data], mmwhs.affine, np.uint8)
    spec = {"channel_names": {"0": channel}, "labels": labels, "numTraining": len(sources), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(spec, indent=1))
    return folder, sources


def cache_entry(case_id, size):
    """A per-volume record as `mkd prepare` writes it (file paths and the inverse of preprocessing), for a
    cache written by hand with :class:`~mkd_tf.data.cache.CacheWriter`."""
    inverse = {
        "original_shape": [size, size, 4],
        "original_affine": np.eye(4).tolist(),
        "ornt": [[0, 1], [1, 1], [2, 1]],
        "canonical_shape": [size, size, 4],
        "canonical_spacing": [1.0, 1.0, 1.0],
        "spacing": [1.0, 1.0, 1.0],
        "resampled_shape": [size, size, 4],
        "axis": 2,
        "plane_axes": [0, 1],
        "crop_start": [0, 0],
        "size": size,
        "intensity": {"kind": "ct", "window": [-200.0, 800.0]},
    }
    return {
        "case_id": case_id,
        "image": f"{case_id}_image.nii.gz",
        "label": f"{case_id}_label.nii.gz",
        "inverse": inverse,
    }


def cache_manifest(size, classes, **extra):
    """A manifest as `mkd prepare` starts it (the writer adds files, slice counts and volumes)."""
    preprocess = {
        "spacing": [1.0, 1.0, 1.0],
        "size": size,
        "axis": 2,
        "ct_window": [-200.0, 800.0],
        "percentiles": [0.5, 99.5],
    }
    label_values = {name: value for value, name in enumerate(classes)}
    modalities = {role: {"name": role, "label_values": label_values} for role in ("target", "assistant")}
    return {"classes": classes, "preprocess": preprocess, "modalities": modalities, **extra}


def leftovers(out):
    """Hidden staging/retired siblings of a cache folder `out` (`.NAME.tmp-*`, `.NAME.old-*`)."""
    out = Path(out)
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def dice(a, b):
    """Dice of two boolean masks (1 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
