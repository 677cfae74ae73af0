"""What the Image Alignment Module makes of MRI slices (run by hand; not a test).

    .venv/bin/python benchmarks/aligned_panels.py RUN --out docs/aligned.png

Rows: assistant (MRI) slices, the same slices through G (assistant -> target), and target (CT) slices
from the same cache, all in network-input units. Used to judge whether the IAM keeps the anatomy.
"""

import argparse

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run", help="an MKD run folder")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    from mkd_tf.data.cache import SliceCache
    from mkd_tf.training import load_run

    model, _, record = load_run(args.run)
    cache = SliceCache(record["path"], verify=False)
    rows = {}
    for role in ("assistant", "target"):
        labelled = cache.indices(role, "train", labelled=True)
        foreground = [i for i in labelled if cache.labels(role)[i].any()]
        picks = np.asarray(foreground)[np.linspace(0, len(foreground) - 1, args.count).astype(int)]
        rows[role] = np.asarray(cache.images(role)[picks])[..., None]
    aligned = model.alignment.align(tf.constant(rows["assistant"])).numpy()
    panels = [
        ("MRI (assistant)", rows["assistant"], None),
        ("G(MRI): aligned", aligned, (-1, 1)),
        ("CT (target)", rows["target"], (-1, 1)),
    ]
    figure, axes = plt.subplots(3, args.count, figsize=(2.5 * args.count, 7.8))
    for row, (title, images, limits) in enumerate(panels):
        for column in range(args.count):
            axis = axes[row, column]
            axis.imshow(
                np.rot90(images[column, ..., 0]),
                cmap="gray",
                **({"vmin": limits[0], "vmax": limits[1]} if limits else {}),
            )
            axis.axis("off")
        axes[row, 0].set_title(title, loc="left", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out, dpi=70)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
