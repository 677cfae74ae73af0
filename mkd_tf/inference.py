"""Whole-volume prediction and the exact way back to the input's grid and label values.

`mkd predict` and `mkd evaluate` both come through here: slices are predicted in batches, the class
indices are mapped back with :func:`mkd_tf.data.preprocess.labels_to_original` onto exactly the input
volume's shape and affine, and class indices become the dataset's own label values (e.g. 205...850).

The checks and files around a prediction, shared with the remote client, are in
:mod:`mkd_tf.prediction_files` (each problem a one-line :class:`MkdError`, exit status 2 in the CLI).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import nibabel as nib
import numpy as np
import tensorflow as tf

from mkd_tf.data.nifti import load_image
from mkd_tf.data.preprocess import PreprocessConfig, labels_to_original, preprocess_image
from mkd_tf.errors import MkdError, fail
from mkd_tf.prediction_files import (
    check_intensities,
    check_output_paths,
    class_values,
    label_dtype,
    prediction_outputs,
    write_outputs,
)
from mkd_tf.training import load_run

if TYPE_CHECKING:  # annotations only
    from mkd_tf.data.nifti import Volume
    from mkd_tf.models.cross_modality import CrossModalityModel


def load_trained(
    run_dir: str | os.PathLike, which: str = "best"
) -> tuple[CrossModalityModel, dict[str, Any], dict[str, Any]]:
    """:func:`mkd_tf.training.load_run`, with unreadable checkpoint files as a one-line :class:`MkdError`.

    TensorFlow's checkpoint reader raises a bare ``IndexError("Read less bytes than requested")`` for a
    truncated ``weights.data-*`` file, which ``load_run`` does not expect.
    """
    try:
        return load_run(run_dir, which)
    except IndexError as exc:
        where = Path(run_dir) / ("best" if which == "best" else "checkpoints")
        fail(where, f"cannot read the {which} checkpoint: truncated or corrupt weights file ({exc})")


def predictive_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per-pixel entropy (nats) of softmax ``probabilities`` `(..., classes)`: 0 when one class has all the
    probability, ln(classes) when all are equal.

    For the MKD ensemble (the mean of S_syn's and S_real's softmax) it is the two segmentors' own mean
    entropy plus the Jensen-Shannon divergence between them, so it rises both where each segmentor is
    unsure (boundaries) and where they disagree; for a single segmentor it is that segmentor's entropy.
    """
    probabilities = np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0)
    return np.maximum(-np.sum(probabilities * np.log(probabilities), axis=-1), 0.0).astype(np.float32)


