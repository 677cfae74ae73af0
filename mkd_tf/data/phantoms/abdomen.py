"""A synthetic cross-modality abdominal phantom in the nnU-Net v2 raw layout: plain CT vs T2-weighted MRI.

Each case is a different "patient": a body outline with subcutaneous fat, an abdominal muscle wall,
paraspinal and psoas muscles, a vertebra, aorta and inferior vena cava, a fluid-filled stomach and bowel
(unlabelled), and the four labelled organs: liver, right kidney, left kidney, spleen. Body size, fat
thickness, organ sizes, positions and rotations and a smooth random deformation differ per case.

The two modalities differ in ways batch statistics cannot absorb:

- CT (non-contrast, Hounsfield units): liver ~60 > spleen ~47 > kidneys ~35 HU, muscle ~50, fat ~-100,
  bone 400+, air -1000, Gaussian noise; axial grid 3 x 3 x 5 mm (at the default shape), LPS-like axes.
- MRI (T2-weighted-like): the organ order is reversed (kidneys > spleen > liver), fat and fluid are
  bright, vessels are dark (flow voids), plus a smooth bias field and Rician noise; a **coronal** grid
  3.6 x 6 x 4 mm (x, y, z) whose array axes run I, R, A, so array axes do not line up with CT's.
- The two dataset.json files number the organs differently (CT: liver 1, kidney_right 2, kidney_left 3,
  spleen 4; MRI: liver 1, spleen 2, kidney_right 3, kidney_left 4): `mkd prepare` matches them by name.

Everything is seeded: the same seed writes the same bytes, and each (modality, case) has its own stream.
"""

import json
import re
from pathlib import Path

import numpy as np

from mkd_tf.data.nifti import save_volume
from mkd_tf.data.phantoms.common import (
    PhantomCase,
    bias_field,
    blur,
    check_arguments,
    ellipsoid,
    frame,
    grid,
    holds_only,
    paint,
    rician,
    rotation,
    smooth_noise,
    world_points,
    write_staged,
)

# CT array shape at the default; CT spacing is FIELD_OF_VIEW_MM / shape = 3 x 3 x 5 mm.
DEFAULT_SHAPE = (96, 80, 32)
# World field of view (x, y, z) in mm: a small adult's abdomen from the dome of the liver down.
FIELD_OF_VIEW_MM = (288.0, 240.0, 160.0)
# MRI voxel size relative to CT's, per world axis: (3.6, 6.0, 4.0) mm at the default; coronal slices
# (thick along y), finer than CT along z.
MR_SPACING_FACTOR = (1.2, 2.0, 0.8)
MODALITIES = ("ct", "mr")

