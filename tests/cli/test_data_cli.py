"""`mkd phantom`, `mkd prepare`, `mkd info`: the happy paths and one-line errors for every bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mkd_cli.main import main
from mkd_tf.data.cache import SliceCache
from mkd_tf.data.layouts import MMWHS_LABELS
from mkd_tf.data.nifti import load_image, load_label, save_volume
from mkd_tf.data.preprocess import labels_to_original
from tests.conftest import (
    FAST_ARGS,
    NNUNET_ASSISTANT_LABELS,
    NNUNET_TARGET_LABELS,
    PHANTOM_SHAPE,
    case_files,
    copy_phantom,
    leftovers,
    write_nnunet,
)

MKD = Path(sys.executable).with_name("mkd")


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def _one_line_error(result):
    """The error line (without `error: `), after checking exit status 2, one stderr line, no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0][len("error: ") :]


def _prepare_args(target, assistant, out, *extra):
    return ["prepare", "--target", target, "--assistant", assistant, "--out", out, *FAST_ARGS, *extra]


def _summary_numbers(cache):
    """What `mkd info` must say about ``cache``, computed from its arrays."""
    lines = []
    for role in ("target", "assistant"):
        labels = np.asarray(cache.labels(role))[cache.indices(role, labelled=True)]
        counts = np.bincount(labels.ravel(), minlength=cache.num_classes)
        lines.append(
            "    voxels per structure (labelled slices): "
            + ", ".join(f"{name} {count}" for name, count in zip(cache.classes[1:], counts[1:]))
        )
    return lines


# --- help ------------------------------------------------------------------------------------------


def test_top_level_help_lists_the_data_commands():
    out = " ".join(_ok(_run("--help")).split())
    for command in ("phantom", "prepare", "info"):
        assert f" {command} " in out
    assert "--version" in out


@pytest.mark.parametrize("command", ["phantom", "prepare", "info"])
def test_every_option_shows_its_default(command):
    out = " ".join(_ok(_run(command, "--help")).split())  # undo line wrapping
    for param in main.commands[command].params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        assert param.opts[-1] in out
        if param.required:
            assert "[required]" in out
        elif param.is_flag or param.default is None:
            continue  # a flag is off unless given; None defaults are explained in the help text
        else:
            assert f"[default: {param.default}" in out, (command, param.name)
    if command == "prepare":
        assert "[default: 256; x>=8]" in out
        assert "[default: 1.5]" in out and "[default: 0.6,0.2,0.2]" in out and "[default: all]" in out
        assert "default: all" in out.split("--target-labelled")[1].split("--seed")[0]
    if command == "phantom":
        assert "default 96,96,48 (cardiac) or 96,80,32 (abdomen)" in out and "[default: 6; x>=1]" in out
        assert "--anatomy [cardiac|abdomen]" in out and "[default: cardiac]" in out


# --- phantom -> prepare -> info --------------------------------------------------------------------


def test_phantom_prepare_info_on_mmwhs_folders(phantom_root, tmp_path):
    shape = ",".join(str(n) for n in PHANTOM_SHAPE)
    out = _ok(_run("phantom", tmp_path / "data", "--ct", 3, "--mr", 2, "--shape", shape))
    assert out.startswith(f"phantom: 3 CT + 2 MRI cases in {tmp_path / 'data'}")
    # The command writes what the library writes.
    for modality, number in (("ct", 1003), ("mr", 1002)):
        for mine, reference in zip(
            case_files(tmp_path / "data", modality, number), case_files(phantom_root, modality, number)
        ):
            assert mine.read_bytes() == reference.read_bytes()

    out = _ok(_run(*_prepare_args(tmp_path / "data" / "ct_train", tmp_path / "data" / "mr_train", tmp_path / "cache")))
    progress = [line for line in out.splitlines() if line.startswith(("target ", "assistant "))]
    assert len(progress) == 5 and progress[0].split()[:2] == ["target", "ct_train_1001"]
    summary = out[out.index("slice cache ") :]
    assert _ok(_run("info", tmp_path / "cache")) == summary
    assert _ok(_run("info", tmp_path / "cache", "--no-verify")) == summary

    cache = SliceCache(tmp_path / "cache")
    assert f"classes (8): {', '.join(MMWHS_LABELS)}" in summary
    assert "slices 48x48, spacing [4.8, 4.8, 7.5] mm, axis 2, split seed 0" in summary
    assert "  target [ct, mmwhs]" in summary and "  assistant [mr, mmwhs]" in summary
    for split in ("train", "val", "test"):
        assert f"    {split:5s}: 1 cases (1 labelled, 0 unlabelled), 16 slices" in summary
    assert "    train: 2 cases (2 labelled, 0 unlabelled), 30 slices" in summary
    for line in _summary_numbers(cache):
        assert line in summary.splitlines()


