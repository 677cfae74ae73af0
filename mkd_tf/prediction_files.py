"""The checks and files around a prediction, local (:mod:`mkd_tf.inference`) or remote
(:mod:`mkd_tf.export.client`); no TensorFlow, so the remote client starts without it.

- :func:`check_output_paths`: every output (``-o``, ``--overlay``) is checked before any work;
- :func:`check_intensities`: the input's values must look like the modality the run was trained on
  (CT in Hounsfield units: air and lung near -1000; ``--force`` skips the check);
- :func:`prediction_outputs`: the outputs encoded in memory, written by the caller with
  :func:`mkd_tf.files.write_files_atomic` (all or nothing, so a failing ``--overlay`` leaves no ``-o``);
- :func:`label_map_bytes`: the label map keeps the input's qform and sform (matrices and codes).
"""

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from mkd_tf.errors import fail
from mkd_tf.files import check_parent_is_folder
from mkd_tf.overlay import render_overlay

#: CT check: at least this fraction of voxels must be at or below AIR_HU (air, lung, or the scanner's
#: padding outside the reconstruction circle) ...
CT_MIN_AIR_FRACTION = 0.005
AIR_HU = -500.0
#: ... and at most this fraction above BONE_HU (only dense bone and metal are that bright in HU).
CT_MAX_BRIGHT_FRACTION = 0.02
BONE_HU = 3100.0
#: z-scored modalities (MRI): refused only when they look like CT, i.e. this fraction at or below AIR_HU
#: while the run's training volume had none there.
MR_MAX_AIR_FRACTION = 0.05
#: voxels looked at by :func:`check_intensities` (an evenly strided subsample of larger volumes)
INTENSITY_SAMPLE = 2_000_000


def class_values(record):
    """Class index -> the target dataset's label value, from a run's `cache.json` record."""
    values = record["target"]["label_values"]
    return [int(values[name]) for name in record["classes"]]


def label_dtype(values):
    """uint8 when every label value fits, else uint16 (MM-WHS's 205...850 need uint16)."""
    return np.uint8 if max(values) < 256 else np.uint16


def _check_writable(path, option):
    path = Path(path)
    if path.is_dir():
        fail(path, f"{option} is a folder; give a file name")
    if path.exists() and not path.is_file():
        fail(path, f"{option} exists and is not a regular file")
    folder = check_parent_is_folder(path, f"write {option}")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(path, f"cannot write {option}: no permission to write in {folder}")


def check_output_paths(out_path, overlay=None):
    """Refuse, before any work, outputs that cannot be written (one line naming the path and the problem).

    ``out_path`` must end in .nii or .nii.gz and ``overlay`` in .png (so they differ), and each must be a
    file name (not a folder) whose folder exists or can be created (no regular file on the way) and is
    writable.
    """
    out = Path(out_path)
    if not (out.name.endswith(".nii") or out.name.endswith(".nii.gz")) or out.name in (".nii", ".nii.gz"):
        fail(out_path, "output must end in .nii or .nii.gz")
    _check_writable(out, "-o")
    if overlay is not None:
        if Path(overlay).suffix.lower() != ".png":
            fail(overlay, "--overlay must end in .png (it is a PNG image)")
        _check_writable(overlay, "--overlay")


