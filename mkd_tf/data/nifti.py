"""Read and write NIfTI volumes with the checks a user's real files need.

Every failure raises :class:`mkd_tf.errors.MkdError` with one line naming the file and the problem.
Writes are atomic: the volume is written to a temporary file in the same folder, then renamed.
"""

import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from mkd_tf.errors import fail
from mkd_tf.files import atomic_path

# Affines of an image and its label may differ by float noise from the writer; anything larger
# than this (in mm, per affine entry) is a real mismatch.
AFFINE_TOLERANCE = 1e-3
CANONICAL_ORNT = orientations.axcodes2ornt(("R", "A", "S"))


@dataclass
class Volume:
    """A 3-D volume and the grid it lives on.

    Args:
        data: `(x, y, z)` array: float32 intensities for images, int32 values for labels.
        affine: `(4, 4)` voxel-to-world (RAS+ mm) matrix.
        path: where it was read from (for messages).
    """

    data: np.ndarray
    affine: np.ndarray
    path: str = ""

    @property
    def spacing(self):
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def _open(path):
    path = Path(path)
    if not path.exists():
        fail(path, "file not found")
    if not path.is_file():
        fail(path, "not a file")
    # nibabel's header checks print to stderr through their own log handler; silence them so a
    # broken header gives exactly one line (the MkdError below), not a log line and then the error.
    log_level = nib.imageglobals.logger.level
    nib.imageglobals.logger.setLevel(logging.CRITICAL + 1)
    try:
        image = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as exc:
        fail(path, f"not a NIfTI file ({exc})")
    except nib.spatialimages.HeaderDataError as exc:
        fail(path, f"invalid NIfTI header ({exc})")
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        fail(path, f"cannot read NIfTI header ({type(exc).__name__}: {exc})")
    finally:
        nib.imageglobals.logger.setLevel(log_level)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        fail(path, f"not a NIfTI file (nibabel read it as {type(image).__name__})")
    stored = _verify_gzip(path) if path.name.lower().endswith(".gz") else path.stat().st_size
    _check_data_size(image, path, stored)
    return image


def _check_data_size(image, path, stored):
    """Refuse a file shorter than its header's voxels need, before an array of that size is allocated.

    A truncated file would otherwise fail inside nibabel with a multi-line message, and a corrupt
    header (e.g. 32767 x 32767 x 32767 voxels) with numpy's "Unable to allocate 65.5 TiB".

    Args:
        image: the NIfTI image whose header was read.
        path: the file (for the message).
        stored: the bytes the file holds (uncompressed: its size; gzip: the decompressed stream's length).
    """
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = header.get_data_dtype()
    # the array proxy's offset is where nibabel reads from (a header's vox_offset of 0 means "just after it")
    offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
    needed = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: no overflow
    if stored < needed:
        need, have = _size(needed), _size(stored)
        if need == have:  # rounded alike: give the exact counts
            need, have = f"{needed} bytes", f"{stored} bytes"
        shape_text = "x".join(map(str, shape))
        fail(
            path,
            f"truncated or corrupt: the header's {shape_text} {dtype.name} voxels need {need}, the file holds {have}",
        )


def _size(count):
    """A byte count for a message: exact below 1 MiB (`4092 bytes`), else rounded (`65.5 TiB`)."""
    if count < 1 << 20:
        return f"{count} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        count /= 1024
        if count < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}"


def _verify_gzip(path):
    """Read a gzip stream to its end so that gzip checks its CRC-32 and length.

    nibabel stops decompressing after the bytes the voxels need, so without this a flipped byte in
    the compressed data often decodes silently to wrong voxels, and a file cut inside its trailer
    loads as if it were complete.

    Returns:
        The decompressed stream's length in bytes.
    """
    length = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                length += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        fail(path, f"corrupt or truncated gzip data ({type(exc).__name__}: {exc})")
    return length


def _read_array(image, path):
    try:
        data = np.asanyarray(image.dataobj)
    except (
        OSError,
        EOFError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
        OverflowError,
        nib.spatialimages.HeaderDataError,
    ) as exc:
        fail(path, f"corrupt or truncated data ({type(exc).__name__}: {' '.join(str(exc).split())})")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        fail(path, f"expected a 3-D volume, got shape {tuple(data.shape)}")
    if min(data.shape) < 1:
        fail(path, f"empty volume, shape {tuple(data.shape)}")
    return data


def load_image(path):
    """Read an intensity volume as float32, refusing NaN/Inf voxels.

    Returns:
        :class:`Volume` with `(x, y, z)` float32 data.
    """
    image = _open(path)
    data = _read_array(image, path).astype(np.float32)
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        fail(path, f"{bad} NaN/Inf voxels")
    return Volume(data, _affine(image, path), str(path))


def load_label(path):
    """Read a label volume as int32, refusing non-integer or non-finite values.

    Returns:
        :class:`Volume` with `(x, y, z)` int32 data holding the file's own label values.
    """
    image = _open(path)
    raw = _read_array(image, path)
    if not np.issubdtype(raw.dtype, np.integer):
        raw = np.asarray(raw, dtype=np.float64)
        if not np.all(np.isfinite(raw)):
            fail(path, "label volume has NaN/Inf voxels")
        if not np.all(raw == np.round(raw)):
            fail(path, "label volume has non-integer values")
    return Volume(np.asarray(raw).astype(np.int32), _affine(image, path), str(path))


def _affine(image, path):
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        fail(path, "invalid (singular or non-finite) affine")
    return affine


def check_same_grid(image, label):
    """Refuse an image/label pair whose shapes or affines differ."""
    if image.data.shape != label.data.shape:
        fail(label.path, f"shape {label.data.shape} does not match image {image.path} shape {image.data.shape}")
    if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE):
        worst = float(np.abs(image.affine - label.affine).max())
        fail(label.path, f"affine differs from image {image.path} (max difference {worst:.4g} mm)")


def to_canonical(data, affine):
    """Reorder/flip array axes so they run along R, A, S.

    Returns:
        `(canonical_data, canonical_affine, ornt)`; `ornt` is what :func:`from_canonical` needs.
    """
    ornt = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(ornt, CANONICAL_ORNT)
    canonical = orientations.apply_orientation(data, transform)
    canonical_affine = affine @ orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(canonical), canonical_affine, ornt


def from_canonical(data, ornt):
    """Exact inverse of :func:`to_canonical` for the array (axis order and flips only)."""
    back = orientations.ornt_transform(CANONICAL_ORNT, np.asarray(ornt))
    return np.ascontiguousarray(orientations.apply_orientation(data, back))


def save_volume(path, data, affine, dtype=None):
    """Write a NIfTI volume atomically (temporary file in the same folder, then rename).

    Args:
        path: destination `.nii` or `.nii.gz`.
        data: `(x, y, z)` array.
        affine: `(4, 4)` voxel-to-world matrix.
        dtype: on-disk dtype (defaults to the array's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return path
