"""tf.data pipeline over a tiny slice cache whose slices identify themselves.

Target volume v, slice s has image ``100 * v + s + 0.01 * column`` (so column 0 holds the slice id exactly and
the rest is a gradient that augmentation visibly moves) and, when labelled, the constant label ``s % 3``.
Assistant slices are the same with ids ``1000 + 100 * v + s``.
"""

import numpy as np
import pytest
import tensorflow as tf

from mkd_tf.data.cache import CacheWriter, SliceCache
from mkd_tf.data.pipeline import AugmentConfig, augment_slice, slice_dataset, training_dataset
from mkd_tf.errors import MkdError
from tests.conftest import cache_entry, cache_manifest

SIZE = 32
SLICES = 5
TARGET_TRAIN_LABELLED = set(range(0, 5))
TARGET_TRAIN_UNLABELLED = set(range(100, 105))
TARGET_TEST = set(range(200, 205))
ASSISTANT_LABELLED = set(range(1000, 1005))
# Geometry and intensity switched off; individual tests switch one thing back on.
IDENTITY = AugmentConfig(
    rotation_degrees=0.0,
    scale_range=(1.0, 1.0),
    flip_probability=0.0,
    gamma_range=(1.0, 1.0),
    contrast_range=(1.0, 1.0),
    noise_fraction=0.0,
)


def _volume(first_id, labelled):
    ids = first_id + np.arange(SLICES, dtype=np.float32)
    images = np.broadcast_to(ids[:, None, None] + 0.01 * np.arange(SIZE, dtype=np.float32), (SLICES, SIZE, SIZE))
    if not labelled:
        return images, None
    return images, np.broadcast_to((np.arange(SLICES) % 3)[:, None, None], (SLICES, SIZE, SIZE)).astype(np.uint8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "cache"
    with CacheWriter(path, size=SIZE) as writer:
        for volume, (split, labelled) in enumerate([("train", True), ("train", False), ("test", True)]):
            images, labels = _volume(100 * volume, labelled)
            writer.add_volume("target", images, labels, split, labelled, cache_entry(f"ct{volume}", SIZE))
        for volume, (split, labelled) in enumerate([("train", True), ("train", False)]):
            images, labels = _volume(1000 + 100 * volume, labelled)
            writer.add_volume("assistant", images, labels, split, labelled, cache_entry(f"mr{volume}", SIZE))
        writer.finish(cache_manifest(SIZE, ["background", "myocardium", "left_ventricle"]))
    return SliceCache(path)


def _ids(batch):
    return np.rint(batch["image"].numpy()[:, 0, 0, 0]).astype(int)


def _batches(dataset, count):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset.take(count)]


def test_batch_shapes_and_dtypes(cache):
    dataset = slice_dataset(cache, "target", "train", 4)
    spec = dataset.element_spec
    assert spec["image"].shape == (4, SIZE, SIZE, 1) and spec["image"].dtype == tf.float32
    assert spec["label"].shape == (4, SIZE, SIZE) and spec["label"].dtype == tf.int32
    assert spec["has_label"].shape == (4,) and spec["has_label"].dtype == tf.float32
    batch = next(iter(dataset))
    assert batch["image"].shape == (4, SIZE, SIZE, 1)
    # The gradient comes through unchanged: slice id + 0.01 * column.
    row = batch["image"].numpy()[0, 7, :, 0]
    np.testing.assert_allclose(row - row[0], 0.01 * np.arange(SIZE), atol=1e-4)


def test_train_stream_never_contains_test_slices(cache):
    dataset = slice_dataset(cache, "target", "train", 4, augment=True, seed=1)
    seen = set()
    for batch in dataset.take(40):
        seen.update(_ids(batch).tolist())
    # Every train slice (labelled or not) comes out, and nothing else.
    assert seen == TARGET_TRAIN_LABELLED | TARGET_TRAIN_UNLABELLED


def test_unshuffled_single_pass_order_and_remainder(cache):
    dataset = slice_dataset(cache, "target", "train", 4, shuffle=False, repeat=False, drop_remainder=False)
    assert [_ids(batch).tolist() for batch in dataset] == [[0, 1, 2, 3], [4, 100, 101, 102], [103, 104]]
    dataset = slice_dataset(cache, "target", "test", 4, shuffle=False, repeat=False)
    assert [_ids(batch).tolist() for batch in dataset] == [[200, 201, 202, 203]]


def test_has_label_and_label_belong_to_the_same_slice(cache):
    for batch in slice_dataset(cache, "target", "train", 4, seed=5).take(20):
        ids = _ids(batch)
        expected_has = (ids < 100).astype(np.float32)
        np.testing.assert_array_equal(batch["has_label"].numpy(), expected_has)
        expected_label = np.where(ids < 100, (ids % 100) % 3, 0)
        expected_label = np.broadcast_to(expected_label[:, None, None], (4, SIZE, SIZE))
        np.testing.assert_array_equal(batch["label"].numpy(), expected_label)


