"""A PNG to eyeball a prediction: a few axial slices with coloured contours and a legend."""

import io

import numpy as np

from mkd_tf.data.nifti import to_canonical

# Tableau-like colours, one per structure in class order.
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080"]


def render_overlay(image, labels, record, count=3, uncertainty=None):
    """PNG bytes: `count` axial slices of `image` with the contours of `labels` (file label values).

    Rendered in memory, so a failure here leaves nothing on disk (`mkd predict` writes its outputs
    only when all of them were produced).

    Args:
        image: :class:`mkd_tf.data.nifti.Volume` the labels belong to.
        labels: `(x, y, z)` label volume on the same grid (dataset label values).
        record: the run's `cache.json` record (class names and label values).
        count: number of slices shown (those with the most labelled voxels, spread out).
        uncertainty: optional `(x, y, z)` per-voxel uncertainty on the same grid: the voxels in its top
            decile (of the voxels above 0) are shaded in translucent yellow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    canonical_image, _, _ = to_canonical(image.data, image.affine)
    canonical_labels, _, _ = to_canonical(np.asarray(labels), image.affine)
    uncertain = None
    if uncertainty is not None:
        canonical_uncertainty, _, _ = to_canonical(np.asarray(uncertainty, np.float32), image.affine)
        positive = canonical_uncertainty[canonical_uncertainty > 0]
        threshold = np.percentile(positive, 90) if positive.size else np.inf
        uncertain = (canonical_uncertainty >= threshold) & (canonical_uncertainty > 0)
    foreground = (canonical_labels > 0).sum(axis=(0, 1))
    if foreground.any():
        candidates = np.flatnonzero(foreground)
        picks = candidates[np.linspace(0, len(candidates) - 1, count + 2).astype(int)[1:-1]]
    else:
        picks = np.linspace(0, canonical_image.shape[2] - 1, count + 2).astype(int)[1:-1]
    names = record["classes"][1:]
    values = [int(record["target"]["label_values"][name]) for name in names]
    low, high = np.percentile(canonical_image, (1, 99))
    figure, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.4), squeeze=False)
    for axis, z in zip(axes[0], picks):
        # Transpose so that rows run anterior->posterior and columns right->left, as viewers show it.
        axis.imshow(np.rot90(canonical_image[:, :, z]), cmap="gray", vmin=low, vmax=high)
        if uncertain is not None:
            shade = np.zeros((*np.rot90(uncertain[:, :, z]).shape, 4))
            shade[np.rot90(uncertain[:, :, z])] = (1.0, 0.85, 0.0, 0.45)
            axis.imshow(shade, interpolation="nearest")
        for index, value in enumerate(values):
            mask = np.rot90(canonical_labels[:, :, z] == value)
            if mask.any():
                axis.contour(mask.astype(float), levels=[0.5], colors=[COLOURS[index % len(COLOURS)]], linewidths=1.2)
        axis.set_title(f"axial slice {int(z)}")
        axis.axis("off")
    handles = [
        Line2D([0], [0], color=COLOURS[i % len(COLOURS)], lw=2, label=f"{n} ({v})")
        for i, (n, v) in enumerate(zip(names, values))
    ]
    if uncertain is not None:
        handles.append(Line2D([0], [0], color="#ffd900", lw=6, alpha=0.6, label="most uncertain 10%"))
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, dpi=100, format="png", bbox_inches="tight", pad_inches=0.1)  # keeps the titles
    finally:
        plt.close(figure)
    return buffer.getvalue()
