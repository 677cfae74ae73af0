"""`mkd predict` / :mod:`mkd_tf.inference`: the label map lands exactly on the input's grid."""

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
