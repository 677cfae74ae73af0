"""Volume-level evaluation in millimetres, its summary table, and the one Dice of the package.

Definitions (for boolean 3-D masks A = prediction, B = reference, voxel size `spacing` in mm):

- Dice = 2 |A and B| / (|A| + |B|).
- Surface S(X) = X xor erosion(X), the erosion using the connectivity-1 (6-neighbour) structuring
  element, with everything outside the array counted as background.
- Directed surface distances d(A, B) = { distance in mm from each voxel of S(A) to the nearest voxel of
  S(B) }, computed with `scipy.ndimage.distance_transform_edt(~S(B), sampling=spacing)`.
- ASSD = mean of d(A, B) joined with d(B, A) (every surface voxel of both masks counts once).
- HD95 = 95th percentile (numpy's linear interpolation) of d(A, B) joined with d(B, A).

These are medpy.metric.binary's `dc`, `assd` and `hd95` as pinned here (medpy 0.5.2). Note: medpy <= 0.4's
`assd` (used for the SIFA / UMMKD / MKD cardiac numbers) averaged the two directed means instead,
(mean d(A, B) + mean d(B, A)) / 2; it differs when the two surfaces differ in size.

Empty masks never raise and never give NaN:

- both empty: Dice 1.0, ASSD 0.0, HD95 0.0 (a correct "nothing here"). This is the package's one rule
  for a class absent from both: evaluation, validation Dice during training and the TFLite parity
  check all compute Dice through :func:`class_overlaps` and :func:`dice_of_overlaps`;
- exactly one empty: Dice 0.0, and ASSD = HD95 = the diagonal of the volume in mm,
  sqrt(sum_k (shape_k * spacing_k)^2), the largest distance the volume can hold, so a missed or
  hallucinated structure costs more than any real segmentation of it could.

Distances are computed inside the bounding box of A or B only (exact: every surface voxel lies in
it), so a small structure in a 256x256x200 volume costs a few distance transforms of its box.
"""

import math

import numpy as np
from scipy import ndimage

from mkd_tf.errors import MkdError

METRICS = ("dice", "assd", "hd95")


def _as_mask(array):
    return np.atleast_1d(np.asarray(array).astype(bool))


def _spacing(spacing, ndim):
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.size == 1:
        spacing = np.repeat(spacing, ndim)
    if spacing.size != ndim or np.any(spacing <= 0):
        raise MkdError(f"metrics: spacing {spacing.tolist()} does not fit a {ndim}-D volume")
    return spacing


def volume_diagonal(shape, spacing):
    """Diagonal of a volume in mm: sqrt(sum_k (shape_k * spacing_k)^2); the empty-mask penalty."""
    spacing = _spacing(spacing, len(shape))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice(prediction, reference):
    """Dice coefficient 2|A and B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty.

    Args:
        prediction: array, nonzero = foreground.
        reference: array of the same shape.

    Returns:
        float in [0, 1].

    Example:
        >>> dice([1, 1, 0, 0], [1, 0, 0, 0]), dice([0, 0], [0, 0])
        (0.6666666666666666, 1.0)
    """
    prediction = _as_mask(prediction)
    reference = _as_mask(reference)
    _check_shapes(prediction, reference)
    overlaps = np.array(
        [[np.count_nonzero(prediction & reference)], [np.count_nonzero(prediction)], [np.count_nonzero(reference)]]
    )
    return float(dice_of_overlaps(overlaps)[0])


def class_overlaps(predicted, reference, num_classes):
    """Per-class counts of two label maps, to be summed over slices or batches before :func:`dice_of_overlaps`.

    Args:
        predicted: integer label array.
        reference: integer label array of the same shape.
        num_classes: K; classes 0..K-1 are counted.

    Returns:
        float64 array `(3, K)`: |A_c and B_c|, |A_c|, |B_c| for every class c.
    """
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    _check_shapes(predicted, reference)
    predicted, reference = predicted.astype(np.int64).ravel(), reference.astype(np.int64).ravel()
    both = np.bincount(reference[predicted == reference], minlength=num_classes)[:num_classes]
    return np.stack(
        [
            both,
            np.bincount(predicted, minlength=num_classes)[:num_classes],
            np.bincount(reference, minlength=num_classes)[:num_classes],
        ]
    ).astype(np.float64)


def dice_of_overlaps(overlaps):
    """Dice of every class from :func:`class_overlaps` counts: 2|A and B| / (|A| + |B|), 1.0 for a class
    absent from both.

    Example:
        >>> dice_of_overlaps(class_overlaps([0, 1, 1, 2], [0, 1, 2, 2], 4)).tolist()
        [1.0, 0.6666666666666666, 0.6666666666666666, 1.0]
    """
    both, predicted, reference = np.asarray(overlaps, dtype=np.float64)
    total = predicted + reference
    return np.where(total > 0, 2.0 * both / np.maximum(total, 1.0), 1.0)


def _check_shapes(prediction, reference):
    if prediction.shape != reference.shape:
        raise MkdError(f"metrics: prediction shape {prediction.shape} differs from reference {reference.shape}")


