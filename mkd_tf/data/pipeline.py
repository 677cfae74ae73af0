"""tf.data input pipeline over a slice cache: batches of 2-D slices, with optional augmentation.

The cache's arrays stay memory-mapped on disk. A dataset streams only *row indices*; each batch of indices is
gathered from the memmaps by one ``tf.numpy_function`` call (one Python round trip per batch, not per
slice), so memory stays at a few batches however large the cache is.

Every random choice is stateless and derived from the ``seed`` argument (the shuffle permutation of epoch
``e`` from ``(seed, e)``, the augmentation of batch ``k`` from ``(seed, k)``), so a seeded pipeline yields the
same batches in every run and is unaffected by ``tf.random.set_seed`` or by other pipelines.

Sharding (multi-worker training): ``shard=(index, count)`` makes a stream yield only block ``index`` of
``count`` equal blocks of every *global* batch, with the augmentation those slices get in the unsharded
stream. The ``count`` shards of a step therefore hold exactly the slices of the unsharded batch, each
once, whatever the number of workers. ``start=k`` skips the first ``k`` batches without loading them
(resume inside an epoch) and leaves every later batch as it was.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from mkd_tf.data.cache import HAS_LABEL, ROLES, SPLITS, VOLUME
from mkd_tf.errors import fail


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random slice augmentation (defaults follow the MKD/SIFA cardiac setting).

    A parameter is drawn uniformly from each range, independently per slice; a range ``(a, a)`` fixes it.

    Args:
        enabled: apply augmentation at all.
        rotation_degrees: rotation angle drawn from ``[-rotation_degrees, rotation_degrees]``.
        scale_range: isotropic zoom factor (``> 1`` enlarges the anatomy).
        flip_probability: probability of a left-right flip (along the width axis).
        gamma_range: gamma applied to min-max normalised intensities, which are then mapped back.
        contrast_range: factor applied to the deviation from the slice mean.
        noise_fraction: standard deviation of the additive Gaussian noise, as a fraction of the slice's
            standard deviation.

    Example:
        >>> geometric_only = AugmentConfig(gamma_range=(1.0, 1.0), contrast_range=(1.0, 1.0), noise_fraction=0.0)
    """

    enabled: bool = True
    rotation_degrees: float = 15.0
    scale_range: tuple = (0.9, 1.1)
    flip_probability: float = 0.5
    gamma_range: tuple = (0.7, 1.5)
    contrast_range: tuple = (0.8, 1.2)
    noise_fraction: float = 0.03


def _uniform(shape, seed, bounds):
    low, high = (float(b) for b in bounds)
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high)


def _affine_transforms(angle, scale, flip, height, width):
    """`(batch, 8)` ImageProjectiveTransform rows mapping *output* pixel (x, y) to the *input* pixel.

    The forward map is ``p_out = c + scale * R(angle) * F * (p_in - c)`` about the slice centre ``c`` (F the
    optional x mirror); the op wants its inverse, ``p_in = c + F * R(-angle) / scale * (p_out - c)``.
    """
    cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
    cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    mirror = tf.where(flip, -1.0, 1.0)
    # F * R(-angle) / scale = [[m*cos, m*sin], [-sin, cos]] with m the mirror sign of the x row.
    a0, a1 = mirror * cos, mirror * sin
    b0, b1 = -sin, cos
    a2 = cx - a0 * cx - a1 * cy
    b2 = cy - b0 * cx - b1 * cy
    zeros = tf.zeros_like(angle)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def _warp(images, transforms, interpolation):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation=interpolation,
        fill_mode="CONSTANT",
    )


