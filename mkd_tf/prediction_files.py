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
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from mkd_tf.errors import fail
from mkd_tf.files import check_parent_is_folder, remove_stale_staged_files, write_files_atomic
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


def _is_nifti_name(path):
    name = Path(path).name
    return (name.endswith(".nii") or name.endswith(".nii.gz")) and name not in (".nii", ".nii.gz")


def same_file(a, b):
    """Whether paths ``a`` and ``b`` name the same file: equal after resolving links, or the same inode
    (a hard link)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a link loop: compare what exists
        pass
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_paths(out_path, overlay=None, uncertainty=None, inputs=()):
    """Refuse, before any work, outputs that cannot be written (one line naming the path and the problem).

    ``out_path`` and ``uncertainty`` must end in .nii or .nii.gz and ``overlay`` in .png, each must be a
    file name (not a folder) whose folder exists or can be created (no regular file on the way) and is
    writable, no two outputs may be the same file, and no output may be, or link to, one of ``inputs``
    (``mkd predict RUN scan.nii.gz -o scan.nii.gz`` would replace the scan with its label map).
    """
    if not _is_nifti_name(out_path):
        fail(out_path, "output must end in .nii or .nii.gz")
    outputs = [(out_path, "-o")]
    if overlay is not None:
        if Path(overlay).suffix.lower() != ".png":
            fail(overlay, "--overlay must end in .png (it is a PNG image)")
        outputs.append((overlay, "--overlay"))
    if uncertainty is not None:
        if not _is_nifti_name(uncertainty):
            fail(uncertainty, "--uncertainty must end in .nii or .nii.gz (it is a NIfTI volume)")
        outputs.append((uncertainty, "--uncertainty"))
    for index, (path, option) in enumerate(outputs):
        for source in inputs:
            if same_file(path, source):
                fail(path, f"{option} is the input image {source}; writing it would replace the scan")
        for other, other_option in outputs[:index]:
            if same_file(path, other):
                fail(path, f"{option} is also {other_option}; give each output its own name")
        _check_writable(path, option)


# --- a folder of volumes ------------------------------------------------------------------------------
#: nnU-Net's channel suffix: ``CASE_0000.nii.gz`` is channel 0 of case ``CASE`` (``_0001`` channel 1, ...)
CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


def _stem(path):
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def case_name(path):
    """The case name of a NIfTI file: its name without ``.nii.gz``/``.nii`` and without nnU-Net's channel-0
    suffix ``_0000`` (``la_003_0000.nii.gz`` -> ``la_003``), as nnU-Net names its predictions. Other
    four-digit endings are kept (``ct_1002.nii.gz`` -> ``ct_1002``: a case number, not a channel).

    Example:
        >>> case_name("imagesTs/la_003_0000.nii.gz"), case_name("ct_1002.nii"), case_name("la_003_0001.nii.gz")
        ('la_003', 'ct_1002', 'la_003_0001')
    """
    stem = _stem(path)
    return stem[: -len("_0000")] if stem.endswith("_0000") and len(stem) > len("_0000") else stem


def folder_cases(input_folder, out_folder, overlay_folder=None, uncertainty_folder=None, overwrite=False):
    """Plan `mkd predict RUN FOLDER -o OUT`: ``[(image, label map, overlay or None, uncertainty or None)]``.

    Every ``.nii``/``.nii.gz`` directly in ``input_folder`` (sorted, hidden files skipped) gives
    ``OUT/CASE.nii.gz`` (:func:`case_name`), ``OVERLAY/CASE.png`` and ``UNCERTAINTY/CASE.nii.gz``.
    Refused before any work, in one line: an input that is not a folder or holds no NIfTI; an output
    folder that is the input folder or inside it (outputs would mix with the scans and be read as
    inputs by the next run); two inputs with the same case name (``a.nii`` and ``a.nii.gz``, ``a.nii.gz``
    and ``a_0000.nii.gz``); a second channel ``a_0001.nii.gz`` next to ``a_0000.nii.gz`` (one channel); an output that already exists, unless
    ``overwrite`` (the first conflicting file is named); an output folder that cannot be created.
    """
    source = Path(input_folder)
    if not source.is_dir():
        fail(input_folder, "not a folder")
    images = sorted(p for p in source.iterdir() if not p.name.startswith(".") and _is_nifti_name(p) and not p.is_dir())
    if not images:
        fail(input_folder, "holds no .nii or .nii.gz file")
    folders = [(out_folder, "-o"), (overlay_folder, "--overlay"), (uncertainty_folder, "--uncertainty")]
    folders = [(Path(folder), option) for folder, option in folders if folder is not None]
    for index, (folder, option) in enumerate(folders):
        if _is_nifti_name(folder) or folder.suffix.lower() == ".png":
            fail(folder, f"{option} must be a folder when the input is a folder (one file per case)")
        if folder.exists() and not folder.is_dir():
            fail(folder, f"{option} exists and is not a folder")
        check_parent_is_folder(folder / "x", f"create {option}")
        if same_file(folder, source) or _inside(folder, source):
            fail(folder, f"{option} is the input folder or inside it; write the outputs elsewhere")
        for other, other_option in folders[:index]:
            if same_file(folder, other):
                fail(folder, f"{option} is also {other_option}; give each kind of output its own folder")
    seen, cases = {}, []
    channel_zero = {case_name(p) for p in images if _stem(p).endswith("_0000")}
    for image in images:
        case = case_name(image)
        channel = CHANNEL_SUFFIX.search(_stem(image))
        if channel and channel.group(1) != "0000" and _stem(image)[: channel.start()] in channel_zero:
            fail(
                image,
                f"channel {int(channel.group(1))} of case {_stem(image)[: channel.start()]!r}; the run takes one channel (_0000)",
            )
        if case in seen:
            fail(image, f"same case name {case!r} as {seen[case].name}; one file per case (one channel)")
        seen[case] = image
        outputs = [Path(out_folder) / f"{case}.nii.gz"]
        outputs.append(Path(overlay_folder) / f"{case}.png" if overlay_folder is not None else None)
        outputs.append(Path(uncertainty_folder) / f"{case}.nii.gz" if uncertainty_folder is not None else None)
        cases.append((image, *outputs))
    for folder, option in folders:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            fail(folder, f"cannot write {option}: no permission")
    if not overwrite:
        for _, *outputs in cases:
            for path in outputs:
                if path is not None and (path.exists() or path.is_symlink()):
                    fail(path, "exists; pass --overwrite to replace the outputs already in the folder")
    else:
        for _, *outputs in cases:
            for path in outputs:
                if path is not None and path.exists() and not path.is_file():
                    fail(path, "exists and is not a regular file")
    return cases


def _inside(path, folder):
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


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


def prediction_outputs(labels, image, out_path, overlay, record, uncertainty=None, uncertainty_path=None):
    """``[(path, bytes)]`` of `mkd predict`: the label map, with ``overlay`` the PNG (rendered in memory,
    shading ``uncertainty`` when given), with ``uncertainty_path`` the float32 uncertainty map
    ``uncertainty`` on the input's grid (same shape, affine, qform/sform as the label map)."""
    files = [(out_path, label_map_bytes(labels, image, out_path))]
    if overlay:
        try:
            files.append((overlay, render_overlay(image, labels, record, uncertainty=uncertainty)))
        except Exception as exc:  # matplotlib: nothing the user did wrong, but still one line and nothing written
            fail(
                overlay,
                f"cannot draw the overlay ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "nothing was written",
            )
    if uncertainty_path:
        files.append((uncertainty_path, label_map_bytes(np.asarray(uncertainty, np.float32), image, uncertainty_path)))
    return files


def write_outputs(files):
    """Remove what a killed earlier `mkd predict` left next to each output (our hidden ``.NAME.tmp-*`` /
    ``.NAME.old-*`` files that no running writer holds), then write ``files`` all or nothing
    (:func:`mkd_tf.files.write_files_atomic`)."""
    for path, _ in files:
        remove_stale_staged_files(path)
    write_files_atomic(files)