def surface_distances(prediction, reference, spacing=None):
    """Both directed surface-distance sets in mm (see the module docstring).

    Args:
        prediction: non-empty mask A.
        reference: non-empty mask B, same shape.
        spacing: voxel size per axis in mm (`None`: 1).

    Returns:
        `(d(A, B), d(B, A))`, two 1-D float64 arrays with one entry per surface voxel of A and of B.
    """
    prediction = _as_mask(prediction)
    reference = _as_mask(reference)
    _check_shapes(prediction, reference)
    spacing = _spacing(spacing, prediction.ndim)
    union = prediction | reference
    if not union.any():
        raise MkdError("metrics: surface distances need non-empty masks")
    # Crop to the union's bounding box: all surface voxels are inside it, the edt is exact there, and
    # outside it both masks are background, so the erosion (border_value=0) is unchanged too.
    box = ndimage.find_objects(union.astype(np.uint8))[0]
    prediction = prediction[box]
    reference = reference[box]
    structure = ndimage.generate_binary_structure(prediction.ndim, 1)
    prediction_surface = prediction ^ ndimage.binary_erosion(prediction, structure=structure)
    reference_surface = reference ^ ndimage.binary_erosion(reference, structure=structure)
    to_reference = ndimage.distance_transform_edt(~reference_surface, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing)
    return to_reference[prediction_surface], to_prediction[reference_surface]


def _empty_case(prediction, reference, spacing):
    """The documented value for empty masks, or `None` when both masks are non-empty."""
    has_prediction = prediction.any()
    has_reference = reference.any()
    if has_prediction and has_reference:
        return None
    if not has_prediction and not has_reference:
        return 0.0
    return volume_diagonal(prediction.shape, spacing)


def _surface_metrics(to_reference, to_prediction):
    """ASSD and HD95 from the two directed distance sets (one definition for every caller)."""
    pooled = np.concatenate([to_reference, to_prediction])
    return {"assd": float(pooled.mean()), "hd95": float(np.percentile(pooled, 95))}


def surface_metrics(prediction, reference, spacing=None):
    """ASSD and HD95 in mm of two masks: the mean and the 95th percentile of d(A, B) joined with d(B, A)
    (medpy 0.5's ``assd`` and ``hd95``).

    Args:
        prediction: mask A.
        reference: mask B, same shape.
        spacing: voxel size per axis in mm (`None`: 1).

    Returns:
        ``{"assd": float, "hd95": float}``; both 0.0 when the masks are empty, the volume diagonal when
        exactly one is.

    Example:
        >>> a, b = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
        >>> a[2:5, 2:5, 2:5] = b[3:6, 2:5, 2:5] = True
        >>> surface_metrics(a, b, spacing=(2.0, 1.0, 1.0))["hd95"]
        2.0
    """
    prediction = _as_mask(prediction)
    reference = _as_mask(reference)
    _check_shapes(prediction, reference)
    empty = _empty_case(prediction, reference, spacing)
    if empty is not None:
        return {"assd": empty, "hd95": empty}
    return _surface_metrics(*surface_distances(prediction, reference, spacing))


def evaluate_volume(prediction, reference, spacing, class_values):
    """Dice, ASSD and HD95 of every structure of two labelled volumes.

    Args:
        prediction: integer volume, values from `class_values`.
        reference: integer volume of the same shape.
        spacing: voxel size per axis in mm.
        class_values: structure name -> label value in the files, e.g. `{"myocardium": 205, ...}`.
            Include only the structures to score (leave out background).

    Returns:
        dict name -> `{"dice": float, "assd": float, "hd95": float}`.
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    _check_shapes(prediction, reference)
    results = {}
    for name, value in class_values.items():
        predicted_mask = prediction == value
        reference_mask = reference == value
        empty = _empty_case(predicted_mask, reference_mask, spacing)
        if empty is not None:
            surface = {"assd": empty, "hd95": empty}
        else:
            # One pair of distance transforms serves both distance metrics.
            to_reference, to_prediction = surface_distances(predicted_mask, reference_mask, spacing)
            surface = _surface_metrics(to_reference, to_prediction)
        results[name] = {"dice": dice(predicted_mask, reference_mask), **surface}
    return results


def summarize(rows):
    """Mean and standard deviation over cases, per structure and metric, plus an overall row.

    Args:
        rows: list of per-case dicts as returned by :func:`evaluate_volume` (same structures in each).

    Returns:
        dict name -> metric -> `{"mean": float, "std": float}` for every structure, plus `"overall"`
        whose means are the mean of the structures' means and whose std is the standard deviation over
        cases of each case's mean across structures. Standard deviations are population (ddof=0).
    """
    if not rows:
        raise MkdError("metrics: nothing to summarize (no cases)")
    names = list(rows[0])
    summary = {}
    for name in names:
        summary[name] = {}
        for metric in METRICS:
            values = np.array([row[name][metric] for row in rows], dtype=np.float64)
            summary[name][metric] = {"mean": float(values.mean()), "std": float(values.std())}
    summary["overall"] = {}
    for metric in METRICS:
        per_case = np.array([np.mean([row[name][metric] for name in names]) for row in rows], dtype=np.float64)
        summary["overall"][metric] = {"mean": float(per_case.mean()), "std": float(per_case.std())}
    return summary


def markdown_table(summary):
    """Markdown table of a :func:`summarize` result: Dice in percent (1 decimal), mm with 2 decimals.

    Returns:
        str, e.g. ``| structure | Dice | ASSD (mm) | HD95 (mm) |`` then one row per structure,
        ``| myocardium | 78.3 ± 4.1 | 2.10 ± 0.52 | 6.33 ± 1.20 |``, the `overall` row last.
    """
    lines = ["| structure | Dice | ASSD (mm) | HD95 (mm) |", "| --- | --- | --- | --- |"]
    names = [name for name in summary if name != "overall"]
    if "overall" in summary:
        names.append("overall")
    for name in names:
        cells = summary[name]
        lines.append(
            f"| {name} "
            f"| {100 * cells['dice']['mean']:.1f} ± {100 * cells['dice']['std']:.1f} "
            f"| {cells['assd']['mean']:.2f} ± {cells['assd']['std']:.2f} "
            f"| {cells['hd95']['mean']:.2f} ± {cells['hd95']['std']:.2f} |"
        )
    return "\n".join(lines) + "\n"