def _augment_batch(images, labels, seed, config, block=None):
    """Augment `(batch, height, width, 1)` float32 images and `(batch, height, width)` int32 labels.

    Each slice gets its own parameters; all are drawn from the one stateless ``seed`` (shape `[2]`). Labels
    may be any integer dtype the warp op supports (uint8, int32, int64); they come back as int32.

    ``block=(offset, total)``: the slices are rows ``offset:offset + batch`` of a batch of ``total``;
    parameters and noise are drawn for all ``total`` rows and these rows' share is used, so each slice is
    augmented exactly as in the whole batch (sharding changes no slice's augmentation).
    """
    if not config.enabled:
        return images, tf.cast(labels, tf.int32)
    batch = tf.shape(images)[0]
    offset, total = (0, batch) if block is None else block
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    max_angle = np.deg2rad(float(config.rotation_degrees))

    def mine(values):
        return values if block is None else values[offset : offset + batch]

    angle = mine(_uniform([total], seeds[0], (-max_angle, max_angle)))
    scale = mine(_uniform([total], seeds[1], config.scale_range))
    flip = mine(tf.random.stateless_uniform([total], seeds[2])) < float(config.flip_probability)
    transforms = _affine_transforms(angle, scale, flip, height, width)

    # Pixels revealed by rotation or zoom-out take each slice's minimum (air/background), not 0, which is the
    # mean intensity of a z-scored slice: warp the offset from the minimum and fill that with 0.
    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    images = _warp(images - low, transforms, "BILINEAR") + low
    # Labels warp in their own integer dtype with nearest neighbour (exact class values; uint8 straight from
    # the cache is the cheapest); revealed pixels are background.
    labels = tf.cast(_warp(labels[..., None], transforms, "NEAREST")[..., 0], tf.int32)

    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    span = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True) - low
    gamma = tf.reshape(mine(_uniform([total], seeds[3], config.gamma_range)), [-1, 1, 1, 1])
    unit = tf.clip_by_value(tf.math.divide_no_nan(images - low, span), 0.0, 1.0)
    # exp(gamma * log(u)) is u ** gamma (0 stays 0 as exp(-inf) = 0) and several times faster than tf.pow
    # with a broadcast exponent on CPU.
    images = tf.exp(gamma * tf.math.log(unit)) * span + low

    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    contrast = tf.reshape(mine(_uniform([total], seeds[4], config.contrast_range)), [-1, 1, 1, 1])
    images = (images - mean) * contrast + mean

    sigma = float(config.noise_fraction) * tf.math.reduce_std(images, axis=[1, 2, 3], keepdims=True)
    noise_shape = tf.shape(images) if block is None else tf.concat([[total], tf.shape(images)[1:]], 0)
    images = images + sigma * mine(tf.random.stateless_normal(noise_shape, seeds[5]))
    return images, labels


def augment_slice(image, label, seed, config=AugmentConfig()):
    """Randomly rotate, zoom, flip and re-contrast one slice and its label map, reproducibly.

    The geometric transform is applied identically to image (bilinear) and label (nearest neighbour, so
    labels stay class indices); gamma, contrast and noise change the image only. Graph-mode safe (usable in
    ``tf.data.Dataset.map``).

    Args:
        image: `(height, width, 1)` float32.
        label: `(height, width)` int32 class indices.
        seed: `[2]` integer tensor; the same seed gives the same augmentation.
        config: an :class:`AugmentConfig`.

    Returns:
        `(image, label)` with the input shapes and dtypes.

    Example:
        >>> image, label = tf.random.stateless_uniform((32, 32, 1), seed=(1, 2)), tf.zeros((32, 32), tf.int32)
        >>> augmented, augmented_label = augment_slice(image, label, seed=tf.constant([0, 7]))
        >>> tuple(augmented.shape), augmented_label.dtype.name
        ((32, 32, 1), 'int32')
    """
    image = tf.convert_to_tensor(image, tf.float32)
    label = tf.convert_to_tensor(label)
    if label.dtype not in (tf.uint8, tf.int32, tf.int64):
        label = tf.cast(label, tf.int32)
    images, labels = _augment_batch(image[None], label[None], seed, config)
    return images[0], labels[0]


