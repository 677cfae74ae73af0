"""Volume -> training slices, and the exact way back.

Forward (:func:`preprocess_volume`), each step's parameters recorded in a JSON-able dict:

1. reorient to canonical RAS axis order (axis permutation and flips only: exact);
2. resample to ``spacing`` mm (images linear, labels nearest); resampled voxel ``r`` sits at canonical
   voxel coordinate ``r * spacing / original_spacing`` (voxel centres at index 0 coincide);
3. intensities: CT clipped to a HU window and scaled to [-1, 1]; other modalities clipped at
   percentiles and z-scored;
4. slice along ``axis`` (2 = axial) and crop/pad each slice to ``size`` x ``size`` around the body
   (one window per volume, centred on the body's bounding box).

Inverse (:func:`labels_to_original`): pad/crop back, un-slice, nearest-neighbour resample onto the
canonical grid, undo the reorientation, and map class indices to the file's label values. With
``spacing`` equal to the input spacing and a window that holds the body, the round trip is exact.
"""

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from mkd_tf.data.nifti import from_canonical, to_canonical
from mkd_tf.errors import fail
from mkd_tf.rules import MIN_SPACING_MM, spacing_too_fine


@dataclass
class PreprocessConfig:
    """How volumes become slices.

    Args:
        spacing: target voxel size in mm, `(x, y, z)` in RAS order.
        size: slice height and width in pixels.
        axis: slicing axis in RAS order (0 sagittal, 1 coronal, 2 axial).
        ct_window: HU range mapped linearly to [-1, 1] for CT.
        percentiles: clip range for z-scored (MRI and other) modalities.
    """

    spacing: tuple = (1.5, 1.5, 1.5)
    size: int = 256
    axis: int = 2
    ct_window: tuple = (-200.0, 800.0)
    percentiles: tuple = (0.5, 99.5)

    def check(self):
        """Refuse values that cannot work, naming the `mkd prepare` option (one line, before any work).

        Raises:
            MkdError: e.g. `--spacing: every value must be a finite number > 0 (mm), got [0.0, 0.0, 0.0]`.
        """
        spacing = _numbers(self.spacing, 3, "--spacing")
        if not all(np.isfinite(s) and s > 0 for s in spacing):
            fail("--spacing", f"every value must be a finite number > 0 (mm), got {spacing}")
        if min(spacing) < MIN_SPACING_MM:
            fail("--spacing", f"{spacing_too_fine(spacing)}, got {spacing}")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 8:
            fail("--size", f"must be an integer >= 8 (pixels), got {self.size!r}")
        if self.axis not in (0, 1, 2) or isinstance(self.axis, bool):
            fail("--axis", f"must be 0, 1 or 2 (sagittal, coronal, axial), got {self.axis!r}")
        low, high = _numbers(self.ct_window, 2, "--ct-window")
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            fail("--ct-window", f"must be two finite HU values low,high with low < high, got {low:g},{high:g}")
        low, high = _numbers(self.percentiles, 2, "--percentiles")
        if not (np.isfinite(low) and np.isfinite(high) and 0 <= low < high <= 100):
            fail("--percentiles", f"must be two percentiles low,high with 0 <= low < high <= 100, got {low:g},{high:g}")
        return self

    def to_dict(self):
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        for key in ("spacing", "ct_window", "percentiles"):
            values[key] = tuple(values[key])
        return cls(**values)


