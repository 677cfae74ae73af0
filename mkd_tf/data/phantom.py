"""The embedded default dataset: a synthetic cross-modality cardiac phantom in the MM-WHS 2017 layout.

Nothing is downloaded. Each case is a different "patient": a torso (subcutaneous fat, muscle, ribs,
sternum, spine, lungs, descending aorta) around a heart with the seven MM-WHS structures (LV blood
cavity wrapped in LV myocardium, LA, RA, RV, ascending aorta and pulmonary artery as tubes), epicardial
fat and unlabelled vessels (SVC, descending aorta) that look like blood but are background, as in the
challenge's labels. Heart size, position and rotation, torso and lung size, fat thickness and a smooth
random deformation differ per case, so a segmentor has to generalise across patients.

The anatomy is built in world millimetres (RAS+), so it does not depend on the voxel grid: each
modality samples it on its own grid. CT and MRI differ the way real scans do:

- CT: Hounsfield units, contrast-enhanced blood brightest, myocardium ~100 HU, fat ~-100 HU, lung
  ~-800 HU, Gaussian noise; grid 1.6 x 1.6 x 2.5 mm (at the default shape) with an LPS-like affine.
- MRI (bSSFP-like): bright blood *and* bright fat, dark myocardium and lung, a smooth multiplicative
  bias field and Rician noise; grid 2.0 x 2.0 x 3.0 mm with permuted, flipped array axes
  (A, R, I instead of L, P, S), so array axes do not line up with CT's.

Both cover the same ~154 x 154 x 120 mm field of view. Everything is seeded: the same seed writes
the same data, and each (modality, case id) gets its own random stream.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from mkd_tf.data.layouts import MMWHS_LABELS
from mkd_tf.data.nifti import save_volume
from mkd_tf.data.phantoms.common import PhantomCase, bias_field, grid, paint, rician, smooth_noise, write_staged
from mkd_tf.data.phantoms.common import apply_matrix as _apply
from mkd_tf.data.phantoms.common import blur as _blur
from mkd_tf.data.phantoms.common import check_arguments as _check_arguments
from mkd_tf.data.phantoms.common import ellipsoid as _ellipsoid
from mkd_tf.data.phantoms.common import frame as _frame
from mkd_tf.data.phantoms.common import rotation as _rotation
from mkd_tf.data.phantoms.common import tube as _tube
from mkd_tf.data.phantoms.common import world_points as _world_points

DEFAULT_SHAPE = (96, 96, 48)
# World field of view (x, y, z) in mm; `shape` only decides how finely CT samples it.
FIELD_OF_VIEW_MM = (153.6, 153.6, 120.0)
# MRI voxels are this much coarser than CT's: (2.0, 2.0, 3.0) mm vs (1.6, 1.6, 2.5) mm at the default.
MR_SPACING_FACTOR = (1.25, 1.25, 1.2)
FIRST_CASE_ID = 1001
MODALITIES = ("ct", "mr")

# Tissue codes of the anatomy map. Labels are derived from it; rendering needs the unlabelled
# tissues too (a segmentor must learn that fat, lung and other vessels are background).
TISSUES = {
    "air": 0,
    "soft_tissue": 1,  # skeletal muscle, mediastinum, vessel and RV walls
    "fat": 2,  # subcutaneous and epicardial
    "lung": 3,
    "bone": 4,
    "other_blood": 5,  # descending aorta, superior vena cava: blood but label background
    "myocardium": 6,
    "left_atrium": 7,
    "left_ventricle": 8,
    "right_atrium": 9,
    "right_ventricle": 10,
    "ascending_aorta": 11,
    "pulmonary_artery": 12,
}
BLOOD_TISSUES = (
    "other_blood",
    "left_atrium",
    "left_ventricle",
    "right_atrium",
    "right_ventricle",
    "ascending_aorta",
    "pulmonary_artery",
)
# In arterial-phase CT angiography the right heart is less enhanced than the left.
RIGHT_HEART_TISSUES = ("right_atrium", "right_ventricle", "pulmonary_artery", "other_blood")

_LABEL_OF_TISSUE = np.zeros(len(TISSUES), dtype=np.uint16)
for _name, _code in TISSUES.items():
    _LABEL_OF_TISSUE[_code] = MMWHS_LABELS.get(_name, 0)


def modality_grid(
    modality: str, shape: tuple[int, int, int] = DEFAULT_SHAPE
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Array shape and affine of one modality's grid over the phantom's field of view.

    Args:
        modality: `"ct"` or `"mr"`.
        shape: the CT array shape `(x, y, z)`; CT spacing is the field of view divided by it, MRI
            spacing is :data:`MR_SPACING_FACTOR` times coarser and MRI's shape follows from it.

    Returns:
        `(array_shape, affine)`. CT array axes run L, P, S (`diag(-s, -s, s)`, as DICOM-derived CT);
        MRI array axes run A, R, I (permuted and flipped). Both grids are centred on world (0, 0, 0).
    """
    ct_spacing = np.asarray(FIELD_OF_VIEW_MM, float) / np.asarray(shape, float)
    if modality == "ct":
        return grid(FIELD_OF_VIEW_MM, ct_spacing, (0, 1, 2), (-1.0, -1.0, 1.0))
    if modality == "mr":
        return grid(FIELD_OF_VIEW_MM, ct_spacing * np.asarray(MR_SPACING_FACTOR), (1, 0, 2), (1.0, 1.0, -1.0))
    raise ValueError(f"unknown phantom modality {modality!r}")