def _check_role_split(cache, role, split):
    if role not in ROLES:
        fail(cache.path, f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if split not in SPLITS:
        fail(cache.path, f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")


def _augment_config(augment):
    if isinstance(augment, AugmentConfig):
        return augment
    return AugmentConfig(enabled=bool(augment))


def selected_rows(cache, role, split, labelled=None, volumes=None):
    """Cache rows of ``role`` in ``split`` (with/without labels), optionally only of some volumes."""
    rows = cache.indices(role, split, labelled).astype(np.int64)
    if volumes is not None:
        rows = rows[np.isin(cache.slice_table(role)[rows, VOLUME], np.asarray(list(volumes), np.int64))]
    return rows


def slice_dataset(
    cache,
    role,
    split="train",
    batch_size=8,
    *,
    labelled=None,
    volumes=None,
    shuffle=True,
    repeat=True,
    augment=False,
    seed=0,
    drop_remainder=True,
    shard=(0, 1),
    start=0,
):
    """Batches of cached slices of one modality and split.

    Args:
        cache: a :class:`mkd_tf.data.cache.SliceCache`.
        role: `"target"` (CT) or `"assistant"` (MRI).
        split: `"train"`, `"val"` or `"test"`.
        batch_size: slices per batch.
        labelled: `True` for labelled slices only, `False` for unlabelled only, `None` for both.
        volumes: optional volume indices (into `cache.volumes(role)`) to restrict the slices to.
        shuffle: a fresh seeded permutation of the slices in every epoch.
        repeat: cycle forever (batches then run across epoch boundaries).
        augment: `True` for the default :class:`AugmentConfig`, or an :class:`AugmentConfig`.
        seed: integer; fixes shuffling and augmentation.
        drop_remainder: drop a last, smaller batch (only matters when `repeat=False`).
        shard: `(index, count)`: yield only rows `index * batch_size / count` up to the next block of every
            batch of ``batch_size`` (augmented as in the whole batch); ``batch_size`` must divide by
            ``count``. `(0, 1)`: whole batches.
        start: skip the first ``start`` batches (not loaded); the later ones are unchanged.

    Returns:
        A `tf.data.Dataset` of dicts: `"image"` `(batch, size, size, 1)` float32, `"label"`
        `(batch, size, size)` int32 (0 where unlabelled), `"has_label"` `(batch,)` float32 (1.0 or 0.0).

    Raises:
        MkdError: naming the cache path, when the role/split/labelled selection holds no slices (or, without
            repeat, fewer than one whole batch with `drop_remainder`).

    Example:
        >>> from mkd_tf.data.cache import SliceCache
        >>> batch = next(iter(slice_dataset(SliceCache("cache"), "target", "train", 8, augment=True)))
        >>> tuple(batch["image"].shape), tuple(batch["label"].shape), tuple(batch["has_label"].shape)
        ((8, 32, 32, 1), (8, 32, 32), (8,))
    """
    _check_role_split(cache, role, split)
    rows = selected_rows(cache, role, split, labelled, volumes)
    selection = f"{role} slices in split {split!r}" + ("" if labelled is None else f" with labelled={labelled}")
    if rows.size == 0:
        fail(cache.path, f"no {selection}")
    if not repeat and drop_remainder and rows.size < batch_size:
        fail(cache.path, f"only {rows.size} {selection}, fewer than one batch of {batch_size}")
    shard_index, shard_count = (int(v) for v in shard)
    if not 0 <= shard_index < shard_count or batch_size % shard_count:
        fail("--batch-size", f"{batch_size} slices cannot be split into {shard_count} equal shards")
    if shard_count > 1 and not (drop_remainder or repeat):
        fail(cache.path, "sharded streams need whole batches (drop_remainder or repeat)")
    block_size = batch_size // shard_count
    block = None if shard_count == 1 else (shard_index * block_size, batch_size)
    whole = drop_remainder or repeat
    dataset = _row_batches(rows, int(seed), shuffle, repeat, batch_size, whole).enumerate()
    if start:
        dataset = dataset.skip(int(start))
    static_batch = block_size if whole else None
    load = _batch_loader(cache, role, (block, block_size, static_batch), _augment_config(augment), int(seed))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _row_batches(rows, seed, shuffle, repeat, batch_size, whole):
    """Batches of cache rows: a fresh seeded permutation per epoch (``shuffle``), cycling (``repeat``); only
    whole batches when ``whole``."""
    rows_tensor = tf.constant(rows)

    def epoch_rows(epoch):
        # A stateless permutation per epoch: reproducible and independent of the global TF seed.
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        permuted = tf.random.experimental.stateless_shuffle(rows_tensor, seed=epoch_seed)
        return tf.data.Dataset.from_tensor_slices(permuted)

    if shuffle:
        epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
        dataset = epochs.flat_map(epoch_rows)
    else:
        dataset = tf.data.Dataset.from_tensor_slices(rows_tensor)
        if repeat:
            dataset = dataset.repeat()
    return dataset.batch(batch_size, drop_remainder=whole)


def _batch_loader(cache, role, shape, config, seed):
    """``(batch index, rows) -> batch dict``: the rows' slices (this shard's ``block`` of them, ``block_size``
    rows; ``shape = (block, block_size, static_batch)``) out of the cache's memmaps, augmented with a
    per-batch seed."""
    size = cache.size
    block, block_size, static_batch = shape
    images, labels = cache.images(role), cache.labels(role)
    has_label = np.ascontiguousarray(cache.slice_table(role)[:, HAS_LABEL], dtype=np.float32)

    def gather(batch_rows):
        # Fancy indexing copies just these rows out of the memmaps (the OS page cache does the rest).
        return np.asarray(images[batch_rows]), np.asarray(labels[batch_rows]), has_label[batch_rows]

    def load(batch_index, batch_rows):
        if block is not None:
            batch_rows = batch_rows[block[0] : block[0] + block_size]
        batch_images, batch_labels, batch_has_label = tf.numpy_function(
            gather, [batch_rows], [tf.float32, tf.uint8, tf.float32], stateful=False
        )
        batch_images = tf.ensure_shape(batch_images, [static_batch, size, size])[..., None]
        batch_labels = tf.ensure_shape(batch_labels, [static_batch, size, size])
        batch_has_label = tf.ensure_shape(batch_has_label, [static_batch])
        if config.enabled:
            batch_seed = tf.stack([tf.constant(seed, tf.int64), batch_index])
            batch_images, batch_labels = _augment_batch(batch_images, batch_labels, batch_seed, config, block)
        batch_labels = tf.cast(batch_labels, tf.int32)
        return {"image": batch_images, "label": batch_labels, "has_label": batch_has_label}

    return load


def training_dataset(cache, batch_size=8, *, augment=True, seed=0, labelled_target_volumes=None, shard=(0, 1), start=0):
    """The batch stream every method trains on (see :mod:`mkd_tf.models.cross_modality`).

    Three unpaired, independently shuffled and augmented streams of the train split:
    `"assistant"` (labelled assistant slices), `"target"` (all target slices, `has_label` tells which
    are labelled) and `"target_labelled"` (slices of the labelled target volumes training may use;
    left out when there are none, e.g. the unsupervised setting).

    Args:
        cache: a :class:`mkd_tf.data.cache.SliceCache`.
        batch_size: slices per stream per step (the global batch under a distribution strategy).
        augment: `True`/`False` or an :class:`AugmentConfig`.
        seed: integer; fixes all streams.
        labelled_target_volumes: target volume indices whose labels may be used (`None`: all labelled).
        shard: `(index, count)`: this worker's block of every global batch (see :func:`slice_dataset`);
            the ``count`` shards of a step together are the unsharded batch.
        start: skip the first ``start`` steps (resume inside an epoch).

    Returns:
        An endless `tf.data.Dataset` of dicts of stream dicts.
    """
    seed = int(seed)
    common = dict(shuffle=True, repeat=True, augment=augment, drop_remainder=True, shard=shard, start=start)
    streams = {
        "assistant": slice_dataset(cache, "assistant", "train", batch_size, labelled=True, seed=3 * seed, **common),
        "target": slice_dataset(cache, "target", "train", batch_size, seed=3 * seed + 1, **common),
    }
    if selected_rows(cache, "target", "train", True, labelled_target_volumes).size:
        streams["target_labelled"] = slice_dataset(
            cache,
            "target",
            "train",
            batch_size,
            labelled=True,
            volumes=labelled_target_volumes,
            seed=3 * seed + 2,
            **common,
        )
    return tf.data.Dataset.zip(streams).prefetch(tf.data.AUTOTUNE)
