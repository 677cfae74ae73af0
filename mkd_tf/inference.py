"""Whole-volume prediction and the exact way back to the input's grid and label values.

`mkd predict` and `mkd evaluate` both come through here: slices are predicted in batches, the class
indices are mapped back with :func:`mkd_tf.data.preprocess.labels_to_original` onto exactly the input
volume's shape and affine, and class indices become the dataset's own label values (e.g. 205...850).

The checks and files around a prediction, shared with the remote client, are in
:mod:`mkd_tf.prediction_files` (each problem a one-line :class:`MkdError`, exit status 2 in the CLI).
"""

from pathlib import Path

import numpy as np
import tensorflow as tf

from mkd_tf.data.nifti import load_image
from mkd_tf.data.preprocess import PreprocessConfig, labels_to_original, preprocess_image
from mkd_tf.errors import fail
from mkd_tf.files import write_files_atomic
from mkd_tf.prediction_files import check_intensities, check_output_paths, class_values, label_dtype, prediction_outputs
from mkd_tf.training import load_run


def load_trained(run_dir, which="best"):
    """:func:`mkd_tf.training.load_run`, with unreadable checkpoint files as a one-line :class:`MkdError`.

    TensorFlow's checkpoint reader raises a bare ``IndexError("Read less bytes than requested")`` for a
    truncated ``weights.data-*`` file, which ``load_run`` does not expect.
    """
    try:
        return load_run(run_dir, which)
    except IndexError as exc:
        where = Path(run_dir) / ("best" if which == "best" else "checkpoints")
        fail(where, f"cannot read the {which} checkpoint: truncated or corrupt weights file ({exc})")


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
        batch = tf.constant(slices[start : start + batch_size, ..., None])
        out[start : start + batch_size] = np.argmax(np.asarray(predict_probabilities(batch)), axis=-1)
    return out


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


# --- checks before the work --------------------------------------------------------------------------
def predict_file(model, record, image_path, out_path, which="ensemble", overlay=None, force=False):
    """`mkd predict`: read a NIfTI, segment it, write the label map (and optionally a PNG overlay).

    Nothing is written unless every step succeeded (see :func:`mkd_tf.files.write_files_atomic`).
    """
    check_output_paths(out_path, overlay)
    image = load_image(image_path)
    check_intensities(image, record["target_intensity"], record["target"]["name"], force)
    labels = predict_volume(model, image, record, which)
    write_files_atomic(prediction_outputs(labels, image, out_path, overlay, record))
    return labels
