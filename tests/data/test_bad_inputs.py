"""Hostile inputs to `mkd phantom`, `mkd prepare` and `mkd info`, through the CLI.

The bar for every case: exit status 2, one stderr line `error: <file or option>: <problem>` (no
traceback), nothing written at any output path (nor a hidden staging folder next to it), and nothing the
project did not create deleted or replaced. A successful run removes stale staging/retired siblings of
its own output, and nothing else.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mkd_tf.data.cache import SliceCache
from mkd_tf.data.nifti import load_label
from tests.cli.test_data_cli import _ok, _one_line_error, _prepare_args, _run
from tests.conftest import NNUNET_TARGET_LABELS, case_files, copy_phantom, leftovers, write_nnunet


def _tree(folder):
    """Every path under ``folder`` with its bytes (files) or None (folders, links): to prove nothing changed."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or folder.is_file():
        return {".": os.readlink(folder) if folder.is_symlink() else folder.read_bytes()}
    return {
        str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _args(phantom_root, out, *extra):
    return _prepare_args(phantom_root / "ct_train", phantom_root / "mr_train", out, *extra)


@pytest.fixture(scope="module")
def good_cache(phantom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_inputs") / "cache"
    _ok(_run(*_args(phantom_root, out)))
    return out


# --- 1. --overwrite replaces only a slice cache -----------------------------------------------------


def _user_folder(path):
    path.mkdir()
    (path / "thesis.txt").write_text("four years of work")
    return "it has no manifest.json"


def _cache_with_user_file(path, good_cache):
    shutil.copytree(good_cache, path)
    (path / "thesis.txt").write_text("four years of work")
    return "it holds thesis.txt, which a slice cache does not"


def _foreign_manifest(path):
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"format": "someone-elses", "files": {}}))
    (path / "data.bin").write_bytes(b"\x00" * 10)
    return "its manifest.json is not an mkd-slice-cache manifest"


def _regular_file(path):
    path.write_text("not a folder")
    return "it is a file, not a folder"


def _link_to_cache(path, good_cache):
    real = path.with_name("real_cache")
    shutil.copytree(good_cache, real)
    path.symlink_to(real, target_is_directory=True)
    return "it is a symbolic link"


NOT_CACHES = {
    "user_folder": lambda path, cache: _user_folder(path),
    "cache_holding_a_user_file": _cache_with_user_file,
    "foreign_manifest": lambda path, cache: _foreign_manifest(path),
    "regular_file": lambda path, cache: _regular_file(path),
    "symlink_to_a_cache": _link_to_cache,
}


@pytest.mark.parametrize("name", list(NOT_CACHES))
def test_overwrite_never_replaces_what_is_not_a_slice_cache(phantom_root, good_cache, tmp_path, name):
    out = tmp_path / "out"
    reason = NOT_CACHES[name](out, good_cache)
    before = {p.name: _tree(p) for p in tmp_path.iterdir()}
    message = _one_line_error(_run(*_args(phantom_root, out, "--overwrite")))
    assert message == (
        f"{out}: --overwrite replaces only a slice cache, and this is not one ({reason}); nothing was changed"
    )
    assert {p.name: _tree(p) for p in tmp_path.iterdir()} == before
    # Without --overwrite it is not suggested as the way out.
    message = _one_line_error(_run(*_args(phantom_root, out)))
    assert message == f"{out}: already exists and is not a slice cache ({reason}); choose another --out"
    assert {p.name: _tree(p) for p in tmp_path.iterdir()} == before


