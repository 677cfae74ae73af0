"""`mkd predict` on a folder of volumes, the uncertainty map, and the cases where a prediction could lose data."""

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf.files import temporary_sibling
from tests.scripts import tiny_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_and_phantom(tmp_path_factory):
    """(run path, phantom root) of the shared compiled MKD run (trained once per session)."""
    phantom, _ = tiny_runs.tiny_cache(tmp_path_factory)
    return tiny_runs.main_mkd_run(tmp_path_factory).path, phantom


def predict_cli(*args):
    return CliRunner().invoke(cli, ["predict", *map(str, args)])


def ct_case(phantom, number):
    return phantom / "ct_train" / f"ct_train_{number}_image.nii.gz"


def assert_one_line_error(outcome, *fragments):
    assert outcome.exit_code == 2, (outcome.exit_code, outcome.output, outcome.exception)
    assert outcome.stderr.startswith("error: ") and outcome.stderr.count("\n") == 1, outcome.stderr
    for fragment in fragments:
        assert fragment in outcome.stderr, (fragment, outcome.stderr)


def scan_folder(phantom, folder, corrupt=True):
    """Two phantom CT scans (one nnU-Net-named ``_0000``) and, with ``corrupt``, a truncated third."""
    folder.mkdir()
    shutil.copy(ct_case(phantom, 1001), folder / "heart_001_0000.nii.gz")
    shutil.copy(ct_case(phantom, 1002), folder / "ct_1002.nii.gz")
    if corrupt:
        (folder / "broken.nii.gz").write_bytes(ct_case(phantom, 1003).read_bytes()[:300])
    (folder / "notes.txt").write_text("not a scan")
    return folder


# --- a folder of volumes -----------------------------------------------------------------------------
def test_folder_one_corrupt_volume_is_reported_and_the_others_written(run_and_phantom, tmp_path):
    run, phantom = run_and_phantom
    scans = scan_folder(phantom, tmp_path / "scans")
    out = tmp_path / "labels" / "nested"  # created
    outcome = predict_cli(run, scans, "-o", out, "--quiet")
    assert outcome.exit_code == 2, outcome.output
    errors = outcome.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {scans / 'broken.nii.gz'}: "), errors
    assert sorted(p.name for p in out.iterdir()) == ["ct_1002.nii.gz", "heart_001.nii.gz"]  # _0000 stripped
    for name, source in (("heart_001", "heart_001_0000"), ("ct_1002", "ct_1002")):
        written, original = nib.load(out / f"{name}.nii.gz"), nib.load(scans / f"{source}.nii.gz")
        assert written.shape == original.shape
        np.testing.assert_array_equal(written.affine, original.affine)
        assert len(np.unique(np.asarray(written.dataobj))) > 1
    assert "segmented 2 of 3 volumes" in outcome.stdout and "1 failed" in outcome.stdout
    # All good: exit 0 (a fresh folder without the corrupt file).
    good = scan_folder(phantom, tmp_path / "good", corrupt=False)
    outcome = predict_cli(run, good, "-o", tmp_path / "good_labels")
    assert outcome.exit_code == 0, outcome.output
    assert "segmented 2 of 2 volumes" in outcome.stdout and outcome.stderr == ""


def test_folder_outputs_are_refused_before_any_work(run_and_phantom, tmp_path):
    run, phantom = run_and_phantom
    scans = scan_folder(phantom, tmp_path / "scans", corrupt=False)
    before = sorted(p.name for p in scans.iterdir())
    assert_one_line_error(predict_cli(run, scans, "-o", scans), "-o is the input folder or inside it")
    assert_one_line_error(predict_cli(run, scans, "-o", scans / "labels"), "-o is the input folder or inside it")
    assert_one_line_error(
        predict_cli(run, scans, "-o", tmp_path / "a", "--overlay", scans / "png"), "--overlay is the input folder"
    )
    assert sorted(p.name for p in scans.iterdir()) == before
    # An existing output is refused (named), nothing written; --overwrite replaces it.
    out = tmp_path / "labels"
    out.mkdir()
    (out / "ct_1002.nii.gz").write_bytes(b"the user's file")
    assert_one_line_error(predict_cli(run, scans, "-o", out), f"{out / 'ct_1002.nii.gz'}: exists; pass --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["ct_1002.nii.gz"]
    outcome = predict_cli(run, scans, "-o", out, "--overwrite", "--overlay", tmp_path / "png", "--quiet")
    assert outcome.exit_code == 0, outcome.output
    assert nib.load(out / "ct_1002.nii.gz").shape == nib.load(scans / "ct_1002.nii.gz").shape
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["ct_1002.png", "heart_001.png"]
    # Two inputs of one case (two channels) and an empty folder.
    shutil.copy(scans / "heart_001_0000.nii.gz", scans / "heart_001_0001.nii.gz")
    assert_one_line_error(
        predict_cli(run, scans, "-o", tmp_path / "x"), "heart_001_0001.nii.gz: channel 1 of case 'heart_001'"
    )
    (scans / "heart_001_0001.nii.gz").unlink()
    shutil.copy(scans / "ct_1002.nii.gz", scans / "ct_1002_0000.nii.gz")
    assert_one_line_error(predict_cli(run, scans, "-o", tmp_path / "x"), "same case name 'ct_1002'")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(predict_cli(run, empty, "-o", tmp_path / "y"), f"{empty}: holds no .nii or .nii.gz")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- the uncertainty map -----------------------------------------------------------------------------
def test_uncertainty_map_is_on_the_input_grid(run_and_phantom, tmp_path):
    run, phantom = run_and_phantom
    image = ct_case(phantom, 1003)
    out, uncertainty, overlay = tmp_path / "labels.nii.gz", tmp_path / "unc" / "u.nii", tmp_path / "o.png"
    outcome = predict_cli(run, image, "-o", out, "--uncertainty", uncertainty, "--overlay", overlay)
    assert outcome.exit_code == 0, outcome.output
    source, written = nib.load(image), nib.load(uncertainty)
    assert written.shape == source.shape and written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.affine, source.affine)
    values = np.asarray(written.dataobj)
    classes = len(json.loads((Path(run) / "cache.json").read_text())["classes"])
    assert np.all(np.isfinite(values)) and values.min() >= 0 and values.max() > 0
    assert values.max() <= np.log(classes) + 1e-5  # an entropy over the run's classes
    assert overlay.read_bytes()[:8] == PNG_SIGNATURE
    # Folder mode: UNC/CASE.nii.gz per case.
    scans = scan_folder(phantom, tmp_path / "scans", corrupt=False)
    outcome = predict_cli(run, scans, "-o", tmp_path / "l", "--uncertainty", tmp_path / "u", "--quiet")
    assert outcome.exit_code == 0, outcome.output
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["ct_1002.nii.gz", "heart_001.nii.gz"]
    assert nib.load(tmp_path / "u" / "ct_1002.nii.gz").shape == nib.load(scans / "ct_1002.nii.gz").shape