def test_labelled_filter(cache):
    def ids(dataset):
        return {i for batch in dataset.take(10) for i in _ids(batch).tolist()}

    assert ids(slice_dataset(cache, "target", "train", 2, labelled=True)) == TARGET_TRAIN_LABELLED
    assert ids(slice_dataset(cache, "target", "train", 2, labelled=False)) == TARGET_TRAIN_UNLABELLED
    assert ids(slice_dataset(cache, "assistant", "train", 2, labelled=True)) == ASSISTANT_LABELLED


def test_every_epoch_is_a_fresh_permutation(cache):
    ids = [_ids(batch).tolist() for batch in slice_dataset(cache, "target", "train", 5, seed=2).take(6)]
    epochs = [ids[0] + ids[1], ids[2] + ids[3], ids[4] + ids[5]]
    everything = sorted(TARGET_TRAIN_LABELLED | TARGET_TRAIN_UNLABELLED)
    for epoch in epochs:
        assert sorted(epoch) == everything
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


def test_same_seed_same_batches_different_seed_different(cache):
    first = _batches(slice_dataset(cache, "target", "train", 4, augment=True, seed=3), 5)
    tf.random.set_seed(1234)  # the pipeline must not depend on the global seed
    again = _batches(slice_dataset(cache, "target", "train", 4, augment=True, seed=3), 5)
    other = _batches(slice_dataset(cache, "target", "train", 4, augment=True, seed=4), 5)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
    # Augmentation really happened: the gradient rows are no longer the stored ones.
    plain = _batches(slice_dataset(cache, "target", "train", 4, augment=False, seed=3), 5)
    assert not np.allclose(first[0]["image"], plain[0]["image"], atol=1e-3)


def _rectangle(top=8, bottom=20, left=10, right=24):
    image = np.zeros((SIZE, SIZE, 1), np.float32)
    image[top:bottom, left:right] = 1.0
    label = np.zeros((SIZE, SIZE), np.int32)
    label[top:bottom, left:right] = 1
    return image, label


def test_augmentation_moves_label_with_image():
    image, label = _rectangle()
    changed = 0
    for seed in range(20):
        out_image, out_label = augment_slice(image, label, tf.constant([seed, 11]))
        out_image, out_label = out_image.numpy()[..., 0], out_label.numpy()
        assert out_label.dtype == np.int32 and set(np.unique(out_label)) <= {0, 1}
        # Edge pixels can sit exactly half on the rectangle, and gamma moves where "half" lands, so
        # foreground pixels must be at least a quarter bright and bright (> 3/4) pixels must be foreground.
        low, span = out_image.min(), out_image.max() - out_image.min()
        foreground = out_label == 1
        assert (out_image[foreground] > low + 0.25 * span).mean() > 0.97
        assert foreground[out_image > low + 0.75 * span].mean() > 0.97
        changed += not np.array_equal(out_label, label)
    assert changed >= 18


def test_augmentation_keeps_multiclass_labels_in_class_set():
    label = np.zeros((SIZE, SIZE), np.int32)
    label[4:14, 4:28], label[16:30, 6:20], label[18:26, 22:30] = 1, 2, 5
    image = label[..., None].astype(np.float32)
    for seed in range(10):
        _, out = augment_slice(image, label, tf.constant([seed, 0]))
        assert out.dtype == tf.int32 and set(np.unique(out.numpy())) <= {0, 1, 2, 5}


def test_flip_is_exact_and_happens_about_half_the_time():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(SIZE, SIZE, 1)).astype(np.float32)
    label = rng.integers(0, 4, size=(SIZE, SIZE)).astype(np.int32)
    config = AugmentConfig(**{**IDENTITY.__dict__, "flip_probability": 0.5})
    flips = 0
    for seed in range(40):
        out_image, out_label = augment_slice(image, label, tf.constant([seed, 1]), config)
        flipped = np.array_equal(out_label.numpy(), label[:, ::-1])
        assert flipped or np.array_equal(out_label.numpy(), label)
        np.testing.assert_allclose(out_image.numpy(), image[:, ::-1] if flipped else image, atol=1e-5)
        flips += flipped
    assert 10 <= flips <= 30


def test_zoom_by_two_doubles_a_centred_square():
    label = np.zeros((SIZE, SIZE), np.int32)
    label[12:20, 12:20] = 1
    config = AugmentConfig(**{**IDENTITY.__dict__, "scale_range": (2.0, 2.0)})
    _, out = augment_slice(label[..., None].astype(np.float32), label, tf.constant([0, 0]), config)
    # Output pixel y samples input 15.5 + (y - 15.5) / 2: rows 8..23 land inside rows 12..19.
    expected = np.zeros((SIZE, SIZE), np.int32)
    expected[8:24, 8:24] = 1
    np.testing.assert_array_equal(out.numpy(), expected)