def test_overwrite_still_replaces_a_cache_even_a_damaged_one(phantom_root, good_cache, tmp_path):
    out = Path(shutil.copytree(good_cache, tmp_path / "cache"))
    (out / "target" / "images.f32").write_bytes(b"truncated")
    _ok(_run(*_args(phantom_root, out, "--overwrite", "--seed", 4)))
    assert SliceCache(out).manifest["split"]["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# --- 2. a window that cuts off labelled voxels ------------------------------------------------------

CROP = ["--size", "16"]  # the phantom's hearts are wider than 16 x 4.8 mm: every case loses some voxels


def test_crop_that_drops_labels_is_refused_with_counts_per_case(phantom_root, tmp_path):
    out = tmp_path / "cache"
    message = _one_line_error(_run(*_args(phantom_root, out, *CROP)))
    prefix = "--size 16: the 16x16 window at --spacing 4.8,4.8,7.5 mm cuts off labelled voxels: "
    assert message.startswith(prefix), message
    assert message.endswith("; use a larger --size or a coarser --spacing, or --allow-crop to accept the loss")
    # The counts are those --allow-crop records (checked against the files below).
    _ok(_run(*_args(phantom_root, tmp_path / "allowed", *CROP, "--allow-crop")))
    dropped = SliceCache(tmp_path / "allowed").manifest["crop"]["dropped_label_voxels"]
    expected = ", ".join(
        f"{role} {case} loses {count}" for role in ("target", "assistant") for case, count in dropped[role].items()
    )
    assert len(dropped["target"]) == 3 and len(dropped["assistant"]) == 2
    assert (
        message == prefix + expected + "; use a larger --size or a coarser --spacing, or --allow-crop to "
        "accept the loss"
    )
    assert not out.exists() and leftovers(out) == []


def test_allow_crop_reports_and_records_what_was_lost(phantom_root, tmp_path):
    out = tmp_path / "cache"
    printed = _ok(_run(*_args(phantom_root, out, *CROP, "--allow-crop")))
    cache = SliceCache(out)
    crop = cache.manifest["crop"]
    assert crop["allow_crop"] is True
    for role in ("target", "assistant"):
        for volume in cache.volumes(role):
            lost = volume["inverse"]["cropped_label_voxels"]
            assert lost > 0 and crop["dropped_label_voxels"][role][volume["case_id"]] == lost
            assert any(
                line.startswith(f"{role:9s} {volume['case_id']}")
                and line.endswith(f", {lost} labelled voxels outside the window")
                for line in printed.splitlines()
            )
            if role == "target":  # native CT spacing: the loss is the file's labels minus the cache's
                original = int((load_label(volume["label"]).data > 0).sum())
                kept = int((np.asarray(cache.labels(role)[slice(*volume["slices"])]) > 0).sum())
                assert lost == original - kept
    summary = _ok(_run("info", out))
    assert "  cropped with --allow-crop, labelled voxels outside the window: target ct_train_1001 loses " in summary
    assert printed.endswith(summary)


def test_no_crop_records_nothing_lost(good_cache):
    cache = SliceCache(good_cache)
    assert cache.manifest["crop"] == {"allow_crop": False, "dropped_label_voxels": {"target": {}, "assistant": {}}}
    assert all(v["inverse"]["cropped_label_voxels"] == 0 for v in cache.volumes("target"))
    assert "cropped" not in _ok(_run("info", good_cache))


# --- 3. a label file without its image --------------------------------------------------------------


def test_mmwhs_label_without_image_is_an_error(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    image, label = case_files(root, "ct", 1002)
    image.unlink()
    message = _one_line_error(_run(*_args(root, tmp_path / "cache")))
    assert message == f"{label}: label file without its image (expected {image})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_nnunet_label_without_image_is_an_error(phantom_root, tmp_path):
    target, _ = write_nnunet(tmp_path / "Dataset001_CT", phantom_root / "ct_train", NNUNET_TARGET_LABELS, "CT")
    image = target / "imagesTr" / "ct_train_1003_0000.nii.gz"
    image.unlink()
    message = _one_line_error(_run(*_prepare_args(target, phantom_root / "mr_train", tmp_path / "cache")))
    assert message == f"{target / 'labelsTr' / 'ct_train_1003.nii.gz'}: label file without its image (expected {image})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_CT"]


# --- 4. an output path under a regular file ----------------------------------------------------------


@pytest.mark.parametrize("below", ["cache", "a/b/cache"])
def test_out_below_a_regular_file(phantom_root, tmp_path, below):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    out = file / below
    message = _one_line_error(_run(*_args(phantom_root, out)))
    assert message == f"{out}: cannot create the slice cache: {file} is a file, not a folder"
    message = _one_line_error(_run("phantom", out, "--ct", 1, "--mr", 1, "--shape", "8,8,8"))
    assert message == f"{out}: cannot create the phantom: {file} is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and file.read_text() == "mine"


def test_folders_made_for_out_are_removed_when_prepare_fails(phantom_root, tmp_path):
    root = copy_phantom(phantom_root, tmp_path / "data")
    image = case_files(root, "mr", 1002)[0]  # the last volume: the writer has made its folders by then
    image.write_bytes(image.read_bytes()[:-100])
    message = _one_line_error(_run(*_args(root, tmp_path / "new" / "deeper" / "cache")))
    assert message.startswith(f"{image}: corrupt or truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# --- 5. option values ---------------------------------------------------------------------------------

BAD_PREPARE_OPTIONS = [
    # (option, value, the rest of "error: <option>: ...")
    ("--spacing", "0", "every voxel size must be > 0 mm, got '0'"),
    (
        "--spacing",
        "1e-300",
        (
            "every voxel size must be >= 0.01 mm (finer than any CT or MRI scanner resolves; a 100 mm field of "
            "view would become 1e+302 voxels across), got '1e-300'"
        ),
    ),
    (
        "--spacing",
        "1,1e-8,1",
        (
            "every voxel size must be >= 0.01 mm (finer than any CT or MRI scanner resolves; a 100 mm field of "
            "view would become 1e+10 voxels across), got '1,1e-8,1'"
        ),
    ),
    ("--spacing", "-1", "every voxel size must be > 0 mm, got '-1'"),
    ("--spacing", "1,1,0", "every voxel size must be > 0 mm, got '1,1,0'"),
    ("--spacing", "nan", "expected finite numbers, got 'nan'"),
    ("--spacing", "1,inf,1", "expected finite numbers, got '1,inf,1'"),
    ("--spacing", "1,2", "expected 3 numbers, got 2"),
    ("--split", "nan,0.5,0.5", "expected finite numbers, got 'nan,0.5,0.5'"),
    ("--split", "0.9,0.9,0.1", "the train,val,test fractions must add up to 1, not 1.9, got '0.9,0.9,0.1'"),
    ("--split", "-0.2,0.6,0.6", "fractions must be >= 0, got '-0.2,0.6,0.6'"),
    ("--split", "0,0,0", "the train,val,test fractions must add up to 1, not 0, got '0,0,0'"),
    (
        "--ct-window",
        "800,-200",
        "expected low,high HU with low < high (otherwise every voxel becomes one value), got '800,-200'",
    ),
    ("--ct-window", "100", "expected low,high HU with low < high (otherwise every voxel becomes one value), got '100'"),
    (
        "--percentiles",
        "99,1",
        "expected low,high with 0 <= low < high <= 100 (otherwise every voxel becomes one value), got '99,1'",
    ),
    (
        "--percentiles",
        "0,101",
        "expected low,high with 0 <= low < high <= 100 (otherwise every voxel becomes one value), got '0,101'",
    ),
    ("--size", "4", "4 is not in the range x>=8"),
    ("--size", "big", "'big' is not a valid integer range"),
    ("--target-labelled", "-1", "-1 is not in the range x>=0"),
    ("--axis", "oblique", "'oblique' is not one of 'axial', 'coronal', 'sagittal'"),
]


@pytest.mark.parametrize("option, value, problem", BAD_PREPARE_OPTIONS)
def test_bad_prepare_option_is_one_line_before_anything_is_written(phantom_root, tmp_path, option, value, problem):
    out = tmp_path / "new" / "cache"
    message = _one_line_error(_run(*_args(phantom_root, out, option, value)))
    assert message == f"{option}: {problem}"
    assert list(tmp_path.iterdir()) == []


BAD_PHANTOM_OPTIONS = [
    ("--shape", "8,8", "--shape: expected three integers >= 8 separated by commas, got '8,8'"),
    ("--shape", "1.5,8,8", "--shape: expected three integers >= 8 separated by commas, got '1.5,8,8'"),
    ("--shape", "4,4,4", "--shape: expected three integers >= 8 separated by commas, got '4,4,4'"),
    ("--shape", "nan", "--shape: expected three integers >= 8 separated by commas, got 'nan'"),
    ("--ct", "0", "--ct: 0 is not in the range x>=1"),
    ("--mr", "-1", "--mr: -1 is not in the range x>=1"),
    ("--seed", "-1", "--seed: -1 is not in the range x>=0"),
]


@pytest.mark.parametrize("option, value, problem", BAD_PHANTOM_OPTIONS)
def test_bad_phantom_option_is_one_line_before_anything_is_written(tmp_path, option, value, problem):
    message = _one_line_error(_run("phantom", tmp_path / "new" / "data", option, value))
    assert message == problem
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "spec, problem",
    [
        (
            [["ct_train_1001"]],
            'expected a JSON object {"target": {"train": [...], "val": [...], "test": [...]}, "assistant": ...}',
        ),
        ({"targets": {"train": ["ct_train_1001"]}}, 'unknown key "targets" (use target, assistant)'),
        ({"target": ["ct_train_1001"]}, '"target" must map train/val/test to lists of case ids'),
        ({"target": {"train": "ct_train_1001"}}, 'target "train" must be a list of case ids'),
        (None, "split file is a folder, expected a JSON file"),
    ],
)
def test_malformed_split_file(phantom_root, tmp_path, spec, problem):
    split = tmp_path / "split.json"
    if spec is None:
        split.mkdir()
    else:
        split.write_text(json.dumps(spec))
    message = _one_line_error(_run(*_args(phantom_root, tmp_path / "cache", "--split-file", split)))
    assert message == f"{split}: {problem}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.json"]