# nnU-Net dataset folder, case-name prefix and channel name of each modality.
DATASETS = {"ct": "Dataset501_AbdomenCT", "mr": "Dataset502_AbdomenMR"}
CASE_PREFIX = {"ct": "abdct", "mr": "abdmr"}
CHANNEL_NAMES = {"ct": "CT", "mr": "T2"}
FILE_ENDING = ".nii.gz"
# Label ids per modality: deliberately different, as when two datasets come from different sources.
LABELS = {
    "ct": {"background": 0, "liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4},
    "mr": {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4},
}
ORGANS = ("liver", "kidney_right", "kidney_left", "spleen")

# Tissue codes of the anatomy map; labels are derived from it.
TISSUES = {
    "air": 0,
    "muscle": 1,  # abdominal wall, paraspinal and psoas muscles
    "fat": 2,  # subcutaneous and visceral
    "bone": 3,
    "viscera": 4,  # bowel and mesentery: unlabelled soft tissue
    "fluid": 5,  # stomach and bowel contents
    "vessel": 6,  # aorta and inferior vena cava
    "liver": 7,
    "kidney_right": 8,
    "kidney_left": 9,
    "spleen": 10,
}


def _label_lookup(modality):
    lookup = np.zeros(len(TISSUES), dtype=np.uint8)
    for name, value in LABELS[modality].items():
        if name != "background":
            lookup[TISSUES[name]] = value
    return lookup


_LABEL_OF_TISSUE = {modality: _label_lookup(modality) for modality in MODALITIES}


def modality_grid(modality, shape=DEFAULT_SHAPE):
    """Array shape and affine of one modality's grid over the abdominal field of view.

    Args:
        modality: `"ct"` or `"mr"`.
        shape: the CT array shape `(x, y, z)`; MRI spacing is :data:`MR_SPACING_FACTOR` times CT's.

    Returns:
        `(array_shape, affine)`. CT array axes run L, P, S (axial slices); MRI array axes run I, R, A
        (coronal slices, thick along A-P). Both grids are centred on world (0, 0, 0).
    """
    ct_spacing = np.asarray(FIELD_OF_VIEW_MM, float) / np.asarray(shape, float)
    if modality == "ct":
        return grid(FIELD_OF_VIEW_MM, ct_spacing, (0, 1, 2), (-1.0, -1.0, 1.0))
    if modality == "mr":
        return grid(FIELD_OF_VIEW_MM, ct_spacing * np.asarray(MR_SPACING_FACTOR), (2, 0, 1), (-1.0, 1.0, 1.0))
    raise ValueError(f"unknown phantom modality {modality!r}")


def _smooth_noise(rng, points, cell_mm, scale):
    return smooth_noise(rng, points, cell_mm, scale, FIELD_OF_VIEW_MM)


def make_anatomy(rng, shape, affine):
    """Sample one random patient's abdomen on a voxel grid.

    Args:
        rng: `numpy.random.Generator`; everything random about the patient comes from it.
        shape: array shape.
        affine: `(4, 4)` voxel-to-world matrix of the grid (any spacing, axis order or flips).

    Returns:
        `shape` uint8 array of :data:`TISSUES` codes.
    """
    points = world_points(shape, affine)
    # A smooth deformation (a few mm, varying over ~40 mm) bends every structure differently.
    deform_mm = rng.uniform(3.0, 5.0)
    warped = points + np.stack([_smooth_noise(rng, points, 40.0, deform_mm) for _ in range(3)])
    t = TISSUES
    tissues = np.full(points.shape[1], t["air"], dtype=np.uint8)

    body_centre, body_radii, fat_mm, cavity = _body(rng, warped, tissues)
    vertebra = _spine_and_vessels(rng, warped, tissues, body_centre, body_radii, fat_mm)
    _stomach(rng, warped, tissues, body_centre)
    _organs(rng, warped, tissues, body_centre, cavity, vertebra)
    return tissues.reshape(shape)


def _body(rng, warped, tissues):
    """Body: an elliptic cylinder along z; subcutaneous fat, a muscle wall, then the abdominal cavity (bowel
    and mesentery with patches of visceral fat). Returns its centre, radii, fat thickness and the cavity."""
    t = TISSUES
    body_centre = np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), 0.0])
    body_radii = np.array([rng.uniform(118, 130), rng.uniform(88, 100), 1e6])
    fat_mm = rng.uniform(8.0, 20.0)
    wall_mm = rng.uniform(7.0, 11.0)
    tissues[ellipsoid(warped, body_centre, body_radii)] = t["fat"]
    tissues[ellipsoid(warped, body_centre, body_radii, grow=-fat_mm)] = t["muscle"]
    cavity = ellipsoid(warped, body_centre, body_radii, grow=-(fat_mm + wall_mm))
    tissues[cavity] = t["viscera"]
    visceral_fat = _smooth_noise(rng, warped, 14.0, 1.0) > rng.uniform(0.3, 0.9)
    tissues[cavity & visceral_fat] = t["fat"]
    # Fluid-filled bowel loops: small blobs of a smooth field.
    loops = _smooth_noise(rng, warped, 10.0, 1.0) > rng.uniform(1.0, 1.4)
    tissues[cavity & loops & ~visceral_fat] = t["fluid"]
    return body_centre, body_radii, fat_mm, cavity


