"""`mkd demo`: the whole first-impression path at a two-step budget leaves every file it promises."""

from pathlib import Path

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from mkd_cli.main import main
from mkd_tf.data.layouts import MMWHS_LABELS


def test_demo_writes_a_label_map_on_the_input_grid_an_overlay_a_savedmodel_and_a_tflite(tmp_path):
    out, saved_models = tmp_path / "demo", tmp_path / "saved_models"
    result = CliRunner().invoke(
        main,
        ["demo", "--out", str(out), "--saved-models", str(saved_models), "--epochs", "1", "--steps-per-epoch", "2"]
        + ["--quiet"],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "mkd — ensemble (test, 1 volumes)" in result.output
    assert "Dice agreement 1.0000" in result.output  # the TFLite parity check ran and agreed

    image = out / "phantom" / "ct_train" / "ct_train_1005_image.nii.gz"
    segmentation = nib.load(out / "ct_train_1005_mkd.nii.gz")
    source = nib.load(image)
    assert segmentation.shape == source.shape
    np.testing.assert_allclose(segmentation.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(segmentation.dataobj)).tolist()) <= set(MMWHS_LABELS.values())

    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (saved_models / "mkd-demo" / "1" / "saved_model.pb").is_file()
    assert (saved_models / "models.config").is_file()
    assert Path(out / "mkd-demo.tflite").stat().st_size > 100_000
    for line in (f"overlay: {out / 'overlay.png'}", f"SavedModel: {saved_models / 'mkd-demo' / '1'}"):
        assert line in result.output
