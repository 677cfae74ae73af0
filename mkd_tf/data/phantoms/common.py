"""What the phantoms share: shapes in world millimetres, rendering and the atomic write of a dataset.

Every anatomy is built in world millimetres (RAS+) and sampled on each modality's own voxel grid, so
grids can differ in spacing, axis order and flips while the patient stays the same.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from mkd_tf.errors import fail
from mkd_tf.files import lock_folder, remove_stale_staging, temporary_sibling


@dataclass
class PhantomCase:
    """One synthetic case of either anatomy, as written to disk plus the tissue map it came from.

    Args:
        case_id: e.g. `ct_train_1001` (cardiac, MM-WHS) or `abdct_0001` (abdomen, nnU-Net).
        image: `(i, j, k)` int16 array (CT: HU; MRI: arbitrary units >= 0), in file axis order.
        label: `(i, j, k)` integer array of the dataset's label values (cardiac: MM-WHS values, uint16;
            abdomen: this modality's dataset.json ids, uint8), same grid as `image`.
        tissues: `(i, j, k)` uint8 array of the anatomy's tissue codes (unlabelled tissues included).
        affine: `(4, 4)` voxel-to-world (RAS+ mm) matrix shared by image and label.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    tissues: np.ndarray
    affine: np.ndarray


def grid(field_of_view, spacing, world_of_axis, signs):
    """Array shape and affine of a grid covering ``field_of_view`` (mm), centred on world (0, 0, 0).

    Args:
        field_of_view: `(x, y, z)` extent in world mm.
        spacing: `(x, y, z)` voxel size in mm, per **world** axis.
        world_of_axis: for each array axis, the world axis it runs along (e.g. `(1, 0, 2)`).
        signs: for each array axis, `+1` or `-1` (whether it runs along or against that world axis).

    Returns:
        `(array_shape, affine)`.
    """
    fov = np.asarray(field_of_view, float)
    spacing = np.asarray(spacing, float)
    array_shape = tuple(max(1, int(round(fov[w] / spacing[w]))) for w in world_of_axis)
    matrix = np.zeros((3, 3))
    for axis, (world, sign) in enumerate(zip(world_of_axis, signs)):
        matrix[world, axis] = sign * spacing[world]
    affine = np.eye(4)
    affine[:3, :3] = matrix
    # Voxel centre (n - 1) / 2 sits at world 0.
    affine[:3, 3] = -matrix @ ((np.asarray(array_shape, float) - 1.0) / 2.0)
    return array_shape, affine


def apply_matrix(matrix, points):
    """``matrix`` `(m, 3)` times ``points`` `(3, n)` in float32 (einsum: numpy's matmul is ~7x slower here)."""
    return np.einsum("ij,jn->in", np.asarray(matrix, np.float32), points)


def world_points(shape, affine):
    """`(3, n_voxels)` float32 world coordinates (mm) of every voxel centre, C order."""
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return apply_matrix(affine[:3, :3], index) + affine[:3, 3:4].astype(np.float32)


def smooth_noise(rng, points, cell_mm, scale, field_of_view):
    """A smooth random field in world mm, sampled at ``points`` `(3, n)`: independent of any voxel grid.

    White noise on a coarse lattice (``cell_mm`` apart, covering ``field_of_view`` with a margin),
    smoothed over about one cell and interpolated linearly: a field that varies over ~``cell_mm``
    with standard deviation ~``scale``.
    """
    half = np.asarray(field_of_view, float) / 2.0 + 2.0 * cell_mm
    lattice_shape = tuple(int(np.ceil(2.0 * h / cell_mm)) + 1 for h in half)
    lattice = ndimage.gaussian_filter(rng.normal(0.0, 1.0, size=lattice_shape), 0.7, mode="nearest")
    lattice *= scale / lattice.std()
    coords = (points + half[:, None].astype(np.float32)) / np.float32(cell_mm)
    return ndimage.map_coordinates(lattice.astype(np.float32), coords, order=1, mode="nearest")