def _spine_and_vessels(rng, warped, tissues, body_centre, body_radii, fat_mm):
    """Spine at the back: vertebral body, paraspinal muscles behind it, psoas muscles beside it; the aorta
    left-anterior of the vertebra, the inferior vena cava right-anterior. Returns the vertebra's centre."""
    t = TISSUES
    back = body_centre[1] - body_radii[1] + fat_mm
    vertebra = body_centre + np.array([0.0, back - body_centre[1] + rng.uniform(44, 50), 0.0])
    tissues[ellipsoid(warped, vertebra + np.array([0.0, -30.0, 0.0]), (34.0, 20.0, 1e6))] = t["muscle"]
    for side in (-1.0, 1.0):
        tissues[ellipsoid(warped, vertebra + np.array([side * 24.0, -2.0, 0.0]), (10.0, 12.0, 1e6))] = t["muscle"]
    tissues[ellipsoid(warped, vertebra, (rng.uniform(15, 18), rng.uniform(13, 16), 1e6))] = t["bone"]
    tissues[ellipsoid(warped, vertebra + np.array([0.0, -24.0, 0.0]), (4.0, 11.0, 1e6))] = t["bone"]  # spinous process
    aorta = vertebra + np.array([-rng.uniform(12, 16), rng.uniform(22, 26), 0.0])
    cava = vertebra + np.array([rng.uniform(20, 26), rng.uniform(24, 30), 0.0])
    tissues[ellipsoid(warped, aorta, (1.0, 1.0, 1e6), grow=rng.uniform(9.0, 11.0))] = t["vessel"]
    tissues[ellipsoid(warped, cava, (rng.uniform(9, 12), rng.uniform(6, 9), 1e6))] = t["vessel"]
    return vertebra


def _stomach(rng, warped, tissues, body_centre):
    """Stomach: left upper quadrant, anterior, a fluid-filled sac with a muscular wall."""
    stomach = body_centre + np.array([-rng.uniform(30, 45), rng.uniform(25, 40), rng.uniform(35, 50)])
    stomach_radii = np.array([30.0, 22.0, 28.0]) * rng.uniform(0.8, 1.15)
    tissues[ellipsoid(warped, stomach, stomach_radii, grow=4.0)] = TISSUES["muscle"]
    tissues[ellipsoid(warped, stomach, stomach_radii)] = TISSUES["fluid"]


def _organs(rng, warped, tissues, body_centre, cavity, vertebra):
    """The labelled organs: kidneys, spleen and the liver's two lobes, inside the cavity."""
    t = TISSUES

    def organ(name, centre, semi_axes, long_axis, angles, spread):
        # Per-case size, position and rotation about the organ's nominal frame.
        axes = rotation(angles) @ frame(long_axis)
        size = rng.uniform(0.88, 1.12) * rng.uniform(0.93, 1.07, size=3)
        shifted = np.asarray(centre, float) + rng.uniform(-spread, spread, size=3)
        mask = ellipsoid(warped, body_centre + shifted, np.asarray(semi_axes) * size, axes)
        tissues[mask & cavity] = t[name]  # organs stay inside the muscle wall
        return body_centre + shifted

    # Kidneys: retroperitoneal either side of the spine, long axis tilted; the right one lower.
    kidney_y = vertebra[1] - body_centre[1] + rng.uniform(-2, 4)
    for name, side, z in (("kidney_right", 1.0, -30.0), ("kidney_left", -1.0, -15.0)):
        organ(
            name,
            (side * rng.uniform(50, 58), kidney_y, z),
            (55.0, 28.0, 20.0),
            (-side * 0.25, 0.25, 1.0),
            rng.uniform(-10, 10, size=3),
            5.0,
        )
    # Spleen: left, posterior, high; long axis along the ribs.
    organ(
        "spleen",
        (-rng.uniform(64, 72), -rng.uniform(26, 34), 36.0),
        (55.0, 34.0, 22.0),
        (0.3, 0.8, 0.5),
        rng.uniform(-10, 10, size=3),
        5.0,
    )
    # Liver: a large right lobe and a smaller left lobe reaching across the midline, above the right kidney.
    right_lobe = organ(
        "liver",
        (rng.uniform(44, 52), rng.uniform(-2, 6), 42.0),
        (55.0, 50.0, 50.0),
        (0.0, 0.3, 1.0),
        rng.uniform(-8, 8, size=3),
        4.0,
    )
    left_lobe = right_lobe - body_centre + np.array([-rng.uniform(48, 58), rng.uniform(14, 22), rng.uniform(4, 12)])
    organ("liver", left_lobe, (40.0, 22.0, 26.0), (1.0, 0.2, 0.0), rng.uniform(-8, 8, size=3), 3.0)


