import numpy as np
import pytest
import tensorflow as tf

import keras

from mkd_tf.models.segmentor import ConvBlock, Segmentor

SHAPE = (None, 32, 32, 1)


def small(norm="batch", num_classes=3, **kwargs):
    model = Segmentor(num_classes, base_filters=4, depth=2, norm=norm, **kwargs)
    model.build(SHAPE)
    return model


def images(batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 32, 32, 1)).astype("float32")


def expected_parameters(num_classes, base_filters, depth, norm_params_per_channel):
    """Hand count of the U-Net's weights: 3x3 convs without bias (norm follows), 2x2 transposed
    convs with bias, a 1x1 classifier with bias; batch norm holds 4 numbers per channel."""

    def block(channels_in, channels_out):
        convs = 9 * channels_in * channels_out + 9 * channels_out * channels_out
        return convs + 2 * norm_params_per_channel * channels_out

    total, channels = 0, 1
    for level in range(depth):
        total += block(channels, base_filters * 2**level)
        channels = base_filters * 2**level
    total += block(channels, base_filters * 2**depth)
    channels = base_filters * 2**depth
    for level in range(depth - 1, -1, -1):
        filters = base_filters * 2**level
        total += 4 * channels * filters + filters  # transposed conv
        total += block(2 * filters, filters)  # after concatenating the skip
        channels = filters
    return total + channels * num_classes + num_classes


def test_output_shapes_and_parameter_count():
    model = small(num_classes=5)
    logits = model(images(), training=False)
    assert logits.shape == (2, 32, 32, 5)
    assert logits.dtype == "float32"
    # Intermediate resolutions: two halvings to 8x8 with base * 2**depth channels.
    assert model.bottleneck.compute_output_shape((2, 8, 8, 8)) == (2, 8, 8, 16)
    assert model.count_params() == expected_parameters(5, 4, 2, norm_params_per_channel=4) == 7657
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trainable == expected_parameters(5, 4, 2, norm_params_per_channel=2)


def test_predict_probabilities_is_softmax_of_logits():
    model = small()
    x = images()
    probabilities = np.asarray(model.predict_probabilities(x))
    logits = np.asarray(model(x, training=False))
    reference = np.exp(logits - logits.max(-1, keepdims=True))
    reference /= reference.sum(-1, keepdims=True)
    np.testing.assert_allclose(probabilities, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_config_round_trip_gives_same_outputs():
    model = small(norm="batch", dropout=0.25)
    config = model.get_config()
    assert {k: config[k] for k in ("num_classes", "base_filters", "depth", "norm", "dropout")} == {
        "num_classes": 3,
        "base_filters": 4,
        "depth": 2,
        "norm": "batch",
        "dropout": 0.25,
    }
    clone = Segmentor.from_config(config)
    clone.build(SHAPE)
    x = images()
    # Fresh weights differ, so equality below is due to the copy.
    assert not np.allclose(model(x), clone(x))
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(model(x), clone(x), rtol=1e-6, atol=1e-6)
    # Also by the registered name, as a .keras file would store it.
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(revived, Segmentor) and revived.get_config() == config


def test_conv_block_config_round_trip():
    block = ConvBlock(6, norm="instance", name="b")
    assert ConvBlock.from_config(block.get_config()).get_config() == block.get_config()


@pytest.mark.parametrize(
    "shape",
    [(None, 30, 32, 1), (None, 32, 34, 1), (None, 32, 32, 3)],
)
def test_invalid_input_shape_raises(shape):
    with pytest.raises(ValueError, match="Segmentor"):
        Segmentor(2, base_filters=4, depth=2).build(shape)


def test_invalid_size_raises_when_called():
    model = small()
    with pytest.raises(ValueError, match="divisible by 4"):
        model(np.zeros((1, 36, 34, 1), "float32"))


@pytest.mark.parametrize("kwargs", [{"norm": "layer"}, {"depth": 0}, {"dropout": 1.0}])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        Segmentor(2, **kwargs)


def test_instance_norm_keeps_batch_items_independent():
    instance = small(norm="instance")
    assert instance.non_trainable_variables == []  # no running statistics
    x = images(batch=4)
    alone = instance(x[:1], training=True)
    together = instance(x, training=True)[:1]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(instance(x, training=True), instance(x, training=False), atol=1e-6)
    # Batch norm in training mode does mix the batch: the check above is not vacuous.
    batch = small(norm="batch")
    assert not np.allclose(batch(x[:1], training=True), batch(x, training=True)[:1], atol=1e-3)


def disks(batch, seed):
    """Noisy bright disks on a dark background; labels are 1 inside the disk."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    centres = rng.uniform(10, 22, size=(batch, 2))
    radii = rng.uniform(4, 9, size=batch)
    masks = (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2 < radii[:, None, None] ** 2
    pictures = masks + rng.normal(scale=0.3, size=masks.shape)
    pictures = (pictures - pictures.mean()) / pictures.std()
    return pictures[..., None].astype("float32"), masks.astype("int32")


def test_training_on_disks_reduces_loss():
    keras.utils.set_random_seed(1)
    model = small(norm="batch", num_classes=2)
    x, y = disks(8, seed=2)
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    losses = [float(step(x, y)) for _ in range(40)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    # The model, not just the loss, got it: the training images are mostly segmented right.
    predicted = np.argmax(model(x, training=True), axis=-1)
    assert (predicted == y).mean() > 0.9


def test_mirrored_strategy_step_matches_plain_step():
    x, y = disks(4, seed=3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make():
        model = Segmentor(2, base_filters=4, depth=2, norm="instance")
        model.build(SHAPE)
        return model

    plain = make()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        mirrored = make()
        mirrored_optimizer = keras.optimizers.SGD(0.1)
        mirrored_optimizer.build(mirrored.trainable_variables)
    mirrored.set_weights(plain.get_weights())
    plain_optimizer = keras.optimizers.SGD(0.1)

    def train(model, optimizer, x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def distributed_step(x, y):
        return strategy.run(train, args=(mirrored, mirrored_optimizer, x, y))

    plain_loss = tf.function(train)(plain, plain_optimizer, x, y)
    mirrored_loss = distributed_step(x, y)
    np.testing.assert_allclose(float(mirrored_loss), float(plain_loss), rtol=1e-5)
    for a, b in zip(plain.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_keras_file_round_trip(tmp_path):
    model = small(norm="instance")
    path = tmp_path / "segmentor.keras"
    model.save(path)
    revived = keras.saving.load_model(path)
    assert isinstance(revived, Segmentor)
    x = images()
    np.testing.assert_array_equal(revived(x), model(x))