def _smooth_noise(rng, points, cell_mm, scale):
    """:func:`~mkd_tf.data.phantoms.common.smooth_noise` over the cardiac field of view."""
    return smooth_noise(rng, points, cell_mm, scale, FIELD_OF_VIEW_MM)


# The heart in its own frame (mm, x right, y anterior, z superior, origin at the heart's centre),
# before the per-case rotation, scaling and deformation. The LV long axis points to the apex:
# left, anterior and inferior, as in a real chest.
_LV_AXES = _frame((-0.55, 0.55, -0.63))
_LV_CENTRE = (-12.0, 4.0, -6.0)
_RV_AXES = _frame((-0.3, 0.5, -0.8))
_AORTA_ROOT = (1.0, -4.0, 6.0)
_PA_ROOT = (-8.0, 18.0, 6.0)
_PA_BIFURCATION = (-14.0, 4.0, 36.0)


def make_anatomy(rng: np.random.Generator, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Sample one random patient's anatomy on a voxel grid.

    Args:
        rng: `numpy.random.Generator`; everything random about the patient comes from it.
        shape: array shape `(x, y, z)`.
        affine: `(4, 4)` voxel-to-world matrix of the grid (any spacing, axis order or flips).

    Returns:
        `shape` uint8 array of :data:`TISSUES` codes.

    Example:
        >>> shape, affine = modality_grid("ct", (48, 48, 24))
        >>> tissues = make_anatomy(np.random.default_rng(0), shape, affine)
        >>> labels = tissue_labels(tissues)  # MM-WHS values
    """
    points = _world_points(shape, affine)
    # A smooth deformation (a few mm, varying over ~30 mm) bends every structure differently.
    deform_mm = rng.uniform(2.5, 4.5)
    warped = points + np.stack([_smooth_noise(rng, points, 30.0, deform_mm) for _ in range(3)])
    t = TISSUES
    tissues = np.full(points.shape[1], t["air"], dtype=np.uint8)

    # Torso: an elliptic cylinder along z with a subcutaneous fat layer.
    torso_centre = np.array([rng.uniform(-3, 3), rng.uniform(-7, -1), 0.0])
    torso_radii = np.array([rng.uniform(62, 68), rng.uniform(50, 56), 1e6])
    fat_mm = rng.uniform(3.5, 7.0)
    tissues[_ellipsoid(warped, torso_centre, torso_radii)] = t["fat"]
    tissues[_ellipsoid(warped, torso_centre, torso_radii, grow=-fat_mm)] = t["soft_tissue"]
    # Ribs: bone arcs just inside the muscle layer, alternating along z, not at the sternum.
    rib_outer = _ellipsoid(warped, torso_centre, torso_radii, grow=-(fat_mm + 4.0))
    rib_inner = _ellipsoid(warped, torso_centre, torso_radii, grow=-(fat_mm + 8.0))
    rib_pitch = rng.uniform(16.0, 20.0)
    rib_phase = np.cos(2 * np.pi * (warped[2] + 0.3 * warped[1]) / rib_pitch) > 0.3
    beside_sternum = np.abs(warped[0] - torso_centre[0]) > 14.0
    ribs = rib_outer & ~rib_inner & rib_phase & beside_sternum
    tissues[ribs] = t["bone"]

    # Lungs fill the chest either side of the mediastinum.
    lung_radii = np.array([rng.uniform(21, 25), rng.uniform(33, 38), 90.0])
    for side in (-1.0, 1.0):
        lung_centre = torso_centre + np.array([side * rng.uniform(32, 36), rng.uniform(-6, -2), 15.0])
        tissues[_ellipsoid(warped, lung_centre, lung_radii)] = t["lung"]

    # Spine, sternum and descending aorta.
    spine_centre = torso_centre + np.array([0.0, -torso_radii[1] + fat_mm + 17.0, 0.0])
    tissues[_ellipsoid(warped, spine_centre, (11.0, 10.0, 1e6))] = t["soft_tissue"]  # paraspinal
    tissues[_ellipsoid(warped, spine_centre, (rng.uniform(8.5, 10.5), rng.uniform(8, 9.5), 1e6))] = t["bone"]
    sternum_centre = torso_centre + np.array([0.0, torso_radii[1] - fat_mm - 6.0, 0.0])
    tissues[_ellipsoid(warped, sternum_centre, (9.0, 3.5, 1e6))] = t["bone"]
    descending = spine_centre + np.array([-rng.uniform(13, 17), rng.uniform(9, 12), 0.0])
    tissues[_ellipsoid(warped, descending, (1.5, 1.5, 1e6), grow=6.5)] = t["soft_tissue"]
    tissues[_ellipsoid(warped, descending, (1.5, 1.5, 1e6), grow=rng.uniform(4.5, 6.0))] = t["other_blood"]

    # The heart: per-case position, rotation and (anisotropic) size, then the structures in its frame.
    heart_centre = torso_centre + np.array([rng.uniform(-12, -4), rng.uniform(6, 12), rng.uniform(-18, -8)])
    rotation = _rotation([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-15, 15)])
    size = rng.uniform(0.85, 1.1) * rng.uniform(0.93, 1.07, size=3)
    heart = _apply(rotation.T / size[:, None], warped - heart_centre[:, None].astype(np.float32))
    _paint_heart(tissues, heart, rng)
    return tissues.reshape(shape)


def _paint_heart(tissues, heart, rng):
    """Paint pericardial fat, chambers, myocardium and great vessels (later shapes win)."""
    t = TISSUES
    # Epicardial fat: patches inside the pericardial envelope, around the chambers.
    envelope = _ellipsoid(heart, (-4.0, 2.0, -4.0), (40.0, 34.0, 36.0), _frame((-0.5, 0.5, -0.5)))
    patchy = _smooth_noise(rng, heart, 12.0, 1.0) > rng.uniform(-0.3, 0.3)
    tissues[envelope] = t["soft_tissue"]
    tissues[envelope & patchy] = t["fat"]

    wall = 2.5
    rv_centre, rv_radii = (2.0, 18.0, -8.0), (24.0, 19.0, 12.0)
    rv_radii = np.asarray(rv_radii) * rng.uniform(0.9, 1.1)
    tissues[_ellipsoid(heart, rv_centre, rv_radii, _RV_AXES, grow=wall)] = t["soft_tissue"]
    tissues[_ellipsoid(heart, rv_centre, rv_radii, _RV_AXES)] = t["right_ventricle"]

    # RA with the superior vena cava opening into it from above (blood, but not an MM-WHS
    # structure): walls first, then the SVC lumen through the RA wall, then the RA cavity.
    ra_centre, ra_radii = (24.0, -4.0, 2.0), np.array([13.0, 14.0, 17.0]) * rng.uniform(0.9, 1.1)
    svc_bottom, svc_top, svc_radius = (24.0, -6.0, 12.0), (22.0, -8.0, 80.0), rng.uniform(6.0, 8.0)
    tissues[_tube(heart, svc_bottom, svc_top, svc_radius + wall)] = t["soft_tissue"]
    tissues[_ellipsoid(heart, ra_centre, ra_radii, grow=wall)] = t["soft_tissue"]
    tissues[_tube(heart, svc_bottom, svc_top, svc_radius)] = t["other_blood"]
    tissues[_ellipsoid(heart, ra_centre, ra_radii)] = t["right_atrium"]

    # LV myocardium wraps the LV cavity: the same ellipsoid grown by the wall thickness. Painted after
    # the RV so the septum is myocardium.
    lv_radii = np.array([25.0, 14.0, 14.0]) * rng.uniform(0.9, 1.1)
    myocardium_mm = rng.uniform(6.0, 9.0)
    tissues[_ellipsoid(heart, _LV_CENTRE, lv_radii, _LV_AXES, grow=myocardium_mm)] = t["myocardium"]
    tissues[_ellipsoid(heart, _LV_CENTRE, lv_radii, _LV_AXES)] = t["left_ventricle"]

    la_centre, la_radii = (-6.0, -22.0, 9.0), np.array([19.0, 11.0, 12.0]) * rng.uniform(0.9, 1.1)
    tissues[_ellipsoid(heart, la_centre, la_radii, grow=wall)] = t["soft_tissue"]
    tissues[_ellipsoid(heart, la_centre, la_radii)] = t["left_atrium"]

    # Pulmonary artery from the RV outflow upwards, then short left and right branches.
    pa_radius = rng.uniform(9.0, 11.0)
    pa_segments = [
        (_PA_ROOT, _PA_BIFURCATION, pa_radius),
        (_PA_BIFURCATION, (-40.0, -10.0, 40.0), 0.7 * pa_radius),
        (_PA_BIFURCATION, (18.0, -16.0, 38.0), 0.7 * pa_radius),
    ]
    for start, end, radius in pa_segments:
        tissues[_tube(heart, start, end, radius + wall)] = t["soft_tissue"]
    for start, end, radius in pa_segments:
        tissues[_tube(heart, start, end, radius)] = t["pulmonary_artery"]

    # Ascending aorta from the LV outflow straight up, slightly right and posterior (passes in front
    # of the right pulmonary artery, so it is painted last).
    aorta_radius = rng.uniform(10.0, 13.0)
    aorta_top = (4.0, -8.0, 90.0)
    tissues[_tube(heart, _AORTA_ROOT, aorta_top, aorta_radius + wall)] = t["soft_tissue"]
    tissues[_tube(heart, _AORTA_ROOT, aorta_top, aorta_radius)] = t["ascending_aorta"]


def tissue_labels(tissues: np.ndarray) -> np.ndarray:
    """MM-WHS label values (uint16) of a tissue map: the seven structures, everything else 0."""
    return _LABEL_OF_TISSUE[tissues]


def _paint(tissues, means):
    """Piecewise-constant image: ``means[name]`` on every voxel of that tissue."""
    return paint(tissues, means, TISSUES)


def ct_intensities(rng: np.random.Generator) -> np.ndarray:
    """One case's mean Hounsfield unit per tissue (contrast-enhanced CT angiography)."""
    blood = rng.uniform(250.0, 400.0)
    right_heart = blood * rng.uniform(0.85, 1.0)
    means = {
        "air": -1000.0,
        "soft_tissue": rng.uniform(35.0, 50.0),
        "fat": rng.uniform(-110.0, -90.0),
        "lung": rng.uniform(-830.0, -780.0),
        "bone": rng.uniform(650.0, 750.0),
        "myocardium": rng.uniform(90.0, 120.0),
    }
    for name in BLOOD_TISSUES:
        means[name] = right_heart if name in RIGHT_HEART_TISSUES else blood
    return means


def render_ct(tissues: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT image (HU, int16) of a tissue map: per-case enhancement, lung texture, mild blur, Gaussian noise.

    Args:
        tissues: `(x, y, z)` :data:`TISSUES` codes.
        affine: `(4, 4)` grid affine (blur and texture are specified in mm).
        rng: `numpy.random.Generator`.

    Returns:
        `(x, y, z)` int16 array in Hounsfield units.
    """
    image = _paint(tissues, ct_intensities(rng))
    points = _world_points(tissues.shape, affine)
    lung = tissues == TISSUES["lung"]
    image[lung] += _smooth_noise(rng, points[:, lung.ravel()], 6.0, 25.0).astype(np.float32)
    image = _blur(image, affine, rng.uniform(0.6, 1.0))
    image += rng.normal(0.0, rng.uniform(10.0, 20.0), size=image.shape).astype(np.float32)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16)


def mr_intensities(rng: np.random.Generator) -> np.ndarray:
    """One case's mean signal per tissue (bSSFP: contrast follows T2/T1, so blood and fat are bright)."""
    blood = rng.uniform(700.0, 950.0)
    means = {
        "air": 0.0,
        "soft_tissue": blood * rng.uniform(0.22, 0.3),
        "fat": blood * rng.uniform(0.8, 1.0),
        "lung": blood * rng.uniform(0.03, 0.06),
        "bone": blood * rng.uniform(0.4, 0.5),  # fatty vertebral marrow
        "myocardium": blood * rng.uniform(0.15, 0.22),
    }
    for name in BLOOD_TISSUES:
        means[name] = blood * rng.uniform(0.92, 1.0)
    return means


def render_mr(tissues: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bSSFP-like MR image of a tissue map: smooth bias field, blur, Rician noise.

    Args:
        tissues: `(x, y, z)` :data:`TISSUES` codes.
        affine: `(4, 4)` grid affine (blur and bias field are specified in mm).
        rng: `numpy.random.Generator`.

    Returns:
        `(x, y, z)` int16 array of non-negative arbitrary units (~0-1000).
    """
    image = _paint(tissues, mr_intensities(rng))
    image = _blur(image, affine, rng.uniform(0.8, 1.3))
    points = _world_points(tissues.shape, affine)
    # Receive-coil bias: a smooth random field plus a gradient from the coil side, ~+-30 %.
    image = image * bias_field(rng, points, tissues.shape, FIELD_OF_VIEW_MM)
    image = rician(image, rng.uniform(10.0, 25.0), rng)
    return np.clip(np.round(image), 0, 32767).astype(np.int16)


def phantom_case(
    modality: str, case_number: int, seed: int = 0, shape: tuple[int, int, int] = DEFAULT_SHAPE
) -> PhantomCase:
    """Build one case exactly as :func:`write_phantom` writes it.

    Args:
        modality: `"ct"` or `"mr"`.
        case_number: MM-WHS case id, e.g. `1001`.
        seed: dataset seed; `(seed, modality, case_number)` seeds this case's random stream.
        shape: CT array shape (see :func:`modality_grid`).

    Returns:
        :class:`PhantomCase`.
    """
    rng = np.random.default_rng([int(seed), MODALITIES.index(modality), int(case_number)])
    grid_shape, affine = modality_grid(modality, shape)
    tissues = make_anatomy(rng, grid_shape, affine)
    render = render_ct if modality == "ct" else render_mr
    image = render(tissues, affine, rng)
    return PhantomCase(f"{modality}_train_{case_number}", image, tissue_labels(tissues), tissues, affine)


def write_phantom(
    out_dir: str | os.PathLike, n_ct: int = 6, n_mr: int = 6, shape: tuple[int, int, int] = DEFAULT_SHAPE, seed: int = 0
) -> Path:
    """Write the phantom dataset in the MM-WHS 2017 layout.

    Writes `out_dir/ct_train/ct_train_1001_image.nii.gz` (int16 HU) and `..._label.nii.gz` (uint16
    MM-WHS values), ids 1001 upwards, and the same under `out_dir/mr_train/`. Everything goes into a
    hidden temporary sibling folder that is renamed into place at the end, so an interrupted run
    never leaves a folder that looks complete.

    Args:
        out_dir: folder to create; it may exist only if empty.
        n_ct, n_mr: number of CT and MRI cases.
        shape: CT array shape `(x, y, z)`; MRI's follows from its coarser spacing.
        seed: the same seed writes the same data.

    Returns:
        `out_dir` as a `pathlib.Path`.

    Example:
        >>> write_phantom("demo/data", n_ct=2, n_mr=2, shape=(48, 48, 24))
        PosixPath('demo/data')
        >>> sorted(path.name for path in Path("demo/data/ct_train").iterdir())[:2]
        ['ct_train_1001_image.nii.gz', 'ct_train_1001_label.nii.gz']
    """
    shape = tuple(shape)
    _check_arguments(Path(out_dir), n_ct, n_mr, shape, seed)

    def fill(staging):
        for modality, count in (("ct", n_ct), ("mr", n_mr)):
            folder = staging / f"{modality}_train"
            for case_number in range(FIRST_CASE_ID, FIRST_CASE_ID + count):
                case = phantom_case(modality, case_number, seed, shape)
                save_volume(folder / f"{case.case_id}_image.nii.gz", case.image, case.affine, np.int16)
                save_volume(folder / f"{case.case_id}_label.nii.gz", case.label, case.affine, np.uint16)

    return write_staged(out_dir, fill, _holds_only_phantom_files)


_PHANTOM_FILE = re.compile(r"(?:\.)?[a-z]+_train_\d+_(?:image|label)(?:\.tmp-[0-9a-f]{8})?\.nii\.gz")


def _holds_only_phantom_files(folder):
    """Whether ``folder`` holds nothing but what :func:`write_phantom` writes: ``ct_train/`` and
    ``mr_train/`` with ``*_image.nii.gz`` / ``*_label.nii.gz`` files (or their hidden temporaries)."""
    for entry in Path(folder).iterdir():
        if entry.name not in ("ct_train", "mr_train") or entry.is_symlink() or not entry.is_dir():
            return False
        for item in entry.iterdir():
            if item.is_symlink() or not item.is_file() or not _PHANTOM_FILE.fullmatch(item.name):
                return False
    return True
