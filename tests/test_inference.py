"""`mkd predict` / :mod:`mkd_tf.inference`: the label map lands exactly on the input's grid."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf.data.layouts import MMWHS_LABELS
from mkd_tf.data.nifti import load_image
from mkd_tf.data.phantom import write_phantom
from mkd_tf.data.preprocess import PreprocessConfig, labels_to_original, preprocess_image
from mkd_tf.inference import class_values, predict_file, predict_volume
from mkd_tf.training import load_run
from tests.scripts import tiny_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run path, restored best model, cache record, phantom root) of the shared compiled MKD run."""
    phantom, _ = tiny_runs.tiny_cache(tmp_path_factory)
    run = tiny_runs.main_mkd_run(tmp_path_factory)
    model, _, record = load_run(run.path, "best")
    return run.path, model, record, phantom


@pytest.fixture(scope="module")
def unseen_case(tmp_path_factory):
    """A CT case `prepare` never saw: another seed and another grid shape than the cache's volumes."""
    root = write_phantom(tmp_path_factory.mktemp("unseen") / "data", n_ct=1, n_mr=1, shape=(36, 30, 14), seed=11)
    return root / "ct_train" / "ct_train_1001_image.nii.gz"


def predict_cli(*args):
    outcome = CliRunner().invoke(cli, ["predict", *map(str, args)])
    return outcome


def test_prediction_has_the_input_grid_dtype_and_label_values(trained, tmp_path):
    run, _, _, phantom = trained
    image = phantom / "ct_train" / "ct_train_1003_image.nii.gz"
    out = tmp_path / "prediction.nii.gz"
    outcome = predict_cli(run, image, "-o", out)
    assert outcome.exit_code == 0, outcome.output
    source, written = nib.load(image), nib.load(out)
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint16  # MM-WHS values up to 850 do not fit uint8
    values = set(np.unique(np.asarray(written.dataobj)).tolist())
    assert values <= set(MMWHS_LABELS.values())
    assert len(values) > 1  # not trivially all background
    assert outcome.output.strip() == f"wrote {out} (uint16, shape {source.shape})"


def test_a_volume_never_prepared_is_predicted_on_its_own_grid(trained, unseen_case, tmp_path):
    run, model, record, _ = trained
    out = tmp_path / "unseen.nii.gz"
    assert predict_cli(run, unseen_case, "-o", out, "--which", "real").exit_code == 0
    source, written = nib.load(unseen_case), nib.load(out)
    assert written.shape == source.shape == (36, 30, 14)
    np.testing.assert_array_equal(written.affine, source.affine)
    # Independently: preprocess with the cache's settings, argmax of S_real, back to the grid.
    image = load_image(unseen_case)
    config = PreprocessConfig.from_dict(record["preprocess"])
    slices, params = preprocess_image(image, record["target_intensity"], config)
    indices = np.argmax(model.predict_probabilities(slices[..., None], "real").numpy(), axis=-1)
    expected = labels_to_original(indices, params, class_values(record))
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)