def _numbers(values, count, option):
    """``values`` as a list of ``count`` floats, or an :class:`MkdError` naming ``option``."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        fail(option, f"expected {count} numbers, got {values!r}")
    if len(numbers) != count:
        fail(option, f"expected {count} numbers, got {len(numbers)}")
    return numbers


def intensity_kind(modality):
    """`"ct"` (HU window) for CT, `"zscore"` for everything else."""
    return "ct" if modality.lower() in ("ct", "cta", "cect") else "zscore"


def _resample_scale(original_spacing, spacing):
    return np.asarray(spacing, float) / np.asarray(original_spacing, float)


def resampled_shape(shape, original_spacing, spacing):
    """Number of resampled voxels whose centres fall inside the original grid."""
    scale = _resample_scale(original_spacing, spacing)
    return tuple(int(n) for n in np.floor((np.asarray(shape) - 1) / scale + 1e-6).astype(int) + 1)


def resample(data, original_spacing, spacing, order):
    """Resample a canonical volume to ``spacing`` (order 1 linear, 0 nearest)."""
    scale = _resample_scale(original_spacing, spacing)
    if np.allclose(scale, 1.0):
        return data.copy()
    shape = resampled_shape(data.shape, original_spacing, spacing)
    return ndimage.affine_transform(data, scale, output_shape=shape, order=order, mode="nearest", prefilter=False)


def normalise_intensity(image, kind, config):
    """Scale intensities; returns `(normalised float32, parameters)`."""
    if kind == "ct":
        low, high = config.ct_window
        normalised = (np.clip(image, low, high) - low) / (high - low) * 2.0 - 1.0
        return normalised.astype(np.float32), {"kind": "ct", "window": [float(low), float(high)]}
    low, high = (float(v) for v in np.percentile(image, config.percentiles))
    clipped = np.clip(image, low, high)
    mean, std = float(clipped.mean()), float(clipped.std())
    std = std if std > 1e-6 else 1.0
    return ((clipped - mean) / std).astype(np.float32), {
        "kind": "zscore",
        "clip": [low, high],
        "mean": mean,
        "std": std,
    }


def _crop_window(normalised, axis, size):
    """Per-axis start of the size x size in-plane window centred on the body's bounding box."""
    plane_axes = [a for a in range(3) if a != axis]
    # Body = clearly above the background level; robust to noisy air in MRI.
    low, high = np.percentile(normalised, (1, 99))
    body = normalised > low + 0.15 * (high - low)
    starts = []
    for plane_axis in plane_axes:
        other = tuple(a for a in range(3) if a != plane_axis)
        profile = np.flatnonzero(body.any(axis=other))
        centre = (profile[0] + profile[-1]) / 2.0 if profile.size else (normalised.shape[plane_axis] - 1) / 2.0
        starts.append(int(np.floor(centre - (size - 1) / 2.0 + 0.5)))
    return plane_axes, starts


def _extract_slices(volume, axis, plane_axes, starts, size, fill):
    """`(slices, size, size)` windows of ``volume`` along ``axis``; outside the volume is ``fill``."""
    moved = np.moveaxis(volume, axis, 0)
    out = np.full((moved.shape[0], size, size), fill, dtype=volume.dtype)
    src, dst = [slice(None)], [slice(None)]
    for plane_axis, start in zip(plane_axes, starts):
        length = volume.shape[plane_axis]
        lo, hi = max(start, 0), min(start + size, length)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - start, lo - start + max(hi - lo, 0)))
    out[tuple(dst)] = moved[tuple(src)]
    return out


def map_label_values(label, value_to_class, path):
    """File label values -> class indices; values outside the dataset's table are an error."""
    values = np.unique(label)
    unknown = [int(v) for v in values if int(v) not in value_to_class]
    if unknown:
        known = sorted(value_to_class)
        fail(path, f"unknown label values {unknown[:10]} (known: {known})")
    lookup = np.zeros(int(max(values.max(), max(value_to_class))) + 1, np.uint8)
    for value, index in value_to_class.items():
        if value >= 0:
            lookup[value] = index
    if values.min() < 0:
        fail(path, f"negative label values {[int(v) for v in values if v < 0]}")
    return lookup[label]