def test_mmwhs_root_with_modality_options_equals_modality_folders(phantom_root, tmp_path):
    _ok(
        _run(
            *_prepare_args(
                phantom_root,
                phantom_root,
                tmp_path / "root_cache",
                "--target-modality",
                "ct",
                "--assistant-modality",
                "mr",
            )
        )
    )
    _ok(_run(*_prepare_args(phantom_root / "ct_train", phantom_root / "mr_train", tmp_path / "folder_cache")))
    from_root, from_folders = SliceCache(tmp_path / "root_cache"), SliceCache(tmp_path / "folder_cache")
    for role in ("target", "assistant"):
        np.testing.assert_array_equal(np.asarray(from_root.images(role)), np.asarray(from_folders.images(role)))
        np.testing.assert_array_equal(np.asarray(from_root.labels(role)), np.asarray(from_folders.labels(role)))
        assert from_root.modality(role)["root"] == from_folders.modality(role)["root"]
    # An MRI target and a CT assistant from the same root.
    _ok(
        _run(
            *_prepare_args(
                phantom_root,
                phantom_root,
                tmp_path / "swapped",
                "--target-modality",
                "mr",
                "--assistant-modality",
                "ct",
            )
        )
    )
    swapped = SliceCache(tmp_path / "swapped")
    assert (swapped.modality("target")["name"], swapped.modality("assistant")["name"]) == ("mr", "ct")
    assert len(swapped.volumes("target")) == 2 and len(swapped.volumes("assistant")) == 3


def test_prepare_info_on_nnunet_with_different_ids_per_modality(phantom_root, tmp_path):
    target, _ = write_nnunet(tmp_path / "Dataset001_CT", phantom_root / "ct_train", NNUNET_TARGET_LABELS, "CT")
    assistant, _ = write_nnunet(tmp_path / "Dataset002_MR", phantom_root / "mr_train", NNUNET_ASSISTANT_LABELS, "MR")
    out = _ok(_run(*_prepare_args(target, assistant, tmp_path / "cache")))
    summary = _ok(_run("info", tmp_path / "cache"))
    assert out.endswith(summary)
    assert "  target [ct, nnunet]" in summary and "  assistant [mr, nnunet]" in summary
    cache = SliceCache(tmp_path / "cache")
    for line in _summary_numbers(cache):
        assert line in summary.splitlines()
    # Per modality, each structure's voxels in the cache are that structure's voxels in the files. CT is
    # at native spacing (the cache holds its voxels); MRI is upsampled 6 x 6 x 9 -> 4.8 x 4.8 x 7.5 mm by
    # nearest neighbour, so its cache labels are mapped back to the file grid (exact for upsampling).
    for role, ids in (("target", NNUNET_TARGET_LABELS), ("assistant", NNUNET_ASSISTANT_LABELS)):
        in_files, in_cache = np.zeros(8, np.int64), np.zeros(8, np.int64)
        for volume in cache.volumes(role):
            original = load_label(volume["label"]).data
            labels = np.asarray(cache.labels(role)[slice(*volume["slices"])])
            if role == "assistant":
                labels = labels_to_original(labels, volume["inverse"])
            for index, name in enumerate(cache.classes):
                in_files[index] += int((original == ids[name]).sum())
                in_cache[index] += int((labels == index).sum())
        # Every structure has its own count, so a mix-up of ids could not pass unnoticed.
        assert len(set(in_files[1:].tolist())) == 7 and in_files[1:].min() > 0
        np.testing.assert_array_equal(in_cache[1:], in_files[1:], err_msg=role)
    # The assistant's ids really are permuted relative to the target's.
    assert [NNUNET_ASSISTANT_LABELS[n] for n in cache.classes] == [0, 3, 6, 1, 5, 7, 4, 2]


