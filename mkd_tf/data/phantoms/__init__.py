"""Synthetic cross-modality phantoms, one per anatomy.

- cardiac (the default, :mod:`mkd_tf.data.phantom`): MM-WHS 2017 layout, contrast CT vs bSSFP MRI.
- abdomen (:mod:`mkd_tf.data.phantoms.abdomen`): nnU-Net v2 raw layout, plain CT vs T2-weighted MRI,
  with label ids that differ between the two datasets.

:mod:`mkd_tf.data.phantoms.common` holds what they share: world-mm geometry (ellipsoids, tubes, smooth
random fields), rendering (blur, bias field, Rician noise), argument checks and the atomic, staged write.
"""

ANATOMIES = ("cardiac", "abdomen")


def write_phantom_dataset(anatomy, out_dir, n_ct=6, n_mr=6, shape=None, seed=0):
    """Write the phantom of ``anatomy`` to ``out_dir`` (staged and atomic, see each anatomy's writer).

    Args:
        anatomy: one of :data:`ANATOMIES`.
        out_dir: folder to create; it may exist only if empty.
        n_ct, n_mr: number of CT and MRI cases.
        shape: CT array shape `(x, y, z)`; `None` for the anatomy's default.
        seed: the same seed writes the same bytes.

    Returns:
        `(out_dir, folders)`: the written folder and the names of the two modality folders in it (CT first).
    """
    # Imported here: the anatomy modules import phantoms.common, which imports this package.
    if anatomy == "cardiac":
        from mkd_tf.data.phantom import DEFAULT_SHAPE, write_phantom

        path = write_phantom(out_dir, n_ct=n_ct, n_mr=n_mr, shape=shape or DEFAULT_SHAPE, seed=seed)
        return path, ("ct_train", "mr_train")
    if anatomy == "abdomen":
        from mkd_tf.data.phantoms.abdomen import DATASETS, DEFAULT_SHAPE, write_abdomen_phantom

        path = write_abdomen_phantom(out_dir, n_ct=n_ct, n_mr=n_mr, shape=shape or DEFAULT_SHAPE, seed=seed)
        return path, (DATASETS["ct"], DATASETS["mr"])
    raise ValueError(f"unknown phantom anatomy {anatomy!r} (expected one of {', '.join(ANATOMIES)})")
