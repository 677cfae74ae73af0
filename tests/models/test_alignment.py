import numpy as np
import pytest
import tensorflow as tf

import keras

from mkd_tf.models.alignment import (
    ImageAlignmentModule,
    PatchDiscriminator,
    ReflectionPadding2D,
    ResnetBlock,
    ResnetGenerator,
)

SHAPE = (None, 32, 32, 1)


def small_module(**kwargs):
    """A tiny module; G(x) = x + r(x) (skip_kernel 1) unless a test says otherwise (the hand counts below)."""
    module = ImageAlignmentModule(base_filters=4, num_blocks=1, disc_filters=4, **{"skip_kernel": 1, **kwargs})
    module.build(SHAPE)
    return module


def images(batch=2, height=32, width=32, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, height, width, 1)).astype("float32")


def test_reflection_padding_mirrors_without_repeating_the_edge():
    row = np.arange(4, dtype="float32").reshape(1, 1, 4, 1)
    padded = np.asarray(ReflectionPadding2D(2)(np.tile(row, (1, 3, 1, 1))))
    assert padded.shape == (1, 7, 8, 1)
    np.testing.assert_array_equal(padded[0, 3, :, 0], [2, 1, 0, 1, 2, 3, 2, 1])
    assert ReflectionPadding2D(2).compute_output_shape((None, 3, None, 1)) == (None, 7, None, 1)


def test_generator_shapes_and_parameter_count():
    generator = ResnetGenerator(base_filters=4, num_blocks=1, skip_kernel=1)
    assert generator(images(height=48, width=64)).shape == (2, 48, 64, 1)
    # Hand count, k = 4, instance norm (2 numbers per channel), convs before a norm have no bias.
    stem = 7 * 7 * 1 * 4 + 2 * 4
    down = (9 * 4 * 8 + 2 * 8) + (9 * 8 * 16 + 2 * 16)
    block = 2 * (9 * 16 * 16 + 2 * 16)
    up = (9 * 16 * 8 + 2 * 8) + (9 * 8 * 4 + 2 * 4)
    head = 7 * 7 * 4 * 1 + 1
    assert generator.count_params() == stem + down + block + up + head == 8025
    two_blocks = ResnetGenerator(base_filters=4, num_blocks=2, skip_kernel=1)
    two_blocks.build(SHAPE)
    assert two_blocks.count_params() == 8025 + block


def test_untrained_residual_generator_returns_its_input_exactly():
    x = images(seed=3) * 3.0
    for generator in small_module().generators:  # G and F of the default (residual) module
        np.testing.assert_array_equal(np.asarray(generator(x, training=True)), x)
    plain = ResnetGenerator(base_filters=4, num_blocks=1, residual=False)
    assert np.abs(np.asarray(plain(x)) - x).mean() > 0.1


def test_skip_convolution_starts_as_the_identity_and_learns_to_smooth():
    x = tf.constant(images(seed=5) * 3.0)
    generator = ResnetGenerator(base_filters=4, num_blocks=1, skip_kernel=5)
    generator.build(SHAPE)
    assert generator.count_params() == 8025 + 5 * 5 + 1  # the skip's kernel and bias
    np.testing.assert_allclose(np.asarray(generator(x, training=True)), np.asarray(x), rtol=0, atol=1e-6)
    # A 3x3 box blur of x is reachable through the skip alone (r stays near zero): training moves towards it.
    blurred = tf.nn.avg_pool2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], "REFLECT"), 3, 1, "VALID")
    optimizer = keras.optimizers.Adam(1e-2)

    def loss():
        return tf.reduce_mean(tf.abs(generator(x, training=True) - blurred))

    first = float(loss())
    for _ in range(20):
        with tf.GradientTape() as tape:
            value = loss()
        optimizer.apply_gradients(
            zip(tape.gradient(value, generator.trainable_variables), generator.trainable_variables)
        )
    assert float(loss()) < 0.5 * first
    kernel = generator.skip.get_weights()[0][..., 0, 0]
    assert kernel[2, 2] < 0.9 and kernel[1:4, 1:4].sum() > 0.8  # mass moved from the centre to its neighbours
    with pytest.raises(ValueError, match="odd"):
        ResnetGenerator(skip_kernel=4)