def tissue_labels(tissues, modality):
    """Label ids of ``modality`` (:data:`LABELS`) of a tissue map: the four organs, everything else 0."""
    return _LABEL_OF_TISSUE[modality][tissues]


def ct_intensities(rng):
    """One case's mean Hounsfield unit per tissue (non-contrast CT)."""
    return {
        "air": -1000.0,
        "muscle": rng.uniform(45.0, 55.0),
        "fat": rng.uniform(-110.0, -90.0),
        "bone": rng.uniform(400.0, 650.0),
        "viscera": rng.uniform(20.0, 35.0),
        "fluid": rng.uniform(0.0, 12.0),
        "vessel": rng.uniform(35.0, 45.0),
        "liver": rng.uniform(55.0, 65.0),
        "kidney_right": rng.uniform(30.0, 38.0),
        "kidney_left": rng.uniform(30.0, 38.0),
        "spleen": rng.uniform(44.0, 50.0),
    }


def render_ct(tissues, affine, rng):
    """CT image (HU, int16): tissue texture, partial-volume blur, Gaussian noise.

    Args:
        tissues: :data:`TISSUES` codes on the grid.
        affine: `(4, 4)` grid affine (blur and texture are specified in mm).
        rng: `numpy.random.Generator`.

    Returns:
        int16 array in Hounsfield units.
    """
    image = paint(tissues, ct_intensities(rng), TISSUES)
    points = world_points(tissues.shape, affine)
    # Parenchymal texture of a few HU, varying over ~8 mm.
    image += _smooth_noise(rng, points, 8.0, 3.0).reshape(tissues.shape)
    image = blur(image, affine, rng.uniform(0.8, 1.2))
    image += rng.normal(0.0, rng.uniform(5.0, 9.0), size=image.shape).astype(np.float32)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16)


def mr_intensities(rng):
    """One case's mean signal per tissue (T2-weighted, no fat suppression: fat and fluid bright)."""
    fluid = rng.uniform(800.0, 950.0)
    return {
        "air": 0.0,
        "muscle": fluid * rng.uniform(0.12, 0.17),
        "fat": fluid * rng.uniform(0.75, 0.9),
        "bone": fluid * rng.uniform(0.4, 0.5),  # fatty vertebral marrow
        "viscera": fluid * rng.uniform(0.35, 0.45),
        "fluid": fluid,
        "vessel": fluid * rng.uniform(0.04, 0.08),  # flow voids
        "liver": fluid * rng.uniform(0.2, 0.26),
        "kidney_right": fluid * rng.uniform(0.6, 0.7),
        "kidney_left": fluid * rng.uniform(0.6, 0.7),
        "spleen": fluid * rng.uniform(0.44, 0.52),
    }


def render_mr(tissues, affine, rng):
    """T2-weighted-like MR image: partial-volume blur, smooth bias field, Rician noise.

    Args:
        tissues: :data:`TISSUES` codes on the grid.
        affine: `(4, 4)` grid affine (blur and bias field are specified in mm).
        rng: `numpy.random.Generator`.

    Returns:
        int16 array of non-negative arbitrary units (~0-1000).
    """
    image = paint(tissues, mr_intensities(rng), TISSUES)
    image = blur(image, affine, rng.uniform(1.0, 1.5))
    points = world_points(tissues.shape, affine)
    image = image * bias_field(rng, points, tissues.shape, FIELD_OF_VIEW_MM, gradient_sd=0.0015, field_sd=0.15)
    image = rician(image, rng.uniform(10.0, 20.0), rng)
    return np.clip(np.round(image), 0, 32767).astype(np.int16)