def test_four_structures(phantom_root, tmp_path):
    out = _ok(
        _run(
            *_prepare_args(
                phantom_root / "ct_train", phantom_root / "mr_train", tmp_path / "cache", "--structures", "4"
            )
        )
    )
    assert "classes (5): background, myocardium, left_atrium, left_ventricle, ascending_aorta" in out
    cache = SliceCache(tmp_path / "cache")
    for role in ("target", "assistant"):
        assert set(np.unique(np.asarray(cache.labels(role)))) == {0, 1, 2, 3, 4}
    for volume in cache.volumes("target"):
        start, end = volume["slices"]
        labels = np.asarray(cache.labels("target")[start:end])
        original = load_label(volume["label"]).data  # native spacing: counts are exact
        for index, name in enumerate(cache.classes[1:], start=1):
            assert (labels == index).sum() == (original == MMWHS_LABELS[name]).sum()
        # Right atrium, right ventricle and pulmonary artery voxels are background now.
        other = np.isin(original, [550, 600, 850]).sum()
        assert (labels == 0).sum() == labels.size - (np.isin(original, [205, 420, 500, 820]).sum())
        assert other > 0


def test_split_file_and_target_labelled(phantom_root, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"target": {"train": ["ct_train_1002", "ct_train_1003"], "test": ["ct_train_1001"]}}))
    out = _ok(
        _run(
            *_prepare_args(
                phantom_root / "ct_train",
                phantom_root / "mr_train",
                tmp_path / "cache",
                "--split-file",
                split,
                "--target-labelled",
                0,
            )
        )
    )
    assert "    train: 2 cases (0 labelled, 2 unlabelled), 32 slices" in out
    assert "    test : 1 cases (1 labelled, 0 unlabelled), 16 slices" in out
    cache = SliceCache(tmp_path / "cache")
    assert {v["case_id"]: (v["split"], v["labelled"]) for v in cache.volumes("target")} == {
        "ct_train_1001": ("test", True),
        "ct_train_1002": ("train", False),
        "ct_train_1003": ("train", False),
    }
    assert cache.indices("target", "train", labelled=True).size == 0
    assert cache.manifest["split"]["file"] == str(split) and cache.manifest["split"]["target_labeled"] == 0


def test_ignore_unmatched_keeps_only_common_names(phantom_root, tmp_path):
    target_labels = dict(NNUNET_TARGET_LABELS, coronary_artery=9)
    assistant_labels = {k: v for k, v in NNUNET_ASSISTANT_LABELS.items() if k != "pulmonary_artery"}
    target, _ = write_nnunet(tmp_path / "t", phantom_root / "ct_train", target_labels, "CT")
    assistant, _ = write_nnunet(tmp_path / "a", phantom_root / "mr_train", assistant_labels, "MR")
    message = _one_line_error(_run(*_prepare_args(target, assistant, tmp_path / "cache")))
    assert message.startswith(f"{target / 'dataset.json'}: label names do not match across modalities")
    assert "pulmonary_artery" in message and "coronary_artery" in message and "--ignore-unmatched" in message
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []

    out = _ok(_run(*_prepare_args(target, assistant, tmp_path / "cache", "--ignore-unmatched")))
    common = [
        "background",
        "myocardium",
        "left_atrium",
        "left_ventricle",
        "right_atrium",
        "right_ventricle",
        "ascending_aorta",
    ]
    assert f"classes (7): {', '.join(common)}" in out
    cache = SliceCache(tmp_path / "cache")
    assert cache.classes == common
    # The target's pulmonary artery (7 in its files) is background in the cache.
    volume = cache.volumes("target")[0]
    labels = np.asarray(cache.labels("target")[slice(*volume["slices"])])
    original = load_label(volume["label"]).data
    assert (original == 7).sum() > 0
    assert (labels > 0).sum() == ((original > 0) & (original != 7)).sum()  # native spacing: exact counts