def _intensity_sample(data):
    flat = np.asarray(data, np.float32).ravel()
    step = max(1, flat.size // INTENSITY_SAMPLE)
    return flat[::step]


def check_intensities(image, intensity, modality, force=False):
    """Refuse a volume whose values do not look like the target modality the run was trained on.

    Args:
        image: :class:`mkd_tf.data.nifti.Volume` in its own units.
        intensity: the run's recorded target intensity rule (``cache.json`` ``target_intensity``):
            ``{"kind": "ct", "window": ...}`` or ``{"kind": "zscore", "clip": [low, high], ...}`` (raw units of
            a training volume).
        modality: the run's target modality name (for the message), e.g. ``"ct"``.
        force: skip the check.

    Rules (robust to body size, scanner padding and cropping; see the module constants):

    - CT (HU): at least 0.5 % of the voxels at or below -500 HU (every chest CT holds air around the
      body or in the lungs; scanners pad outside the field of view with -1024...-3024) and at most 2 %
      above 3100 HU. MRI magnitudes (>= 0), CT stored without its rescale intercept (air at 0) and
      z-scored or [0, 1]-scaled images all fail the first rule.
    - z-scored modalities (MRI and others, arbitrary units): only refused when they look like CT, i.e.
      at least 5 % of the voxels at or below -500 while the run's training volume had its 0.5th
      percentile above -500.
    """
    if force:
        return
    modality = str(modality).upper() if len(str(modality)) <= 4 else str(modality)  # "ct" -> "CT", "mr" -> "MR"
    values = _intensity_sample(image.data)
    air = float(np.mean(values <= AIR_HU))
    median = float(np.median(values))
    low, high = (float(v) for v in np.percentile(values, (1, 99)))
    seen = f"median {median:.4g}, 1st-99th percentile {low:.4g} .. {high:.4g}, {100 * air:.1f}% of voxels <= {AIR_HU:g}"
    if intensity["kind"] == "ct":
        bright = float(np.mean(values > BONE_HU))
        if air < CT_MIN_AIR_FRACTION:
            guess = "MRI or another non-HU image" if low >= 0 else "a non-HU image (already normalised?)"
            fail(
                image.path,
                f"values look like {guess} ({seen}) but the run was trained on {modality} in Hounsfield "
                f"units, where air and lung are near -1000; pass --force to segment it anyway",
            )
        if bright > CT_MAX_BRIGHT_FRACTION:
            fail(
                image.path,
                f"values do not look like Hounsfield units ({seen}, {100 * bright:.1f}% above "
                f"{BONE_HU:g}) but the run was trained on {modality} in HU; pass --force to segment it "
                "anyway",
            )
        return
    trained_low = float(intensity.get("clip", [0.0])[0])
    if air >= MR_MAX_AIR_FRACTION and trained_low > AIR_HU:
        fail(
            image.path,
            f"values look like CT in Hounsfield units ({seen}) but the run was trained on {modality} "
            f"(z-scored; its training volume's 0.5th percentile is {trained_low:.4g}); pass --force to "
            "segment it anyway",
        )


# --- writing the outputs -----------------------------------------------------------------------------
def label_map_bytes(labels, image, out_path):
    """The encoded NIfTI-1 label map (gzip-compressed for .gz) on ``image``'s grid.

    The input's qform and sform matrices and codes (e.g. sform_code 2, aligned to another scan) and its
    spatial/temporal units are copied, so viewers place the labels exactly where they place the image.
    """
    labels = np.asarray(labels)
    result = nib.Nifti1Image(labels, np.asarray(image.affine, np.float64))
    result.header.set_data_dtype(labels.dtype)
    source = None
    if getattr(image, "path", None):
        try:
            source = nib.load(str(image.path)).header
        except Exception:  # the image was read once already; without its header fall back to code 1
            source = None
    if isinstance(source, nib.Nifti1Header):  # NIfTI-2 headers subclass it
        result.set_qform(source.get_qform(), code=int(source["qform_code"]))
        result.set_sform(source.get_sform(), code=int(source["sform_code"]))
        result.header.set_xyzt_units(*source.get_xyzt_units())
    else:
        result.set_qform(result.affine, code=1)
        result.set_sform(result.affine, code=1)
    content = result.to_bytes()
    if str(out_path).endswith(".gz"):
        content = gzip.compress(content, compresslevel=6, mtime=0)
    return content


def prediction_outputs(labels, image, out_path, overlay, record):
    """``[(path, bytes)]`` of `mkd predict`: the label map and, with ``overlay``, the PNG (rendered in memory)."""
    files = [(out_path, label_map_bytes(labels, image, out_path))]
    if overlay:
        try:
            files.append((overlay, render_overlay(image, labels, record)))
        except Exception as exc:  # matplotlib: nothing the user did wrong, but still one line and nothing written
            fail(
                overlay,
                f"cannot draw the overlay ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "nothing was written",
            )
    return files