def test_prediction_does_not_depend_on_the_voxel_order_of_the_file(trained, tmp_path):
    """The same image stored with flipped and permuted axes (same world geometry) gets the same labels."""
    run, model, record, phantom = trained
    image_path = phantom / "ct_train" / "ct_train_1003_image.nii.gz"
    source = nib.load(image_path)
    data = np.asarray(source.dataobj)
    # new[i, j, k] = old[n0 - 1 - j, i, k]; the affine maps the copy's voxel to the original's, then to mm.
    n0 = data.shape[0]
    reordered = np.flip(data, axis=0).transpose(1, 0, 2)
    index_map = np.array([[0, -1, 0, n0 - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    copy = tmp_path / "reordered.nii.gz"
    nib.save(nib.Nifti1Image(reordered, source.affine @ index_map), copy)
    original = predict_volume(model, load_image(image_path), record, "ensemble")
    permuted = predict_volume(model, load_image(copy), record, "ensemble")
    assert permuted.shape == reordered.shape
    np.testing.assert_array_equal(permuted, np.flip(original, axis=0).transpose(1, 0, 2))


def test_overlay_png(trained, unseen_case, tmp_path):
    run = trained[0]
    out, overlay = tmp_path / "unseen.nii.gz", tmp_path / "figures" / "overlay.png"
    outcome = predict_cli(run, unseen_case, "-o", out, "--overlay", overlay)
    assert outcome.exit_code == 0, outcome.output
    content = overlay.read_bytes()
    assert content[:8] == PNG_SIGNATURE and len(content) > 1000
    assert outcome.output.strip().endswith(f"and {overlay}")
    assert [p.name for p in overlay.parent.iterdir()] == ["overlay.png"]  # no temporary left behind


def test_which_and_output_errors(trained, unseen_case, tmp_path):
    run, model, record, _ = trained
    outcome = predict_cli(run, unseen_case, "-o", tmp_path / "x.nii.gz", "--which", "teacher")
    assert outcome.exit_code == 2 and "'teacher' (this run has syn, real, ensemble)" in outcome.output
    outcome = predict_cli(run, unseen_case, "-o", tmp_path / "x.png")
    assert outcome.exit_code == 2
    assert outcome.stderr.strip() == f"error: {tmp_path / 'x.png'}: output must end in .nii or .nii.gz"
    outcome = predict_cli(run, tmp_path / "missing.nii.gz", "-o", tmp_path / "x.nii.gz")
    assert outcome.exit_code == 2 and outcome.stderr.count("\n") == 1 and "file not found" in outcome.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_single_segmentor_runs_predict_with_their_one_predictor(tmp_path_factory, unseen_case, tmp_path):
    """`--which ensemble` (the default) falls back to a baseline's only segmentor."""
    run = tiny_runs.shared_run(tmp_path_factory, "target-only")
    out = tmp_path / "baseline.nii.gz"
    assert predict_cli(run.path, unseen_case, "-o", out).exit_code == 0
    model, _, record = load_run(run.path)
    expected = predict_file(model, record, unseen_case, tmp_path / "direct.nii.gz", "real")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)


# --- hostile inputs: one line, exit status 2, nothing written -----------------------------------------
def assert_one_line_error(outcome, *fragments):
    assert outcome.exit_code == 2, (outcome.exit_code, outcome.output, outcome.exception)
    assert outcome.stderr.startswith("error: ") and outcome.stderr.count("\n") == 1, outcome.stderr
    for fragment in fragments:
        assert fragment in outcome.stderr, (fragment, outcome.stderr)


def test_qform_and_sform_codes_of_the_input_are_kept(trained, tmp_path):
    """An input aligned to another scan (sform_code 2) keeps that code, and its qform code, in the label map."""
    run, _, _, phantom = trained
    source = nib.load(phantom / "ct_train" / "ct_train_1003_image.nii.gz")
    for qform_code, sform_code in ((1, 2), (0, 3), (4, 0)):
        image = nib.Nifti1Image(np.asarray(source.dataobj), source.affine)
        image.set_qform(source.affine, code=qform_code)
        shifted = source.affine.copy()
        shifted[:3, 3] += [1.5, -2.0, 0.5]  # a registration that moved the scan: sform differs from qform
        image.set_sform(shifted, code=sform_code)
        path = tmp_path / f"codes_{qform_code}{sform_code}.nii.gz"
        nib.save(image, path)
        out = tmp_path / f"labels_{qform_code}{sform_code}.nii.gz"
        outcome = predict_cli(run, path, "-o", out)
        assert outcome.exit_code == 0, outcome.output
        original, written = nib.load(path), nib.load(out)
        assert int(written.header["qform_code"]) == qform_code and int(written.header["sform_code"]) == sform_code
        np.testing.assert_allclose(written.header.get_qform(), original.header.get_qform(), atol=1e-5)
        np.testing.assert_allclose(written.header.get_sform(), original.header.get_sform(), atol=1e-5)
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
        assert written.header.get_xyzt_units() == original.header.get_xyzt_units()


def test_unwritable_outputs_are_refused_before_any_work(trained, unseen_case, tmp_path):
    run = trained[0]
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    out = tmp_path / "new" / "labels.nii.gz"
    cases = [
        (["-o", blocker / "labels.nii.gz"], f"{blocker / 'labels.nii.gz'}: cannot write -o: {blocker} is a file"),
        (["-o", blocker / "deeper" / "labels.nii.gz"], f"cannot write -o: {blocker} is a file, not a folder"),
        (["-o", out, "--overlay", blocker / "overlay.png"], f"cannot write --overlay: {blocker} is a file"),
        (["-o", folder], f"{folder}: -o is a folder; give a file name"),
        (["-o", out, "--overlay", tmp_path / "new" / "overlay.jpg"], "--overlay must end in .png"),
        (["-o", tmp_path / "same.nii.gz", "--overlay", tmp_path / "same.nii.gz"], "--overlay must end in .png"),
        (["-o", out, "--overlay", out.with_name("x.png"), "--checkpoint", "best"], None),  # the valid control
    ]
    for args, fragment in cases[:-1]:
        assert_one_line_error(predict_cli(run, unseen_case, *args), "error: ", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder.nii.gz"]
    assert blocker.read_text() == "a regular file" and list(folder.iterdir()) == []
    assert predict_cli(run, unseen_case, *cases[-1][0]).exit_code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.nii.gz", "x.png"]


def test_a_failing_overlay_writes_no_label_map(trained, unseen_case, tmp_path, monkeypatch):
    from mkd_tf import prediction_files

    def broken(*args, **kwargs):
        raise ValueError("Contour levels must be increasing")

    monkeypatch.setattr(prediction_files, "render_overlay", broken)
    out = tmp_path / "results" / "labels.nii.gz"
    outcome = predict_cli(trained[0], unseen_case, "-o", out, "--overlay", tmp_path / "figures" / "o.png")
    assert_one_line_error(
        outcome,
        f"{tmp_path / 'figures' / 'o.png'}: cannot draw the overlay (ValueError: "
        "Contour levels must be increasing); nothing was written",
    )
    assert list(tmp_path.iterdir()) == []  # not even the folders


def test_an_mri_volume_is_refused_by_a_ct_run_unless_forced(trained, tmp_path):
    run, _, _, phantom = trained
    mri = phantom / "mr_train" / "mr_train_1001_image.nii.gz"
    out = tmp_path / "mri_labels.nii.gz"
    outcome = predict_cli(run, mri, "-o", out)
    assert_one_line_error(
        outcome,
        f"error: {mri}: values look like MRI or another non-HU image (median ",
        "0.0% of voxels <= -500) but the run was trained on CT in Hounsfield units",
        "pass --force to segment it anyway",
    )
    assert not out.exists()
    forced = predict_cli(run, mri, "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert nib.load(out).shape == nib.load(mri).shape
    # The CT phantom passes the same check (every other test here predicts CT without --force).
    ct = phantom / "ct_train" / "ct_train_1001_image.nii.gz"
    assert predict_cli(run, ct, "-o", tmp_path / "ct.nii.gz").exit_code == 0


def test_intensity_rules():
    """CT: air/lung near -1000 must be present (scanner padding counts); z-scored runs refuse only CT-like input."""
    from mkd_tf.data.nifti import Volume
    from mkd_tf.errors import MkdError
    from mkd_tf.prediction_files import check_intensities

    rng = np.random.default_rng(0)
    body = rng.normal(40, 30, size=(40, 40, 10))
    ct = body.copy()
    ct[:6] = -1000 + rng.normal(0, 5, size=ct[:6].shape)  # air around the body
    padded = ct.copy()
    padded[:, :4] = -3024  # outside the reconstruction circle
    ct_rule = {"kind": "ct", "window": [-200.0, 800.0]}
    mr_rule = {"kind": "zscore", "clip": [3.0, 900.0], "mean": 200.0, "std": 150.0}
    for data in (ct, padded):
        check_intensities(Volume(data.astype(np.float32), np.eye(4), "ct.nii"), ct_rule, "ct")
    without_intercept = ct + 1024  # raw CT stored without its rescale intercept: air at ~24, water at 1024
    mri = np.abs(rng.normal(200, 120, size=(40, 40, 10)))
    zscored = (mri - mri.mean()) / mri.std()
    for data, name in ((without_intercept, "raw.nii"), (mri, "mri.nii"), (zscored, "z.nii")):
        with pytest.raises(MkdError, match=rf"^{name}: values look like .* but the run was trained on CT"):
            check_intensities(Volume(data.astype(np.float32), np.eye(4), name), ct_rule, "ct")
        check_intensities(Volume(data.astype(np.float32), np.eye(4), name), ct_rule, "ct", force=True)
    bright = ct.copy()
    bright[6:20] = 5000
    with pytest.raises(MkdError, match=r"do not look like Hounsfield units .*% above 3100"):
        check_intensities(Volume(bright.astype(np.float32), np.eye(4), "b.nii"), ct_rule, "ct")
    check_intensities(Volume(mri.astype(np.float32), np.eye(4), "mri.nii"), mr_rule, "mr")
    check_intensities(Volume(zscored.astype(np.float32), np.eye(4), "z.nii"), mr_rule, "mr")
    with pytest.raises(MkdError, match=r"values look like CT in Hounsfield units .* trained on MR"):
        check_intensities(Volume(ct.astype(np.float32), np.eye(4), "ct.nii"), mr_rule, "mr")


def test_a_truncated_checkpoint_is_one_line(trained, unseen_case, tmp_path):
    import shutil

    run = Path(shutil.copytree(trained[0], tmp_path / "run"))
    data = next((run / "best").glob("weights.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    out = tmp_path / "out" / "labels.nii.gz"
    assert_one_line_error(
        predict_cli(run, unseen_case, "-o", out),
        f"error: {run / 'best'}: cannot read the best checkpoint: truncated or corrupt weights file",
    )
    assert not out.parent.exists()


# --- the uncertainty map -------------------------------------------------------------------------------
def test_uncertainty_is_high_where_the_segmentors_disagree(trained):
    """Constructed: S_syn says background everywhere, S_real says background in air and class 1 in the body,
    both with certainty; the ensemble's uncertainty must be ~0 in air and ~ln 2 in the body, on the grid."""
    import tensorflow as tf

    from mkd_tf.models.cross_modality import CrossModalityModel

    _, _, record, phantom = trained
    classes = len(record["classes"])

    def certain(class_index):
        return 20.0 * tf.one_hot(class_index, classes)  # logits: softmax ~ one-hot

    class TwoSegmentors(CrossModalityModel):
        def segmentors(self):
            return {
                "syn": lambda images, training=False: certain(tf.zeros(tf.shape(images)[:-1], tf.int32)),
                "real": lambda images, training=False: certain(tf.cast(images[..., 0] > -0.99, tf.int32)),
            }

    model = TwoSegmentors(classes, 1)
    image = load_image(phantom / "ct_train" / "ct_train_1003_image.nii.gz")
    labels, uncertainty = predict_volume(model, image, record, "ensemble", uncertainty=True)
    assert uncertainty.shape == labels.shape == image.data.shape and uncertainty.dtype == np.float32
    assert np.all(np.isfinite(uncertainty)) and uncertainty.min() >= 0
    low = record["target_intensity"]["window"][0]
    air, body = image.data <= low - 100, image.data >= low + 100
    assert air.sum() > 100 and body.sum() > 100
    assert float(uncertainty[air].mean()) < 0.1 and float(uncertainty[body].mean()) > 0.5
    assert float(uncertainty.max()) <= np.log(2) + 1e-4  # two certain votes: at most ln 2
    # Each segmentor alone is certain: its own entropy is ~0 everywhere (a baseline's fallback measure).
    _, alone = predict_volume(model, image, record, "real", uncertainty=True)
    assert float(alone.max()) < 1e-3


def test_a_one_segmentor_run_writes_its_own_entropy_as_uncertainty(tmp_path_factory, unseen_case, tmp_path):
    """A baseline has no second segmentor to disagree with: the map is its softmax entropy, on the input grid."""
    from mkd_tf.inference import predictive_entropy

    run = tiny_runs.shared_run(tmp_path_factory, "target-only")
    out, uncertainty = tmp_path / "labels.nii.gz", tmp_path / "uncertainty.nii.gz"
    assert predict_cli(run.path, unseen_case, "-o", out, "--uncertainty", uncertainty).exit_code == 0
    model, _, record = load_run(run.path)
    image = load_image(unseen_case)
    slices, params = preprocess_image(
        image, record["target_intensity"], PreprocessConfig.from_dict(record["preprocess"])
    )
    probabilities = model.predict_probabilities(slices[..., None], model.predictor_names()[0]).numpy()
    expected = labels_to_original(predictive_entropy(probabilities), params)
    written = nib.load(uncertainty)
    assert written.shape == image.data.shape
    np.testing.assert_array_equal(written.affine, nib.load(unseen_case).affine)
    np.testing.assert_allclose(np.asarray(written.dataobj), expected, atol=1e-5)
    assert float(expected.max()) > 0