def preprocess_volume(image, label, modality, config, value_to_class=None):
    """Turn one volume (and its label) into slices.

    Args:
        image: :class:`mkd_tf.data.nifti.Volume` of intensities.
        label: :class:`Volume` of file label values, or `None`.
        modality: e.g. `"ct"`, `"mr"`; picks the intensity normalisation.
        config: :class:`PreprocessConfig`.
        value_to_class: file label value -> class index (values known but not kept map to 0).

    Returns:
        `(images (slices, size, size) float32, labels (slices, size, size) uint8 or None, params)`;
        `params` is the JSON-able record :func:`labels_to_original` inverts. With a label it also holds
        `cropped_label_voxels`: the labelled voxels (class > 0, after resampling) outside the
        `size x size` window, which the slices lose and the inverse cannot bring back.
    """
    canonical, _, ornt = to_canonical(image.data, image.affine)
    original_spacing = tuple(float(s) for s in np.asarray(image.spacing)[np.argsort(ornt[:, 0])])
    resampled = resample(canonical, original_spacing, config.spacing, order=1)
    normalised, intensity = normalise_intensity(resampled, intensity_kind(modality), config)
    plane_axes, starts = _crop_window(normalised, config.axis, config.size)
    slices = _extract_slices(normalised, config.axis, plane_axes, starts, config.size, float(normalised.min()))
    params = {
        "original_shape": [int(n) for n in image.data.shape],
        "original_affine": np.asarray(image.affine).tolist(),
        "ornt": np.asarray(ornt).tolist(),
        "canonical_shape": [int(n) for n in canonical.shape],
        "canonical_spacing": list(original_spacing),
        "spacing": [float(s) for s in config.spacing],
        "resampled_shape": [int(n) for n in resampled.shape],
        "axis": int(config.axis),
        "plane_axes": plane_axes,
        "crop_start": starts,
        "size": int(config.size),
        "intensity": intensity,
    }
    label_slices = None
    if label is not None:
        classes = map_label_values(label.data, value_to_class, label.path)
        canonical_label, _, _ = to_canonical(classes, label.affine)
        resampled_label = resample(canonical_label, original_spacing, config.spacing, order=0)
        label_slices = _extract_slices(resampled_label, config.axis, plane_axes, starts, config.size, 0)
        params["cropped_label_voxels"] = int(np.count_nonzero(resampled_label)) - int(np.count_nonzero(label_slices))
    return slices.astype(np.float32), label_slices, params


def labels_to_original(label_slices, params, class_values=None):
    """Exact inverse of :func:`preprocess_volume` for a label map.

    Args:
        label_slices: `(slices, size, size)` class indices in cache space.
        params: the volume's recorded parameters.
        class_values: class index -> file label value (e.g. `[0, 205, 420, ...]`); `None` keeps indices.

    Returns:
        `(x, y, z)` label volume on the original voxel grid (same shape and axis order as the input file).
    """
    label_slices = np.asarray(label_slices)
    axis, size = params["axis"], params["size"]
    resampled_shape_ = tuple(params["resampled_shape"])
    resampled = np.zeros(resampled_shape_, label_slices.dtype)
    moved = np.moveaxis(resampled, axis, 0)  # a view: writing into it fills `resampled`
    if label_slices.shape[0] != moved.shape[0] or label_slices.shape[1:] != (size, size):
        raise ValueError(f"expected {(moved.shape[0], size, size)} slices, got {label_slices.shape}")
    src, dst = [slice(None)], [slice(None)]
    for plane_axis, start in zip(params["plane_axes"], params["crop_start"]):
        length = resampled_shape_[plane_axis]
        lo, hi = max(start, 0), min(start + size, length)
        dst.append(slice(lo, max(hi, lo)))
        src.append(slice(lo - start, lo - start + max(hi - lo, 0)))
    moved[tuple(dst)] = label_slices[tuple(src)]
    scale = _resample_scale(params["canonical_spacing"], params["spacing"])
    canonical_shape = tuple(params["canonical_shape"])
    if np.allclose(scale, 1.0):
        canonical = resampled[tuple(slice(0, n) for n in canonical_shape)]
        if canonical.shape != canonical_shape:
            canonical = np.pad(canonical, [(0, c - s) for c, s in zip(canonical_shape, canonical.shape)])
    else:
        # Nearest neighbour: canonical voxel c lies at resampled coordinate c / scale.
        index = [
            np.clip(np.rint(np.arange(n) / s).astype(int), 0, m - 1)
            for n, s, m in zip(canonical_shape, scale, resampled_shape_)
        ]
        canonical = resampled[np.ix_(*index)]
    volume = from_canonical(canonical, np.asarray(params["ornt"]))
    if class_values is not None:
        volume = np.asarray(class_values)[volume]
    return volume


def preprocess_image(image, intensity, config):
    """Slices of a new volume (never seen by ``prepare``) using a modality's recorded intensity rule.

    For CT the recorded HU window is reused as is; for z-scored modalities the statistics are
    recomputed on this volume (they are per-volume by definition).
    """
    slices, _, params = preprocess_volume(image, None, "ct" if intensity["kind"] == "ct" else "mr", config)
    return slices, params
