"""preprocess: forward to slices and the exact inverse back to the input grid."""

import numpy as np
import pytest

from mkd_tf.data.nifti import Volume
from mkd_tf.data.preprocess import (
    PreprocessConfig,
    labels_to_original,
    preprocess_image,
    preprocess_volume,
    resampled_shape,
)
from mkd_tf.errors import MkdError

VALUES = {0: 0, 205: 1, 500: 2}
CLASS_VALUES = [0, 205, 500]


def _blob_volume(shape, affine, seed=0):
    """A body ellipse with two labelled blobs; image in HU."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = (grid[0] ** 2 / 0.8 + grid[1] ** 2 / 0.6) < 1.0
    label = np.zeros(shape, np.int32)
    label[((grid[0] - 0.2) ** 2 + grid[1] ** 2 + grid[2] ** 2) < 0.15] = 500
    label[((grid[0] + 0.3) ** 2 + (grid[1] - 0.1) ** 2 + grid[2] ** 2) < 0.05] = 205
    image = np.where(body, 40.0, -1000.0) + np.where(label == 500, 300, 0) + np.where(label == 205, 60, 0)
    image = image + rng.normal(0, 5, shape)
    return Volume(image.astype(np.float32), affine, "img.nii.gz"), Volume(label, affine, "lab.nii.gz")


# An oblique-free but permuted and flipped affine: array axes (z, -x, y) in world RAS.
PERMUTED = np.array([[0.0, -1.2, 0.0, 10.0], [0.0, 0.0, 1.2, -5.0], [2.0, 0.0, 0.0, 3.0], [0, 0, 0, 1]])


def test_round_trip_is_exact_at_native_spacing():
    image, label = _blob_volume((20, 40, 36), PERMUTED)
    config = PreprocessConfig(spacing=(1.2, 1.2, 2.0), size=48, axis=2)
    slices, label_slices, params = preprocess_volume(image, label, "ct", config, VALUES)
    assert slices.shape[1:] == (48, 48) and slices.dtype == np.float32
    assert label_slices.shape == slices.shape
    # Canonical z is the file's first axis (20 voxels at 2 mm).
    assert slices.shape[0] == 20
    restored = labels_to_original(label_slices, params, CLASS_VALUES)
    assert restored.shape == label.data.shape
    np.testing.assert_array_equal(restored, label.data)


def test_round_trip_after_resampling_keeps_structures():
    image, label = _blob_volume((24, 48, 40), PERMUTED)
    config = PreprocessConfig(spacing=(1.5, 1.5, 1.5), size=64, axis=2)
    _, label_slices, params = preprocess_volume(image, label, "ct", config, VALUES)
    restored = labels_to_original(label_slices, params, CLASS_VALUES)
    assert restored.shape == label.data.shape
    for value in (205, 500):
        a, b = restored == value, label.data == value
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.9, (value, dice)


def test_crop_smaller_than_volume_is_inverted_with_background_outside():
    image, label = _blob_volume((16, 40, 40), np.diag([1.0, 1.0, 2.0, 1.0]))
    config = PreprocessConfig(spacing=(1.0, 1.0, 2.0), size=24, axis=2)
    _, label_slices, params = preprocess_volume(image, label, "ct", config, VALUES)
    restored = labels_to_original(label_slices, params, CLASS_VALUES)
    # Inside the window the labels are exact; everything outside is background.
    inside = np.zeros(restored.shape, bool)
    (sx, sy) = params["crop_start"]
    inside[max(sx, 0) : sx + 24, max(sy, 0) : sy + 24, :] = True
    np.testing.assert_array_equal(restored[inside], label.data[inside])
    assert not restored[~inside].any()


def test_ct_window_and_mr_zscore():
    image, label = _blob_volume((16, 32, 32), np.diag([1.0, 1.0, 1.0, 1.0]))
    config = PreprocessConfig(spacing=(1.0, 1.0, 1.0), size=32)
    ct, _, params = preprocess_volume(image, label, "ct", config, VALUES)
    assert params["intensity"] == {"kind": "ct", "window": [-200.0, 800.0]}
    assert ct.min() == pytest.approx(-1.0) and ct.max() <= 1.0
    mr, _, params = preprocess_volume(image, label, "mr", config, VALUES)
    assert params["intensity"]["kind"] == "zscore"
    low, high = params["intensity"]["clip"]
    assert low == pytest.approx(np.percentile(image.data, 0.5), rel=1e-4)
    assert high == pytest.approx(np.percentile(image.data, 99.5), rel=1e-4)


def test_unknown_label_values_name_the_file():
    image, label = _blob_volume((8, 16, 16), np.eye(4))
    label.data[0, 0, 0] = 77
    with pytest.raises(MkdError, match=r"lab\.nii\.gz: unknown label values \[77\]"):
        preprocess_volume(image, label, "ct", PreprocessConfig(spacing=(1, 1, 1), size=16), VALUES)


def test_new_volume_uses_recorded_ct_window():
    image, _ = _blob_volume((8, 16, 16), np.eye(4))
    config = PreprocessConfig(spacing=(1, 1, 1), size=16, ct_window=(-100.0, 300.0))
    slices, params = preprocess_image(image, {"kind": "ct", "window": [-100.0, 300.0]}, config)
    assert params["intensity"]["window"] == [-100.0, 300.0]
    assert slices.shape == (16, 16, 16)  # 16 axial slices, each 8x16 padded to 16x16


def test_resampled_shape_keeps_centres_inside():
    assert resampled_shape((10, 10, 10), (1, 1, 1), (2, 2, 2)) == (5, 5, 5)
    assert resampled_shape((11, 10, 3), (1, 1, 2.5), (1, 2, 1)) == (11, 5, 6)


def test_cropped_label_voxels_are_counted():
    image, label = _blob_volume((16, 40, 40), np.diag([1.0, 1.0, 2.0, 1.0]))
    classes = np.vectorize(VALUES.get)(label.data)
    _, label_slices, params = preprocess_volume(
        image, label, "ct", PreprocessConfig(spacing=(1.0, 1.0, 2.0), size=8), VALUES
    )
    # Native spacing: the loss is exactly the labelled voxels outside the window.
    assert params["cropped_label_voxels"] == int((classes > 0).sum()) - int((label_slices > 0).sum()) > 0
    _, _, params = preprocess_volume(image, label, "ct", PreprocessConfig(spacing=(1.0, 1.0, 2.0), size=48), VALUES)
    assert params["cropped_label_voxels"] == 0
    _, params = preprocess_image(
        image, {"kind": "ct", "window": [-200.0, 800.0]}, PreprocessConfig(spacing=(1.0, 1.0, 2.0), size=24)
    )
    assert "cropped_label_voxels" not in params  # no label, nothing to count


@pytest.mark.parametrize(
    "change, message",
    [
        ({"spacing": (0.0, 1.0, 1.0)}, "--spacing: every value must be a finite number > 0 (mm), got [0.0, 1.0, 1.0]"),
        ({"spacing": (float("nan"),) * 3}, "--spacing: every value must be a finite number > 0 (mm)"),
        ({"size": 4}, "--size: must be an integer >= 8 (pixels), got 4"),
        ({"axis": 3}, "--axis: must be 0, 1 or 2 (sagittal, coronal, axial), got 3"),
        (
            {"ct_window": (800.0, -200.0)},
            "--ct-window: must be two finite HU values low,high with low < high, got 800,-200",
        ),
        (
            {"percentiles": (99.0, 1.0)},
            "--percentiles: must be two percentiles low,high with 0 <= low < high <= 100, got 99,1",
        ),
    ],
)
def test_config_check_names_the_option(change, message):
    with pytest.raises(MkdError) as info:
        PreprocessConfig(**change).check()
    assert str(info.value).startswith(message)
    assert PreprocessConfig().check() == PreprocessConfig()