# --- 6. leftovers of a killed run ----------------------------------------------------------------------

KILLED_WRITER = """
import os, sys
import numpy as np
from mkd_tf.data.cache import CacheWriter
writer = CacheWriter(sys.argv[1], 48, overwrite=True)
writer.add_volume("target", np.zeros((2, 48, 48), np.float32), None, "train", False, {"case_id": "x"})
os._exit(9)  # like kill -9: no clean-up
"""


def _killed_prepare(out):
    """Leave the staging folder a `prepare` killed mid-write leaves (a real writer, a real process death)."""
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], check=False, timeout=120)


def test_next_successful_run_removes_stale_staging_and_retired_siblings(phantom_root, good_cache, tmp_path):
    out = tmp_path / "cache"
    _killed_prepare(out)
    staged = leftovers(out)
    assert len(staged) == 1 and staged[0].startswith(".cache.tmp-")
    shutil.copytree(good_cache, tmp_path / ".cache.old-0123abcd")  # an --overwrite killed before its clean-up
    # Look-alikes that are not ours to delete.
    decoys = {
        ".cache.tmp-89abcdef": "thesis.txt",
        ".cache.tmp-notours1": "x",
        ".cache2.tmp-01234567": "x",
        "cache.tmp-01234567": "x",
        ".cache.old-0123abcd.bak": "x",
    }
    for name, file in decoys.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text("mine")
    (tmp_path / ".cache.old-deadbeef").write_text("a file, not a folder")
    _ok(_run(*_args(phantom_root, out)))
    SliceCache(out)
    assert leftovers(out) == [
        ".cache.old-0123abcd.bak",
        ".cache.old-deadbeef",
        ".cache.tmp-89abcdef",
        ".cache.tmp-notours1",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*decoys, ".cache.old-deadbeef", "cache"])
    assert all((tmp_path / name / file).read_text() == "mine" for name, file in decoys.items())