def rotation(angles_deg):
    """Rotation matrix for rotations about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def frame(long_axis):
    """Orthonormal axes (columns) whose first column is ``long_axis``."""
    first = np.asarray(long_axis, float)
    first = first / np.linalg.norm(first)
    helper = np.array([0.0, 0.0, 1.0]) if abs(first[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    second = np.cross(helper, first)
    second /= np.linalg.norm(second)
    return np.stack([first, second, np.cross(first, second)], axis=1)


def ellipsoid(points, centre, semi_axes, axes=None, grow=0.0):
    """Mask of ``points`` `(3, n)` inside an ellipsoid grown by ``grow`` mm.

    The semi-axes lie along the columns of ``axes`` (identity when `None`); a huge semi-axis makes
    an elliptic cylinder.
    """
    axes = np.eye(3) if axes is None else np.asarray(axes, float)
    # One 3x3 matrix maps a point to its ellipsoid coordinates (inside <=> norm <= 1).
    to_unit = axes.T / (np.asarray(semi_axes, float) + grow)[:, None]
    offset = to_unit @ np.asarray(centre, float)
    unit = apply_matrix(to_unit, points)
    unit -= offset.astype(np.float32)[:, None]
    unit *= unit
    return unit[0] + unit[1] + unit[2] <= 1.0


def tube(points, start, end, radius):
    """Mask of ``points`` `(3, n)` within ``radius`` mm of the segment ``start``-``end`` (a capsule)."""
    start, end = np.asarray(start, np.float32), np.asarray(end, np.float32)
    direction = end - start
    length2 = float(direction @ direction)
    relative = points - start[:, None]
    projection = apply_matrix(direction[None], relative)[0]
    along = np.clip(projection / length2, 0.0, 1.0)
    # Squared distance to the closest point start + along * direction.
    relative *= relative
    distance2 = relative[0] + relative[1] + relative[2] - along * (2.0 * projection - along * length2)
    return distance2 <= radius**2


def spacing_of(affine):
    """Voxel size (mm) along each array axis of ``affine``."""
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def blur(volume, affine, sigma_mm):
    """Gaussian blur of ``sigma_mm`` in world units (per array axis in voxels): partial-volume effect."""
    return ndimage.gaussian_filter(volume, sigma_mm / spacing_of(affine), mode="nearest")


def paint(tissues, means, codes):
    """Piecewise-constant float32 image: ``means[name]`` on every voxel of tissue ``codes[name]``."""
    lookup = np.zeros(len(codes), dtype=np.float32)
    for name, value in means.items():
        lookup[codes[name]] = value
    return lookup[tissues]


def bias_field(rng, points, shape, field_of_view, gradient_sd=0.002, field_sd=0.15):
    """Receive-coil bias: ``exp`` of a smooth random field (~60 mm) plus a linear gradient from the coil side.

    Args:
        rng: `numpy.random.Generator`.
        points: `(3, n)` world coordinates of the voxels (:func:`world_points`).
        shape: array shape the field is reshaped to.
        field_of_view: world extent the smooth field covers.
        gradient_sd: standard deviation of the gradient's slope per mm (log scale).
        field_sd: standard deviation of the smooth field (log scale); the defaults give about +-30 %.

    Returns:
        `shape` float32 multiplicative field (~1).
    """
    gradient = apply_matrix(rng.normal(0.0, gradient_sd, size=(1, 3)), points)[0]
    bias = np.exp(smooth_noise(rng, points, 60.0, field_sd, field_of_view) + gradient).reshape(shape)
    return bias.astype(np.float32)


def rician(image, sigma, rng):
    """Magnitude of a complex signal ``image`` + Gaussian noise of ``sigma`` on both channels (MRI noise)."""
    real = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return np.sqrt(real**2 + imaginary**2)


def check_arguments(out_dir, n_ct, n_mr, shape, seed):
    """Fail (:class:`~mkd_tf.errors.MkdError`) on case counts < 1, a shape that is not three integers >= 8
    or a negative seed, before anything is written."""
    for name, count in (("n_ct", n_ct), ("n_mr", n_mr)):
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
            fail(out_dir, f"phantom {name} must be an integer >= 1, got {count!r}")
    if len(tuple(shape)) != 3 or any(int(n) != n or n < 8 for n in shape):
        fail(out_dir, f"phantom shape must be three integers >= 8, got {tuple(shape)!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        fail(out_dir, f"phantom seed must be a non-negative integer, got {seed!r}")


def write_staged(out_dir, fill, holds_only_phantom_files):
    """Write a phantom dataset into ``out_dir`` all or nothing.

    ``fill(staging)`` writes everything into a hidden, locked temporary sibling folder, which is renamed
    onto ``out_dir`` at the end, so an interrupted run never leaves a folder that looks complete.
    ``out_dir`` may exist only as an empty folder. A staging folder that a killed run left behind is
    removed first, but only if ``holds_only_phantom_files(folder)`` says it holds nothing but what
    ``fill`` writes and no running writer holds it.

    Args:
        out_dir: folder to create.
        fill: `callable(staging: Path)` writing the dataset's files.
        holds_only_phantom_files: `callable(folder: Path) -> bool`.

    Returns:
        `out_dir` as a `pathlib.Path`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            fail(out_dir, "exists and is not a folder")
        if any(out_dir.iterdir()):
            fail(out_dir, "exists and is not empty; choose a new folder for the phantom")
    target = out_dir.resolve()  # `.` has no name to put a sibling next to
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target, holds_only_phantom_files)  # what a killed `mkd phantom` left behind
    staging = temporary_sibling(target, folder=True)
    staging.mkdir()
    lock = lock_folder(staging)  # a concurrent `mkd phantom` into the same folder must not remove it
    try:
        fill(staging)
        try:
            # rename(2) replaces an empty directory atomically and refuses a non-empty one.
            os.replace(staging, target)
        except OSError as exc:
            fail(out_dir, f"cannot move the finished phantom into place ({exc.strerror or exc})")
    finally:
        if lock is not None:
            os.close(lock)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def holds_only(folder, allowed):
    """Whether ``folder`` holds nothing but the files ``allowed`` describes (no symlinks, no other entries).

    Args:
        folder: the folder to inspect.
        allowed: `{relative sub-folder ("" for folder itself): compiled regex of its allowed file names}`;
            every sub-folder listed may exist (or not), any other folder is foreign.

    Returns:
        `True` when every entry under ``folder`` is an allowed folder or a file whose name matches.
    """
    folder = Path(folder)
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_symlink():
            return False
        if path.is_dir():
            if relative.as_posix() not in allowed:
                return False
            continue
        pattern = allowed.get(relative.parent.as_posix() if relative.parent != Path(".") else "")
        if pattern is None or not path.is_file() or not pattern.fullmatch(path.name):
            return False
    return True