def test_residual_generator_learns_a_change_of_appearance():
    # r's zero last layer still gets gradients, so one step moves G away from the identity.
    generator = ResnetGenerator(base_filters=4, num_blocks=1)
    x = tf.constant(images(seed=4))
    optimizer = keras.optimizers.Adam(1e-2)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.abs(generator(x, training=True) - (2.0 * x + 1.0)))
    gradients = tape.gradient(loss, generator.trainable_variables)
    optimizer.apply_gradients(zip(gradients, generator.trainable_variables))
    after = float(tf.reduce_mean(tf.abs(generator(x, training=True) - (2.0 * x + 1.0))))
    assert after < float(loss)


def test_generator_output_is_linear_not_squashed():
    # No tanh: scaling the last convolution's weights scales the output exactly, beyond (-1, 1).
    generator = ResnetGenerator(base_filters=4, num_blocks=1, residual=False)
    x = images()
    before = np.asarray(generator(x))
    kernel, bias = generator.head.get_weights()
    generator.head.set_weights([kernel * 50.0, bias * 50.0])
    np.testing.assert_allclose(generator(x), before * 50.0, rtol=1e-4, atol=1e-4)
    assert np.abs(before * 50.0).max() > 1.0


@pytest.mark.parametrize(
    "num_layers, size, scores",
    [(3, 32, 2), (2, 32, 6), (1, 32, 14), (3, 48, 4)],
)
def test_discriminator_score_map_shape(num_layers, size, scores):
    discriminator = PatchDiscriminator(base_filters=4, num_layers=num_layers)
    out = discriminator(images(height=size, width=size))
    assert out.shape == (2, scores, scores, 1)
    assert discriminator.compute_output_shape((None, size, size, 1)) == (None, scores, scores, 1)


def test_discriminator_matches_pix2pix_sizes():
    # pix2pix's 70x70 PatchGAN turns a 256x256 image into a 30x30 score map.
    assert PatchDiscriminator(num_layers=3).output_size(256) == 30
    discriminator = PatchDiscriminator(base_filters=4, num_layers=3)
    discriminator.build(SHAPE)
    # conv0 (bias, no norm), conv1..3 (no bias, instance norm), score (bias).
    expected = (16 * 1 * 4 + 4) + (16 * 4 * 8 + 16) + (16 * 8 * 16 + 32) + (16 * 16 * 32 + 64)
    expected += 16 * 32 * 1 + 1
    assert discriminator.count_params() == expected == 11445


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="divisible by 4"):
        ResnetGenerator(base_filters=4, num_blocks=1)(images(height=30))
    with pytest.raises(ValueError, match="larger height"):
        PatchDiscriminator(base_filters=4, num_layers=3).build((None, 16, 32, 1))
    with pytest.raises(ValueError):
        ResnetGenerator(norm="layer")


def test_module_shapes_and_variable_partition():
    module = small_module()
    x = images()
    assert module(x).shape == (2, 32, 32, 1)
    np.testing.assert_array_equal(module.align(x), module.assistant_to_target(x))
    assert module.target_to_assistant(x).shape == (2, 32, 32, 1)
    assert module.target_discriminator(x).shape == (2, 2, 2, 1)
    assert module.assistant_discriminator(x).shape == (2, 2, 2, 1)

    generator_ids = {id(v) for v in module.generator_variables}
    discriminator_ids = {id(v) for v in module.discriminator_variables}
    all_ids = {id(v) for v in module.trainable_variables}
    assert len(generator_ids) == len(module.generator_variables) == 2 * 23
    assert len(discriminator_ids) == len(module.discriminator_variables) == 2 * 13
    assert not generator_ids & discriminator_ids
    assert generator_ids | discriminator_ids == all_ids
    assert module.count_params() == 2 * 8025 + 2 * 11445


def test_module_config_round_trip_gives_same_outputs():
    # Plain generators: residual ones both start as the identity, so two fresh ones agree anyway.
    module = small_module(disc_layers=2, residual=False)
    config = module.get_config()
    keys = ("base_filters", "num_blocks", "disc_filters", "disc_layers", "norm", "residual")
    assert {k: config[k] for k in keys} == {
        "base_filters": 4,
        "num_blocks": 1,
        "disc_filters": 4,
        "disc_layers": 2,
        "norm": "instance",
        "residual": False,
    }
    clone = ImageAlignmentModule.from_config(config)
    clone.build(SHAPE)
    x = images()
    assert not np.allclose(module.align(x), clone.align(x))
    clone.set_weights(module.get_weights())
    for name in ("assistant_to_target", "target_to_assistant", "target_discriminator", "assistant_discriminator"):
        np.testing.assert_allclose(getattr(module, name)(x), getattr(clone, name)(x), rtol=1e-5, atol=1e-6)
    for cls, layer in [
        (ResnetGenerator, module.assistant_to_target),
        (PatchDiscriminator, module.target_discriminator),
        (ResnetBlock, module.assistant_to_target.blocks[0]),
    ]:
        assert cls.from_config(layer.get_config()).get_config() == layer.get_config()
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(module))
    assert isinstance(revived, ImageAlignmentModule) and revived.get_config() == config


