"""Whole-volume prediction and the exact way back to the input's grid and label values.

`mkd predict` and `mkd evaluate` both come through here: slices are predicted in batches, the class
indices are mapped back with :func:`mkd_tf.data.preprocess.labels_to_original` onto exactly the input
volume's shape and affine, and class indices become the dataset's own label values (e.g. 205...850).
"""

from pathlib import Path

import numpy as np
import tensorflow as tf

from mkd_tf.data.nifti import load_image, save_volume
from mkd_tf.data.preprocess import PreprocessConfig, labels_to_original, preprocess_image
from mkd_tf.errors import fail


def predict_slices(predict_probabilities, slices, batch_size=16):
    """Class indices for preprocessed slices.

    Args:
        predict_probabilities: `callable(images (batch, H, W, 1)) -> (batch, H, W, classes)`.
        slices: `(slices, H, W)` float32.
        batch_size: slices per forward pass.

    Returns:
        `(slices, H, W)` uint8 class indices.
    """
    slices = np.asarray(slices, np.float32)
    out = np.zeros(slices.shape, np.uint8)
    for start in range(0, len(slices), batch_size):
        batch = tf.constant(slices[start:start + batch_size, ..., None])
        out[start:start + batch_size] = np.argmax(np.asarray(predict_probabilities(batch)), axis=-1)
    return out


def class_values(record):
    """Class index -> the target dataset's label value, from a run's `cache.json` record."""
    values = record["target"]["label_values"]
    return [int(values[name]) for name in record["classes"]]


def label_dtype(values):
    """uint8 when every label value fits, else uint16 (MM-WHS's 205...850 need uint16)."""
    return np.uint8 if max(values) < 256 else np.uint16


def predict_volume(model, image, record, which="ensemble", batch_size=16):
    """Segment one target-modality volume never seen by `prepare`.

    Args:
        model: a trained :class:`mkd_tf.models.cross_modality.CrossModalityModel`.
        image: :class:`mkd_tf.data.nifti.Volume` in the modality's own units (e.g. HU).
        record: the run's `cache.json` (classes, label values, preprocessing).
        which: predictor name (`"ensemble"`, `"real"`, `"syn"`, ...).

    Returns:
        `(x, y, z)` label volume on the input's grid with the dataset's label values.
    """
    config = PreprocessConfig.from_dict(record["preprocess"])
    slices, params = preprocess_image(image, record["target_intensity"], config)
    indices = predict_slices(lambda batch: model.predict_probabilities(batch, which), slices, batch_size)
    values = class_values(record)
    return labels_to_original(indices, params, values).astype(label_dtype(values))


def predict_file(model, record, image_path, out_path, which="ensemble", overlay=None):
    """`mkd predict`: read a NIfTI, segment it, write the label map (and optionally a PNG overlay)."""
    image = load_image(image_path)
    if Path(out_path).suffix not in (".nii", ".gz"):
        fail(out_path, "output must end in .nii or .nii.gz")
    labels = predict_volume(model, image, record, which)
    save_volume(out_path, labels, image.affine, dtype=labels.dtype)
    if overlay:
        from mkd_tf.overlay import write_overlay

        write_overlay(overlay, image, labels, record)
    return labels