# --- data loss -----------------------------------------------------------------------------------------
def test_an_output_that_is_or_links_to_the_input_is_refused(run_and_phantom, tmp_path):
    run, phantom = run_and_phantom
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(ct_case(phantom, 1001), scan)
    content = scan.read_bytes()
    link = tmp_path / "link.nii.gz"
    link.symlink_to(scan)
    hard = tmp_path / "hard.nii.gz"
    os.link(scan, hard)
    png_link = tmp_path / "shown.png"
    png_link.symlink_to(scan)
    cases = [
        (["-o", scan], "-o is the input image"),
        (["-o", tmp_path / "sub" / ".." / "scan.nii.gz"], "-o is the input image"),
        (["-o", link], "-o is the input image"),
        (["-o", hard], "-o is the input image"),
        (["-o", tmp_path / "l.nii.gz", "--uncertainty", scan], "--uncertainty is the input image"),
        (["-o", tmp_path / "l.nii.gz", "--overlay", png_link], "--overlay is the input image"),
        (["-o", tmp_path / "l.nii.gz", "--uncertainty", tmp_path / "l.nii.gz"], "--uncertainty is also -o"),
    ]
    (tmp_path / "sub").mkdir()
    for args, fragment in cases:
        assert_one_line_error(predict_cli(run, scan, *args), fragment)
    assert scan.read_bytes() == content and hard.read_bytes() == content
    assert not (tmp_path / "l.nii.gz").exists()


def test_outputs_of_a_case_are_published_together_or_not_at_all(run_and_phantom, tmp_path, monkeypatch):
    """The overlay's rename fails after the label map's: the label map is taken back (or its old content)."""
    from mkd_tf import files

    run, phantom = run_and_phantom
    real_replace = os.replace

    def failing_replace(source, destination):
        if str(destination).endswith(".png"):
            raise OSError(5, "Input/output error")
        return real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    out, overlay = tmp_path / "labels.nii.gz", tmp_path / "overlay.png"
    outcome = predict_cli(run, ct_case(phantom, 1001), "-o", out, "--overlay", overlay)
    assert_one_line_error(outcome, f"{overlay}: cannot write (Input/output error)")
    assert list(tmp_path.iterdir()) == []
    # An earlier label map (e.g. last week's run) gets its content back.
    out.write_bytes(b"last week's labels")
    outcome = predict_cli(run, ct_case(phantom, 1001), "-o", out, "--overlay", overlay)
    assert_one_line_error(outcome, "cannot write")
    assert out.read_bytes() == b"last week's labels" and [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


def test_a_killed_predict_leaves_staging_that_the_next_run_removes(run_and_phantom, tmp_path):
    run, phantom = run_and_phantom
    out = tmp_path / "labels.nii.gz"
    stale = [temporary_sibling(out), temporary_sibling(tmp_path / "o.png")]
    for path in stale:
        path.write_bytes(gzip.compress(b"half a label map"))
    kept = [tmp_path / ".labels.tmp-notours.nii.gz", tmp_path / ".other.tmp-0123abcd.nii.gz"]
    for path in kept:
        path.write_bytes(b"the user's")
    outcome = predict_cli(run, ct_case(phantom, 1001), "-o", out, "--overlay", tmp_path / "o.png")
    assert outcome.exit_code == 0, outcome.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["labels.nii.gz", "o.png", *(p.name for p in kept)])