def paired_modalities(batch, seed):
    """Same disks in two appearances: 'assistant' bright on a striped background, 'target' dark on a
    flat one; each z-scored like the real slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    centres = rng.uniform(10, 22, size=(batch, 2))
    radii = rng.uniform(4, 9, size=batch)
    disks = (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2 < radii[:, None, None] ** 2
    assistant = disks + 0.5 * np.sin(xx / 3.0) + rng.normal(scale=0.1, size=disks.shape)
    target = -1.5 * disks + rng.normal(scale=0.1, size=disks.shape)

    def zscore(a):
        return ((a - a.mean()) / a.std())[..., None].astype("float32")

    return zscore(assistant), zscore(target)


def test_lsgan_training_with_separate_optimizers_reduces_cycle_loss():
    keras.utils.set_random_seed(0)
    module = small_module(residual=False)  # residual generators start with no cycle error to reduce
    assistant, target = paired_modalities(4, seed=0)
    G, F = module.assistant_to_target, module.target_to_assistant
    D_T, D_A = module.target_discriminator, module.assistant_discriminator
    generator_optimizer = keras.optimizers.Adam(2e-3, beta_1=0.5)
    discriminator_optimizer = keras.optimizers.Adam(2e-3, beta_1=0.5)
    generator_optimizer.build(module.generator_variables)
    discriminator_optimizer.build(module.discriminator_variables)
    discriminator_before = [v.numpy() for v in module.discriminator_variables]

    def least_squares(scores, goal):
        return tf.reduce_mean(tf.square(scores - goal))

    @tf.function
    def step(assistant, target):
        with tf.GradientTape() as tape:
            fake_target = G(assistant, training=True)
            fake_assistant = F(target, training=True)
            cycle = tf.reduce_mean(tf.abs(assistant - F(fake_target, training=True)))
            cycle += tf.reduce_mean(tf.abs(target - G(fake_assistant, training=True)))
            adversarial = least_squares(D_T(fake_target, training=True), 1.0)
            adversarial += least_squares(D_A(fake_assistant, training=True), 1.0)
            generator_loss = adversarial + 10.0 * cycle
        gradients = tape.gradient(generator_loss, module.generator_variables)
        generator_optimizer.apply_gradients(zip(gradients, module.generator_variables))
        fake_target = tf.stop_gradient(fake_target)
        fake_assistant = tf.stop_gradient(fake_assistant)
        with tf.GradientTape() as tape:
            discriminator_loss = 0.5 * (
                least_squares(D_T(target, training=True), 1.0)
                + least_squares(D_T(fake_target, training=True), 0.0)
                + least_squares(D_A(assistant, training=True), 1.0)
                + least_squares(D_A(fake_assistant, training=True), 0.0)
            )
        gradients = tape.gradient(discriminator_loss, module.discriminator_variables)
        discriminator_optimizer.apply_gradients(zip(gradients, module.discriminator_variables))
        # The brief's cycle loss on the assistant side, mean |x - F(G(x))|.
        return cycle / 2, tf.reduce_mean(tf.abs(assistant - F(G(assistant)))), discriminator_loss

    history = np.array([[float(v) for v in step(assistant, target)] for _ in range(40)])
    assert np.all(np.isfinite(history))
    assert all(np.all(np.isfinite(v)) for v in module.trainable_variables)
    assistant_cycle = history[:, 1]
    assert assistant_cycle[-1] < 0.7 * assistant_cycle[0], assistant_cycle
    assert int(generator_optimizer.iterations) == int(discriminator_optimizer.iterations) == 40
    # The discriminators moved under their own optimizer.
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(discriminator_before, module.discriminator_variables))


def test_keras_file_round_trip(tmp_path):
    module = small_module()
    path = tmp_path / "alignment.keras"
    module.save(path)
    revived = keras.saving.load_model(path)
    assert isinstance(revived, ImageAlignmentModule)
    x = images()
    np.testing.assert_array_equal(revived.align(x), module.align(x))
    np.testing.assert_array_equal(revived.assistant_discriminator(x), module.assistant_discriminator(x))