# --- bad inputs: one line, status 2, nothing written ---------------------------------------------------


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rewrite_image(path, change, dtype=np.float32):
    volume = load_image(path)
    save_volume(path, change(volume.data.copy()), volume.affine, dtype)


def _nan(data):
    data[3, 4, 5] = np.nan
    data[6, 7, 8] = np.inf
    return data


def _label_77(path):
    volume = load_label(path)
    data = volume.data.copy()
    data[10, 10, 10] = 77
    save_volume(path, data, volume.affine, np.uint16)


def _four_d(path):
    volume = load_image(path)
    nib.save(nib.Nifti1Image(np.stack([volume.data, volume.data], axis=-1), volume.affine), str(path))


def _shifted_affine(path):
    volume = load_label(path)
    affine = volume.affine.copy()
    affine[:3, 3] += [3.0, 0.0, 0.0]
    save_volume(path, volume.data, affine, np.uint16)


BAD_FILES = {
    # name: (modality, case, image or label, how to break it, problem)
    "corrupt_gzip": ("ct", 1002, 0, _truncate, "corrupt or truncated"),
    "not_nifti": ("mr", 1001, 0, lambda p: p.write_bytes(b"<html>not an image</html>\n"), "not a NIfTI file"),
    "four_d": ("ct", 1003, 0, _four_d, "expected a 3-D volume, got shape (32, 32, 16, 2)"),
    "shape_mismatch": (
        "ct",
        1001,
        1,
        lambda p: save_volume(p, load_label(p).data[:, :, :-1], load_label(p).affine, np.uint16),
        "shape (32, 32, 15) does not match image",
    ),
    "affine_mismatch": ("mr", 1002, 1, _shifted_affine, "affine differs from image"),
    "label_not_in_mapping": ("mr", 1002, 1, _label_77, "unknown label values [77]"),
    "nan_voxels": ("ct", 1002, 0, lambda p: _rewrite_image(p, _nan), "2 NaN/Inf voxels"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_one_line_and_writes_nothing(phantom_root, tmp_path, name):
    modality, number, which, breaker, problem = BAD_FILES[name]
    root = copy_phantom(phantom_root, tmp_path / "data")
    bad = case_files(root, modality, number)[which]
    breaker(bad)
    out = tmp_path / "cache"
    message = _one_line_error(_run(*_prepare_args(root / "ct_train", root / "mr_train", out)))
    assert message.startswith(f"{bad}: ") and problem in message, message
    assert not out.exists() and leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_missing_and_empty_folders(phantom_root, tmp_path):
    message = _one_line_error(_run(*_prepare_args(tmp_path / "nope", phantom_root / "mr_train", tmp_path / "c")))
    assert message == f"{tmp_path / 'nope'}: folder not found"
    (tmp_path / "empty").mkdir()
    message = _one_line_error(_run(*_prepare_args(phantom_root / "ct_train", tmp_path / "empty", tmp_path / "c")))
    assert message == f"{tmp_path / 'empty'}: folder is empty"
    message = _one_line_error(
        _run(*_prepare_args(phantom_root, phantom_root, tmp_path / "c", "--target-modality", "pet"))
    )
    assert message == f"{phantom_root}: no pet_train/ folder (found ct_train, mr_train)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"target": {"train": ["ct_train_1001"], "test": ["ct_train_4242"]}}, 'target case "ct_train_4242" is not in'),
        (
            {"target": {"train": ["ct_train_1001", "ct_train_1002"], "val": ["ct_train_1002"]}},
            'target case "ct_train_1002" is listed in both train and val',
        ),
    ],
)
def test_bad_split_file(phantom_root, tmp_path, spec, problem):
    split = tmp_path / "split.json"
    split.write_text(json.dumps(spec))
    message = _one_line_error(
        _run(
            *_prepare_args(
                phantom_root / "ct_train", phantom_root / "mr_train", tmp_path / "cache", "--split-file", split
            )
        )
    )
    assert message.startswith(f"{split}: ") and problem in message
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []


def test_too_many_labelled_target_volumes(phantom_root, tmp_path):
    message = _one_line_error(
        _run(
            *_prepare_args(
                phantom_root / "ct_train", phantom_root / "mr_train", tmp_path / "cache", "--target-labelled", 5
            )
        )
    )
    assert message == f"{phantom_root / 'ct_train'}: --target-labelled 5 but only 1 labelled training cases"
    assert not (tmp_path / "cache").exists()


def test_existing_cache_needs_overwrite(phantom_root, tmp_path):
    args = _prepare_args(phantom_root / "ct_train", phantom_root / "mr_train", tmp_path / "cache")
    _ok(_run(*args))
    manifest = (tmp_path / "cache" / "manifest.json").read_text()
    message = _one_line_error(_run(*args, "--seed", 3))
    assert message == f"{tmp_path / 'cache'}: already exists (use --overwrite to replace it)"
    assert (tmp_path / "cache" / "manifest.json").read_text() == manifest
    _ok(_run(*args, "--seed", 3, "--overwrite"))
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["split"]["seed"] == 3
    assert leftovers(tmp_path / "cache") == []


def test_bad_option_values_are_usage_errors(phantom_root, tmp_path):
    result = _run(
        *_prepare_args(phantom_root / "ct_train", phantom_root / "mr_train", tmp_path / "cache", "--split", "0.5,0.5")
    )
    assert _one_line_error(result) == "--split: expected 3 numbers, got 2"
    result = _run("prepare", "--target", "x", "--assistant", "y", "--out", "z", "--spacing", "one")
    assert _one_line_error(result).startswith("--spacing: expected numbers separated by commas")
    result = _run("phantom", tmp_path / "p", "--ct", 0)
    assert _one_line_error(result) == "--ct: 0 is not in the range x>=1"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "p").exists()


def test_a_size_too_large_for_memory_is_one_line_and_writes_nothing(phantom_root, tmp_path):
    """25 slices of 200000² float32 (3.6 TiB): numpy's MemoryError becomes one line, not a traceback."""
    args = _prepare_args(phantom_root / "ct_train", phantom_root / "mr_train", tmp_path / "cache")
    args[args.index("--size") + 1] = "200000"
    message = _one_line_error(_run(*args))
    assert message.startswith("out of memory: Unable to allocate ") and "use a smaller --size" in message
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []


def test_phantom_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    message = _one_line_error(_run("phantom", tmp_path / "data", "--ct", 1, "--mr", 1, "--shape", "8,8,8"))
    assert message == f"{tmp_path / 'data'}: exists and is not empty; choose a new folder for the phantom"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["keep.txt"]