def test_overwrite_run_removes_stale_siblings_too(phantom_root, good_cache, tmp_path):
    out = Path(shutil.copytree(good_cache, tmp_path / "cache"))
    _killed_prepare(out)
    shutil.copytree(good_cache, tmp_path / ".cache.old-00000000")
    assert len(leftovers(out)) == 2
    _ok(_run(*_args(phantom_root, out, "--overwrite", "--seed", 2)))
    assert leftovers(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert SliceCache(out).manifest["split"]["seed"] == 2


def test_a_failed_run_leaves_stale_siblings_alone(phantom_root, tmp_path):
    out = tmp_path / "cache"
    _killed_prepare(out)
    staged = leftovers(out)
    _one_line_error(_run(*_args(phantom_root, out, "--spacing", "0")))
    assert leftovers(out) == staged


# --- info on hand-edited manifests -------------------------------------------------------------------


MANIFEST_EDITS = {
    "files_outside_the_cache": (
        lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0"}}),
        "key 'files' lists '../../etc/passwd', which is not a slice cache file",
    ),
    "slice_count": (
        lambda m: m["modalities"]["target"].update(slices=1000),
        "key 'files.target/images.f32': 442368 bytes, but 'modalities.target.slices' (1000) of 48x48 need 9216000",
    ),
    "no_modalities": (lambda m: m.pop("modalities"), "key 'modalities' is missing"),
    "size_text": (lambda m: m.update(size="48"), "key 'size' must be a whole number, got str"),
    "volume_record": (
        lambda m: m["modalities"]["target"]["volumes"][0].pop("slices"),
        "key 'modalities.target.volumes[0].slices' is missing",
    ),
}


@pytest.mark.parametrize("name", list(MANIFEST_EDITS))
def test_info_on_a_hand_edited_manifest_is_one_line(good_cache, tmp_path, name):
    edit, problem = MANIFEST_EDITS[name]
    cache = Path(shutil.copytree(good_cache, tmp_path / "cache"))
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    message = _one_line_error(_run("info", cache))
    assert message.startswith(f"{cache / 'manifest.json'}: {problem}"), message


def test_info_without_informative_keys_still_prints(good_cache, tmp_path):
    cache = Path(shutil.copytree(good_cache, tmp_path / "cache"))
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["split"], manifest["modalities"]["target"]["layout"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    out = _ok(_run("info", cache))
    assert "axis 2, split seed ?" in out and "  target [ct, ?]" in out


def test_info_on_a_file(tmp_path):
    (tmp_path / "cache").write_text("x")
    assert (
        _one_line_error(_run("info", tmp_path / "cache")) == f"{tmp_path / 'cache'}: not a slice cache (a file, "
        "not a folder)"
    )


# --- the installed command, in a real process ----------------------------------------------------------


def test_installed_mkd_overwrite_of_a_user_folder_exits_2_with_one_line(phantom_root, tmp_path):
    mkd = Path(sys.executable).with_name("mkd")
    out = tmp_path / "thesis"
    _user_folder(out)
    args = [str(a) for a in _args(phantom_root, out, "--overwrite")]
    result = subprocess.run(
        [str(mkd), *args], capture_output=True, text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: {out}: --overwrite replaces only a slice cache, and this is not one (it has no "
        "manifest.json); nothing was changed\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]
    assert (out / "thesis.txt").read_text() == "four years of work"