def predict_slices(
    predict_probabilities: Callable[[tf.Tensor], tf.Tensor],
    slices: np.ndarray,
    batch_size: int = 16,
    uncertainty: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Class indices (and optionally the uncertainty) for preprocessed slices.

    Args:
        predict_probabilities: `callable(images (batch, H, W, 1)) -> (batch, H, W, classes)`.
        slices: `(slices, H, W)` float32.
        batch_size: slices per forward pass.
        uncertainty: also return :func:`predictive_entropy` of the same probabilities.

    Returns:
        `(slices, H, W)` uint8 class indices, or `(indices, entropy float32 (slices, H, W))`.
    """
    slices = np.asarray(slices, np.float32)
    out = np.zeros(slices.shape, np.uint8)
    entropy = np.zeros(slices.shape, np.float32) if uncertainty else None
    for start in range(0, len(slices), batch_size):
        batch = tf.constant(slices[start : start + batch_size, ..., None])
        probabilities = np.asarray(predict_probabilities(batch))
        out[start : start + batch_size] = np.argmax(probabilities, axis=-1)
        if uncertainty:
            entropy[start : start + batch_size] = predictive_entropy(probabilities)
    return (out, entropy) if uncertainty else out


def predict_volume(
    model: CrossModalityModel,
    image: Volume,
    record: dict[str, Any],
    which: str = "ensemble",
    batch_size: int = 16,
    uncertainty: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Segment one target-modality volume never seen by `prepare`.

    Args:
        model: a trained :class:`mkd_tf.models.cross_modality.CrossModalityModel`.
        image: :class:`mkd_tf.data.nifti.Volume` in the modality's own units (e.g. HU).
        record: the run's `cache.json` (classes, label values, preprocessing).
        which: predictor name (`"ensemble"`, `"real"`, `"syn"`, ...).
        uncertainty: also return the per-voxel :func:`predictive_entropy` of ``which`` on the input's grid,
            mapped back exactly as the labels are (voxels outside the preprocessing's crop, which are
            background by construction, get 0).

    Returns:
        `(x, y, z)` label volume on the input's grid with the dataset's label values, or
        `(labels, uncertainty float32 (x, y, z))`.
    """
    config = PreprocessConfig.from_dict(record["preprocess"])
    slices, params = preprocess_image(image, record["target_intensity"], config)
    predicted = predict_slices(lambda batch: model.predict_probabilities(batch, which), slices, batch_size, uncertainty)
    indices, entropy = predicted if uncertainty else (predicted, None)
    values = class_values(record)
    labels = labels_to_original(indices, params, values).astype(label_dtype(values))
    if not uncertainty:
        return labels
    return labels, labels_to_original(entropy, params).astype(np.float32)


# --- checks before the work --------------------------------------------------------------------------
def predict_file(
    model: CrossModalityModel,
    record: dict[str, Any],
    image_path: str | os.PathLike,
    out_path: str | os.PathLike,
    which: str = "ensemble",
    overlay: str | os.PathLike | None = None,
    force: bool = False,
    uncertainty_path: str | os.PathLike | None = None,
) -> np.ndarray:
    """`mkd predict`: read a NIfTI, segment it, write the label map (and optionally a PNG overlay and the
    uncertainty map, see :func:`predict_volume`).

    Nothing is written unless every step succeeded, and the outputs appear together or not at all (see
    :func:`mkd_tf.files.write_files_atomic`); an output that is (or links to) the input is refused first.
    """
    check_output_paths(out_path, overlay, uncertainty_path, inputs=[image_path])
    image = load_image(image_path)
    check_intensities(image, record["target_intensity"], record["target"]["name"], force)
    predicted = predict_volume(model, image, record, which, uncertainty=uncertainty_path is not None)
    labels, uncertainty = predicted if uncertainty_path is not None else (predicted, None)
    write_outputs(prediction_outputs(labels, image, out_path, overlay, record, uncertainty, uncertainty_path))
    return labels


def predict_folder(
    cases: list, predict_case: Callable, report_error: Callable[[str], None], verbose: int = 1
) -> tuple[list, list]:
    """`mkd predict RUN FOLDER -o OUT`: one process, one model, every case; a failing case is reported and
    skipped, the others go on.

    Args:
        cases: :func:`mkd_tf.prediction_files.folder_cases`.
        predict_case: `callable(image, out, overlay, uncertainty)` that predicts and writes one case (all or
            nothing) or raises.
        report_error: `callable(line)` for each failing case's ``<file>: <problem>``.
        verbose: 1 = a progress bar (the one `mkd train` shows), 0 = none.

    Returns:
        `(written, failed)`: lists of the input paths.
    """
    progress_bar = keras.utils.Progbar(len(cases), verbose=verbose, unit_name="volume") if verbose else None
    written, failed = [], []
    for number, (image, out, overlay, uncertainty) in enumerate(cases, start=1):
        try:
            predict_case(image, out, overlay, uncertainty)
            written.append(image)
        except MkdError as exc:
            failed.append(image)
            message = str(exc)
            report_error(message if message.startswith(str(image)) else f"{image}: {message}")
        except Exception as exc:  # a file nibabel or the preprocessing chokes on: skip it, keep going
            failed.append(image)
            first = str(exc).splitlines()[0] if str(exc) else ""
            report_error(f"{image}: cannot segment ({type(exc).__name__}: {first})")
        if progress_bar:
            progress_bar.update(number, finalize=number == len(cases))
    return written, failed


@dataclass
class Prediction:
    """What :func:`predict` returns.

    Attributes:
        labels: `(x, y, z)` label map on the input's grid with the dataset's label values.
        affine: the input's 4x4 voxel-to-world affine (the label map's too).
        path: the written label map, or `None` when nothing was written.
    """

    labels: np.ndarray
    affine: np.ndarray
    path: Path | None


def predictor_name(model: CrossModalityModel, which: str) -> str:
    """The predictor ``which`` names in ``model``: ``ensemble`` of a one-segmentor baseline is its segmentor
    (as :func:`mkd_tf.export.serving.resolve_predictor`, with `mkd predict`'s message).

    Raises:
        MkdError: ``--which: 'NAME' (this run has ...)`` for a name the run does not have.
    """
    names = model.predictor_names()
    if which == "ensemble" and which not in names:
        which = model.main_predictor()
    if which not in names:
        fail("--which", f"'{which}' (this run has {', '.join(names)})")
    return which


def predict(
    run_dir: str | os.PathLike,
    image_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    which: str = "ensemble",
    checkpoint: str = "best",
    overlay: str | os.PathLike | None = None,
    force: bool = False,
    uncertainty: str | os.PathLike | None = None,
) -> Prediction:
    """Segment one target-modality NIfTI volume with a trained run (`mkd predict RUN IMAGE -o OUT`).

    Args:
        run_dir: run folder written by :func:`mkd_tf.training.train`.
        image_path: the NIfTI volume (.nii or .nii.gz) in the modality's own units (e.g. HU).
        out_path: label map to write (.nii or .nii.gz; input's shape, affine and header codes), or `None`
            to only return it.
        which: predictor: ``ensemble``, ``real``, ``syn`` (a baseline's ``ensemble`` is its one segmentor).
        checkpoint: ``best`` or ``last`` weights.
        overlay: optional PNG with contours on a few slices (needs ``out_path``).
        force: segment even if the intensities do not look like the run's target modality.
        uncertainty: optional per-voxel uncertainty map to write (.nii/.nii.gz; needs ``out_path``),
            see :func:`predictive_entropy`.

    Returns:
        :class:`Prediction`: the label array, the input's affine and the written path.

    Example:
        >>> result = predict("runs/mkd", "CT.nii.gz", "CT_seg.nii.gz")  # doctest: +SKIP
        >>> result.labels.shape, result.path  # doctest: +SKIP
        ((96, 96, 48), PosixPath('CT_seg.nii.gz'))
    """
    for option, value in (("--overlay", overlay), ("--uncertainty", uncertainty)):
        if value is not None and out_path is None:
            fail(option, "needs a label map to write (-o/--out)")
    if out_path is not None:
        check_output_paths(out_path, overlay, uncertainty, inputs=[image_path])  # before loading anything
    model, _, record = load_trained(run_dir, checkpoint)
    which = predictor_name(model, which)
    if out_path is not None:
        labels = predict_file(model, record, image_path, out_path, which, overlay, force, uncertainty)
        return Prediction(labels, nib.load(out_path).affine, Path(out_path))  # the header only
    image = load_image(image_path)
    check_intensities(image, record["target_intensity"], record["target"]["name"], force)
    return Prediction(predict_volume(model, image, record, which), image.affine, None)
