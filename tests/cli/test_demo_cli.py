"""`mkd demo`: the whole first-impression path at a two-step budget leaves every file it promises."""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mkd_cli.main import main
from mkd_tf.data.layouts import MMWHS_LABELS
from mkd_tf.export import DEFAULT_MIN_AGREEMENT
from tests.scripts import tiny_runs

PARITY = re.compile(
    r"parity \(none, \d+ test slices\): Dice agreement (?P<agreement>[\d.]+) \(threshold (?P<threshold>[\d.]+)\), "
    r"pixel agreement (?P<pixels>[\d.]+), max \|probability difference\| (?P<difference>[\d.e+-]+)"
)


# The demo's path at test size: the phantom at a third of its resolution (32 x 32 x 16 voxels, the same
# field of view, so the 48 x 48 slices at 3.2 mm still hold the heart) and 4-filter networks. The demo as
# shipped (96 x 96 x 48, 16-filter networks: ~60 s for two steps on 2 cores) is the benchmark case.
TINY_NETWORKS = {
    "data": {"batch_size": 2},
    "segmentor": {"base_filters": 4, "depth": 2},
    "alignment": {"base_filters": 4, "num_blocks": 1, "disc_filters": 4, "disc_layers": 1},
}


@pytest.mark.parametrize("size", ["tiny", pytest.param("as shipped", marks=pytest.mark.benchmark)])
def test_demo_writes_a_label_map_on_the_input_grid_an_overlay_a_savedmodel_and_a_tflite(tmp_path, monkeypatch, size):
    from mkd_tf import demo

    if size == "tiny":
        write_phantom = demo.write_phantom
        monkeypatch.setattr(demo, "DEMO_TRAINING", {**demo.DEMO_TRAINING, **TINY_NETWORKS})
        monkeypatch.setattr(
            demo,
            "write_phantom",
            lambda out, n_ct, n_mr, shape, seed: write_phantom(out, n_ct, n_mr, (32, 32, 16), seed),
        )
    out, saved_models = tmp_path / "demo", tmp_path / "saved_models"
    # At test size the two training steps run eagerly: tracing them would take most of the test (the
    # compiled loop is tested on the main MKD run); as shipped, the demo runs as a user runs it.
    with tiny_runs.eager(size == "tiny"):
        result = CliRunner().invoke(
            main,
            ["demo", "--out", str(out), "--saved-models", str(saved_models), "--epochs", "1", "--steps-per-epoch", "2"]
            + ["--quiet"],
        )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "mkd — ensemble (test, 1 volumes)" in result.output
    # The TFLite parity check ran and agreed at the gate of a float32 conversion. A two-step model has
    # near-ties (as shipped: max |probability difference| 3.0e-8 on seeds 0 and 1, where 9 and 4 of the 85,248
    # parity pixels have a top-2 gap below 1e-7 and can flip): the agreement counts them as ties
    # (tflite.untie), the pixel agreement does not.
    parity = PARITY.search(result.output)
    assert parity, result.output
    threshold = DEFAULT_MIN_AGREEMENT["none"]
    assert float(parity["threshold"]) == threshold and float(parity["agreement"]) >= threshold
    assert float(parity["pixels"]) >= 0.999 and float(parity["difference"]) < 1e-5

    image = out / "phantom" / "ct_train" / "ct_train_1005_image.nii.gz"
    segmentation = nib.load(out / "ct_train_1005_mkd.nii.gz")
    source = nib.load(image)
    assert segmentation.shape == source.shape
    np.testing.assert_allclose(segmentation.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(segmentation.dataobj)).tolist()) <= set(MMWHS_LABELS.values())

    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (saved_models / "mkd-demo" / "1" / "saved_model.pb").is_file()
    assert (saved_models / "models.config").is_file()
    assert Path(out / "mkd-demo.tflite").stat().st_size > (100_000 if size == "as shipped" else 10_000)
    for line in (f"overlay: {out / 'overlay.png'}", f"SavedModel: {saved_models / 'mkd-demo' / '1'}"):
        assert line in result.output


@pytest.mark.parametrize("where", ["out", "saved_models", "model_folder", "models_config_folder", "models_config"])
def test_demo_refuses_an_unwritable_destination_before_writing_anything(tmp_path, monkeypatch, where):
    """The SavedModel's destination is checked before the minutes of training, not after them."""
    from mkd_tf import demo

    monkeypatch.setattr(demo, "write_phantom", _must_not_run)
    monkeypatch.setattr(demo, "train", _must_not_run)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out, saved_models = tmp_path / "demo", tmp_path / "saved_models"
    expected = {
        "out": f"{notes / 'demo'}: cannot create the demo folder: {notes} is a file, not a folder",
        "saved_models": f"{notes / 'sm' / 'mkd-demo'}: cannot create the model folder: {notes} is a file, not a folder",
        "model_folder": f"{saved_models / 'mkd-demo'}: exists and is not a folder",
        "models_config_folder": f"{saved_models / 'models.config'}: is a folder; mkd export writes the TF Serving "
        "model config there",
        "models_config": f"{saved_models / 'models.config'}: not a TF Serving model config (",
    }[where]
    if where == "out":
        out = notes / "demo"
    elif where == "saved_models":
        saved_models = notes / "sm"
    else:
        saved_models.mkdir()
        if where == "model_folder":
            (saved_models / "mkd-demo").write_text("mine")
        elif where == "models_config_folder":
            (saved_models / "models.config").mkdir()
        else:
            (saved_models / "models.config").write_text("model_config_list { config { name: ")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--saved-models", str(saved_models), "--quiet"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith(f"error: {expected}") and result.stderr.count("\n") == 1, result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def _must_not_run(*arguments, **keywords):
    raise AssertionError("the demo started before its destinations were checked")