def abdomen_case(modality, case_number, seed=0, shape=DEFAULT_SHAPE):
    """Build one case exactly as :func:`write_abdomen_phantom` writes it.

    Args:
        modality: `"ct"` or `"mr"`.
        case_number: 1, 2, ... (the case id is e.g. `abdct_0001`).
        seed: dataset seed; `(seed, anatomy, modality, case_number)` seeds this case's random stream.
        shape: CT array shape (see :func:`modality_grid`).

    Returns:
        :class:`~mkd_tf.data.phantoms.common.PhantomCase`.
    """
    # The constant 2 keeps the abdomen's streams apart from the cardiac phantom's `[seed, modality, case]`.
    rng = np.random.default_rng([int(seed), 2, MODALITIES.index(modality), int(case_number)])
    grid_shape, affine = modality_grid(modality, shape)
    tissues = make_anatomy(rng, grid_shape, affine)
    render = render_ct if modality == "ct" else render_mr
    image = render(tissues, affine, rng)
    case_id = f"{CASE_PREFIX[modality]}_{int(case_number):04d}"
    return PhantomCase(case_id, image, tissue_labels(tissues, modality), tissues, affine)


def dataset_json(modality, count):
    """The nnU-Net v2 `dataset.json` of one modality's dataset of ``count`` training cases."""
    return {
        "name": DATASETS[modality].split("_", 1)[1],
        "description": "mkd-tf synthetic abdominal phantom (mkd phantom --anatomy abdomen)",
        "channel_names": {"0": CHANNEL_NAMES[modality]},
        "labels": dict(LABELS[modality]),
        "numTraining": int(count),
        "file_ending": FILE_ENDING,
    }


def write_abdomen_phantom(out_dir, n_ct=6, n_mr=6, shape=DEFAULT_SHAPE, seed=0):
    """Write the abdominal phantom as two nnU-Net v2 raw datasets.

    Writes `out_dir/Dataset501_AbdomenCT/` (`dataset.json`, `imagesTr/abdct_0001_0000.nii.gz` int16 HU,
    `labelsTr/abdct_0001.nii.gz` uint8) and `out_dir/Dataset502_AbdomenMR/` likewise (`abdmr_...`). Every
    case is labelled and in `imagesTr/`: `mkd prepare` makes the target's train/val/test split itself.
    The write is staged and atomic like the cardiac phantom's.

    Args:
        out_dir: folder to create; it may exist only if empty.
        n_ct, n_mr: number of CT and MRI cases.
        shape: CT array shape `(x, y, z)`; MRI's follows from its spacing.
        seed: the same seed writes the same bytes.

    Returns:
        `out_dir` as a `pathlib.Path`.

    Example:
        >>> write_abdomen_phantom("demo/abdomen", n_ct=2, n_mr=2, shape=(48, 40, 16))
        PosixPath('demo/abdomen')
    """
    shape = tuple(shape)
    check_arguments(Path(out_dir), n_ct, n_mr, shape, seed)

    def fill(staging):
        for modality, count in (("ct", n_ct), ("mr", n_mr)):
            root = staging / DATASETS[modality]
            for case_number in range(1, count + 1):
                case = abdomen_case(modality, case_number, seed, shape)
                name = f"{case.case_id}_0000{FILE_ENDING}"
                save_volume(root / "imagesTr" / name, case.image, case.affine, np.int16)
                save_volume(root / "labelsTr" / f"{case.case_id}{FILE_ENDING}", case.label, case.affine, np.uint8)
            text = json.dumps(dataset_json(modality, count), indent=2) + "\n"
            (root / "dataset.json").write_text(text)

    return write_staged(out_dir, fill, _holds_only_phantom_files)


def _phantom_files():
    temporary = r"(?:\.tmp-[0-9a-f]{8})?"
    allowed = {}
    for modality, folder in DATASETS.items():
        prefix = CASE_PREFIX[modality]
        allowed[""] = None
        allowed[folder] = re.compile(r"dataset\.json")
        allowed[f"{folder}/imagesTr"] = re.compile(rf"\.?{prefix}_\d{{4}}_0000{temporary}\.nii\.gz")
        allowed[f"{folder}/labelsTr"] = re.compile(rf"\.?{prefix}_\d{{4}}{temporary}\.nii\.gz")
    return allowed


_ALLOWED = _phantom_files()


def _holds_only_phantom_files(folder):
    """Whether ``folder`` holds nothing but what :func:`write_abdomen_phantom` writes."""
    return holds_only(folder, _ALLOWED)