def test_phantom_abdomen_writes_two_nnunet_datasets_that_prepare_matches_by_name(tmp_path):
    from mkd_tf.data.phantoms.abdomen import write_abdomen_phantom

    out = _ok(_run("phantom", tmp_path / "data", "--anatomy", "abdomen", "--ct", 2, "--mr", 2, "--shape", "48,40,16"))
    ct, mr = tmp_path / "data" / "Dataset501_AbdomenCT", tmp_path / "data" / "Dataset502_AbdomenMR"
    assert out == f"phantom: 2 CT + 2 MRI cases in {tmp_path / 'data'} ({ct.name}/, {mr.name}/)\n"
    # The command writes what the library writes (default seed 0).
    reference = write_abdomen_phantom(tmp_path / "reference", n_ct=2, n_mr=2, shape=(48, 40, 16))
    written = sorted(p.relative_to(tmp_path / "data") for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert len(written) == 10
    for name in written:
        assert (tmp_path / "data" / name).read_bytes() == (reference / name).read_bytes(), name
    # The two datasets number the organs differently; prepare matches them by name.
    assert json.loads((ct / "dataset.json").read_text())["labels"]["spleen"] == 4
    assert json.loads((mr / "dataset.json").read_text())["labels"]["spleen"] == 2
    args = ["--spacing", "9,9,10", "--size", 32, "--split", "0.5,0,0.5", "--target-labelled", 1]
    out = _ok(_run("prepare", "--target", ct, "--assistant", mr, "--out", tmp_path / "cache", *args))
    assert "classes (5): background, liver, kidney_right, kidney_left, spleen" in out
    assert "  target [ct, nnunet]" in out and "  assistant [t2, nnunet]" in out
    assert "train: 1 cases (1 labelled, 0 unlabelled)" in out


def test_phantom_unknown_anatomy_is_one_line_and_writes_nothing(tmp_path):
    message = _one_line_error(_run("phantom", tmp_path / "data", "--anatomy", "brain"))
    assert "--anatomy" in message and "'brain' is not one of 'cardiac', 'abdomen'" in message
    assert list(tmp_path.iterdir()) == []


# --- info on damaged caches ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_cache(phantom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "cache"
    _ok(_run(*_prepare_args(phantom_root / "ct_train", phantom_root / "mr_train", out)))
    return out


def test_info_refuses_a_truncated_cache_file(good_cache, tmp_path):
    cache = Path(shutil.copytree(good_cache, tmp_path / "cache"))
    file = cache / "target" / "images.f32"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: -48 * 48 * 4])
    message = _one_line_error(_run("info", cache))
    assert message == f"{file}: truncated or altered: {size - 48 * 48 * 4} bytes, manifest says {size}"
    assert _one_line_error(_run("info", cache, "--no-verify")) == message  # sizes are always checked


def test_info_refuses_a_tampered_cache_file(good_cache, tmp_path):
    cache = Path(shutil.copytree(good_cache, tmp_path / "cache"))
    file = cache / "assistant" / "labels.u8"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x04
    file.write_bytes(bytes(data))
    message = _one_line_error(_run("info", cache))
    assert message == f"{file}: checksum mismatch: the file changed since `mkd prepare` wrote it"
    _ok(_run("info", cache, "--no-verify"))  # same size: only the checksum notices


def test_info_refuses_a_cache_without_manifest(good_cache, tmp_path):
    cache = Path(shutil.copytree(good_cache, tmp_path / "cache"))
    (cache / "manifest.json").unlink()
    message = _one_line_error(_run("info", cache))
    assert message == f"{cache}: not a complete slice cache (no manifest.json); run `mkd prepare` again"
    assert _one_line_error(_run("info", tmp_path / "nope")) == f"{tmp_path / 'nope'}: slice cache not found"


# --- the installed command, in a real process ------------------------------------------------------------


def _real(*args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [str(MKD), *[str(a) for a in args]], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_installed_mkd_prepare_corrupt_gzip_exits_2_with_one_line(phantom_root, tmp_path):
    assert MKD.exists(), MKD
    root = copy_phantom(phantom_root, tmp_path / "data")
    bad = case_files(root, "mr", 1002)[0]
    bad.write_bytes(bad.read_bytes()[:-6])  # inside the gzip trailer: nibabel alone would not notice
    result = _real(*_prepare_args(root / "ct_train", root / "mr_train", tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    assert result.stderr.startswith(f"error: {bad}: corrupt or truncated gzip data")
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []


def test_installed_mkd_info_tampered_cache_exits_2_with_one_line(good_cache, tmp_path):
    cache = Path(shutil.copytree(good_cache, tmp_path / "cache"))
    file = cache / "target" / "labels.u8"
    data = bytearray(file.read_bytes())
    data[7] ^= 0x01
    file.write_bytes(bytes(data))
    result = _real("info", cache, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {file}: checksum mismatch: the file changed since `mkd prepare` wrote it\n"
    assert result.stdout == ""
    good = _real("info", good_cache, cwd=tmp_path)
    assert good.returncode == 0 and good.stderr == "" and good.stdout.startswith(f"slice cache {good_cache}")