def test_rotation_stays_within_range_and_keeps_radius():
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    centre = (SIZE - 1) / 2
    # A blob 10 px above the centre.
    image = np.exp(-((yy - (centre - 10)) ** 2 + (xx - centre) ** 2) / 4.0)[..., None].astype(np.float32)
    label = (image[..., 0] > 0.3).astype(np.int32)
    config = AugmentConfig(**{**IDENTITY.__dict__, "rotation_degrees": 15.0})

    def polar(weights):
        y = (weights * yy).sum() / weights.sum() - centre
        x = (weights * xx).sum() / weights.sum() - centre
        return np.hypot(x, y), np.degrees(np.arctan2(x, -y))

    angles = []
    for seed in range(20):
        out_image, out_label = augment_slice(image, label, tf.constant([seed, 2]), config)
        radius, angle = polar(out_image.numpy()[..., 0])
        label_radius, label_angle = polar(out_label.numpy().astype(np.float32))
        assert abs(radius - 10) < 0.3 and abs(angle) <= 15.5
        # Nearest-neighbour label rotates the same way as the image (within its one-pixel rounding).
        assert abs(label_angle - angle) < 5 and abs(label_radius - radius) < 1
        angles.append(angle)
    assert max(angles) > 5 and min(angles) < -5


def test_gamma_and_contrast_match_hand_computation():
    rng = np.random.default_rng(1)
    image = rng.uniform(-2.0, 3.0, size=(SIZE, SIZE, 1)).astype(np.float32)
    config = AugmentConfig(**{**IDENTITY.__dict__, "gamma_range": (2.0, 2.0), "contrast_range": (1.2, 1.2)})
    out, _ = augment_slice(image, np.zeros((SIZE, SIZE), np.int32), tf.constant([0, 3]), config)
    low, high = image.min(), image.max()
    gamma = ((image - low) / (high - low)) ** 2 * (high - low) + low
    expected = (gamma - gamma.mean()) * 1.2 + gamma.mean()
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)


def test_noise_is_three_percent_of_the_slice_std():
    rng = np.random.default_rng(2)
    image = rng.uniform(0.0, 5.0, size=(SIZE, SIZE, 1)).astype(np.float32)
    config = AugmentConfig(**{**IDENTITY.__dict__, "noise_fraction": 0.03})
    out, _ = augment_slice(image, np.zeros((SIZE, SIZE), np.int32), tf.constant([0, 4]), config)
    residual = out.numpy() - image
    assert abs(residual.std() / (0.03 * image.std()) - 1) < 0.15
    assert abs(residual.mean()) < 0.2 * residual.std()


def test_disabled_augmentation_is_identity():
    image, label = _rectangle()
    out_image, out_label = augment_slice(image, label, tf.constant([0, 0]), AugmentConfig(enabled=False))
    np.testing.assert_array_equal(out_image.numpy(), image)
    np.testing.assert_array_equal(out_label.numpy(), label)


def test_training_dataset_structure_and_streams(cache):
    dataset = training_dataset(cache, 4, augment=False, seed=0)
    for element in dataset.take(10):
        assert set(element) == {"assistant", "target", "target_labelled"}
        for stream in element.values():
            assert stream["image"].shape == (4, SIZE, SIZE, 1) and stream["image"].dtype == tf.float32
            assert stream["label"].shape == (4, SIZE, SIZE) and stream["label"].dtype == tf.int32
            assert stream["has_label"].shape == (4,)
        assistant, target = _ids(element["assistant"]), _ids(element["target"])
        assert set(assistant.tolist()) <= ASSISTANT_LABELLED
        np.testing.assert_array_equal(element["assistant"]["has_label"], np.ones(4))
        assert set(target.tolist()) <= TARGET_TRAIN_LABELLED | TARGET_TRAIN_UNLABELLED
        np.testing.assert_array_equal(element["target"]["has_label"], (target < 100).astype(np.float32))
    augmented = next(iter(training_dataset(cache, 4, seed=0)))
    assert set(np.unique(augmented["target"]["label"].numpy())) <= {0, 1, 2}


def test_empty_selection_raises_naming_the_cache(cache):
    with pytest.raises(MkdError, match=str(cache.path)):
        slice_dataset(cache, "target", "val")
    with pytest.raises(MkdError, match="no assistant slices"):
        slice_dataset(cache, "assistant", "test")
    with pytest.raises(MkdError, match="fewer than one batch"):
        slice_dataset(cache, "target", "test", 8, repeat=False)
