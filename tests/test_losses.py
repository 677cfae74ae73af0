"""Losses against values worked out by hand with numpy on tiny 2x2 examples."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mkd_tf import losses  # noqa: E402

# One example, 2x2 pixels, 3 classes.
LABELS = np.array([[[0, 1], [2, 1]]], dtype=np.int32)  # (1, 2, 2)
PROBS = np.array(
    [[[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]]], dtype=np.float32
)  # (1, 2, 2, 3)
TEACHER = np.array([[[[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], [[-0.5, 0.3, 1.5], [1.2, -0.7, 0.4]]]], dtype=np.float32)
STUDENT = np.array([[[[1.0, 1.0, 0.0], [0.3, 0.2, -0.4]], [[0.0, 0.0, 2.0], [-1.0, 0.5, 0.9]]]], dtype=np.float32)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
    return np.sum(p * np.log(p / q), axis=-1)


def test_cross_entropy_by_hand():
    # p_y at the four pixels: 0.7, 0.8, 0.5, 0.3.
    expected = -(np.log(0.7) + np.log(0.8) + np.log(0.5) + np.log(0.3)) / 4
    result = losses.cross_entropy(LABELS, PROBS).numpy()
    assert result.shape == (1,)
    np.testing.assert_allclose(result, [expected], rtol=1e-6)


def test_cross_entropy_class_weights_and_clipping():
    weights = [1.0, 2.0, 3.0]
    expected = -(1 * np.log(0.7) + 2 * np.log(0.8) + 3 * np.log(0.5) + 2 * np.log(0.3)) / 4
    np.testing.assert_allclose(
        losses.cross_entropy(LABELS, PROBS, class_weights=weights).numpy(), [expected], rtol=1e-6
    )
    # A zero probability on the true class is clipped to 1e-7, not -log(0) = inf.
    zero = np.array([[[[0.0, 1.0]]]], dtype=np.float32)
    np.testing.assert_allclose(
        losses.cross_entropy(np.zeros((1, 1, 1), np.int32), zero).numpy(), [-np.log(1e-7)], rtol=1e-5
    )


def test_soft_dice_loss_by_hand():
    s = 1e-5
    # class 1: labels at (0,1),(1,1); p_1 = .2 .8 .3 .3
    dice1 = (2 * (0.8 + 0.3) + s) / ((0.2 + 0.8 + 0.3 + 0.3) + 2 + s)
    # class 2: label at (1,0); p_2 = .1 .1 .5 .1
    dice2 = (2 * 0.5 + s) / ((0.1 + 0.1 + 0.5 + 0.1) + 1 + s)
    # class 0: label at (0,0); p_0 = .7 .1 .2 .6
    dice0 = (2 * 0.7 + s) / ((0.7 + 0.1 + 0.2 + 0.6) + 1 + s)
    np.testing.assert_allclose(losses.soft_dice_loss(LABELS, PROBS).numpy(), [1 - (dice1 + dice2) / 2], rtol=1e-6)
    np.testing.assert_allclose(
        losses.soft_dice_loss(LABELS, PROBS, include_background=True).numpy(),
        [1 - (dice0 + dice1 + dice2) / 3],
        rtol=1e-6,
    )


def test_segmentation_loss_is_sum_and_per_example():
    labels = np.concatenate([LABELS, np.zeros_like(LABELS)])
    probs = np.concatenate([PROBS, np.full_like(PROBS, 1 / 3)])
    result = losses.segmentation_loss(labels, probs).numpy()
    assert result.shape == (2,)
    s = 1e-5
    dice1 = (2 * 1.1 + s) / (1.6 + 2 + s)
    dice2 = (2 * 0.5 + s) / (0.8 + 1 + s)
    first = -np.log([0.7, 0.8, 0.5, 0.3]).mean() + 1 - (dice1 + dice2) / 2
    # Second example: all background, uniform prediction; classes 1, 2 have no label pixels.
    uniform_dice = s / (4 / 3 + s)
    second = np.log(3) + 1 - uniform_dice
    np.testing.assert_allclose(result, [first, second], rtol=1e-5)


def test_distillation_loss_by_hand_and_temperature_squared():
    for temperature in (1.0, 2.0, 4.0):
        teacher = _softmax(TEACHER.astype(np.float64) / temperature)
        student = _softmax(STUDENT.astype(np.float64) / temperature)
        expected = temperature**2 * _kl(teacher, student).mean()
        result = losses.distillation_loss(TEACHER, STUDENT, temperature).numpy()
        assert result.shape == (1,)
        np.testing.assert_allclose(result, [expected], rtol=1e-5)
    # The T^2 factor exactly: at T=3 the loss is 9 times the unscaled mean KL.
    unscaled = _kl(_softmax(TEACHER / 3.0), _softmax(STUDENT / 3.0)).mean()
    np.testing.assert_allclose(losses.distillation_loss(TEACHER, STUDENT, 3.0).numpy(), [9 * unscaled], rtol=1e-5)


def test_distillation_loss_zero_for_identical_logits():
    result = losses.distillation_loss(TEACHER, TEACHER, 2.0).numpy()
    np.testing.assert_allclose(result, [0.0], atol=1e-7)


def test_distillation_gradient_reaches_student_only_with_stop_gradient():
    teacher = tf.Variable(TEACHER)
    student = tf.Variable(STUDENT)
    with tf.GradientTape(persistent=True) as tape:
        stopped = tf.reduce_sum(losses.distillation_loss(tf.stop_gradient(teacher), student, 2.0))
        unstopped = tf.reduce_sum(losses.distillation_loss(teacher, student, 2.0))
    teacher_grad, student_grad = tape.gradient(stopped, [teacher, student])
    assert teacher_grad is None
    # d/ds [T^2 * mean KL(softmax(t/T) || softmax(s/T))] = T * (r - q) / HW, q teacher, r student.
    q = _softmax(TEACHER / 2.0)
    r = _softmax(STUDENT / 2.0)
    np.testing.assert_allclose(student_grad.numpy(), 2.0 * (r - q) / 4, rtol=1e-4, atol=1e-7)
    # Without the caller's stop_gradient the teacher does receive a gradient.
    assert np.abs(tape.gradient(unstopped, teacher).numpy()).max() > 1e-3


def test_lsgan_losses_by_hand():
    real = np.array([[[[0.9], [0.4]], [[1.2], [0.0]]]], dtype=np.float32)  # (1, 2, 2, 1)
    fake = np.array([[[[0.1], [0.6]], [[-0.2], [1.0]]]], dtype=np.float32)
    generator = ((0.1 - 1) ** 2 + (0.6 - 1) ** 2 + (-0.2 - 1) ** 2 + 0.0) / 4
    real_term = ((0.9 - 1) ** 2 + (0.4 - 1) ** 2 + (1.2 - 1) ** 2 + 1.0) / 4
    fake_term = (0.1**2 + 0.6**2 + 0.2**2 + 1.0) / 4
    np.testing.assert_allclose(losses.lsgan_generator_loss(fake).numpy(), [generator], rtol=1e-6)
    np.testing.assert_allclose(
        losses.lsgan_discriminator_loss(real, fake).numpy(), [0.5 * (real_term + fake_term)], rtol=1e-6
    )


def test_lsgan_perfect_discriminator_and_generator_give_zero():
    ones = np.ones((3, 2, 2, 1), np.float32)
    zeros = np.zeros((3, 2, 2, 1), np.float32)
    np.testing.assert_array_equal(losses.lsgan_discriminator_loss(ones, zeros).numpy(), [0, 0, 0])
    np.testing.assert_array_equal(losses.lsgan_generator_loss(ones).numpy(), [0, 0, 0])
    # A fooled discriminator (fake scored 1) costs it 0.5 * 1 = 0.5.
    np.testing.assert_allclose(losses.lsgan_discriminator_loss(ones, ones).numpy(), [0.5] * 3)


def test_cycle_loss_by_hand():
    images = PROBS
    reconstructed = PROBS + np.array([0.1, -0.2, 0.3], np.float32)
    second = np.zeros_like(PROBS)
    result = losses.cycle_loss(np.concatenate([images, second]), np.concatenate([reconstructed, second])).numpy()
    np.testing.assert_allclose(result, [(0.1 + 0.2 + 0.3) / 3, 0.0], rtol=1e-5)


def test_structure_loss_ignores_local_contrast_changes_and_sees_moved_edges():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 24, 24, 1)).astype(np.float32)
    # Any affine intensity map (compressed, inverted, shifted) keeps the structure: loss ~0.
    for translated in (0.2 * images - 3.0, -4.0 * images + 1.0):
        np.testing.assert_allclose(losses.structure_loss(images, translated).numpy(), 0.0, atol=0.02)
    # An unrelated image, or the same image moved by two pixels, loses it.
    assert (losses.structure_loss(images, rng.normal(size=images.shape).astype(np.float32)).numpy() > 0.9).all()
    assert (losses.structure_loss(images, np.roll(images, 2, axis=2)).numpy() > 0.8).all()
    # By hand: every pixel's 3x3 window of the mirrored image, NCC^2 from its moments.
    x = rng.normal(size=(1, 6, 6, 1))
    y = np.tanh(x) + 0.3 * rng.normal(size=x.shape)
    padded_x, padded_y = (np.pad(v[0, ..., 0], 1, mode="reflect") for v in (x, y))
    terms = []
    for row in range(6):
        for col in range(6):
            a, b = padded_x[row : row + 3, col : col + 3], padded_y[row : row + 3, col : col + 3]
            cov = (a * b).mean() - a.mean() * b.mean()
            terms.append(1.0 - cov**2 / (a.var() * b.var() + 1e-4))
    result = losses.structure_loss(x.astype(np.float32), y.astype(np.float32), window=3).numpy()
    assert result.shape == (1,)
    np.testing.assert_allclose(result, [np.mean(terms)], rtol=1e-4)


def test_classwise_kl_loss_by_hand():
    temperature = 2.0
    # Class-wise mean logits over the pixels labelled 0 (1 pixel), 1 (2 pixels), 2 (1 pixel).
    flat_labels = LABELS.reshape(-1)
    teacher = TEACHER.reshape(-1, 3).astype(np.float64)
    student = STUDENT.reshape(-1, 3).astype(np.float64)
    kls = []
    for c in range(3):
        t_mean = teacher[flat_labels == c].mean(axis=0)
        s_mean = student[flat_labels == c].mean(axis=0)
        kls.append(_kl(_softmax(t_mean / temperature), _softmax(s_mean / temperature)))
    expected = np.mean(kls)
    result = losses.classwise_kl_loss(TEACHER, STUDENT, LABELS, 3, temperature).numpy()
    assert result.shape == ()
    np.testing.assert_allclose(result, expected, rtol=1e-5)
    # Class 1 by hand: its pixels are (0, 1) and (1, 1).
    t1 = (np.array([0.0, 1.0, 0.0]) + np.array([1.2, -0.7, 0.4])) / 2
    s1 = (np.array([0.3, 0.2, -0.4]) + np.array([-1.0, 0.5, 0.9])) / 2
    np.testing.assert_allclose(kls[1], _kl(_softmax(t1 / 2), _softmax(s1 / 2)), rtol=1e-6)


def test_classwise_kl_loss_absent_classes_identity_and_unpaired_labels():
    # Identical logits: zero.
    np.testing.assert_allclose(losses.classwise_kl_loss(TEACHER, TEACHER, LABELS, 3).numpy(), 0.0, atol=1e-7)
    # With a 4th class that no pixel has, the mean is still over the 3 present classes.
    pad = np.zeros((1, 2, 2, 1), np.float32)
    three = losses.classwise_kl_loss(TEACHER, STUDENT, LABELS, 3).numpy()
    four = losses.classwise_kl_loss(
        np.concatenate([TEACHER, pad], -1), np.concatenate([STUDENT, pad], -1), LABELS, 4
    ).numpy()
    padded_t = np.concatenate([TEACHER, pad], -1).reshape(-1, 4).astype(np.float64)
    padded_s = np.concatenate([STUDENT, pad], -1).reshape(-1, 4).astype(np.float64)
    flat_labels = LABELS.reshape(-1)
    kls = [
        _kl(
            _softmax(padded_t[flat_labels == c].mean(0) / 2),
            _softmax(padded_s[flat_labels == c].mean(0) / 2),
        )
        for c in range(3)
    ]
    np.testing.assert_allclose(four, sum(kls) / 3, rtol=1e-5)  # not / 4
    # Unpaired: the student's pixels may be in another order with their own labels.
    permuted_student = STUDENT[:, ::-1, ::-1]
    permuted_labels = LABELS[:, ::-1, ::-1]
    np.testing.assert_allclose(
        losses.classwise_kl_loss(TEACHER, permuted_student, LABELS, 3, student_labels=permuted_labels).numpy(),
        three,
        rtol=1e-6,
    )
    # Only classes present on both sides count: student lacks class 2 -> mean over classes 0 and 1.
    student_labels = np.array([[[0, 1], [1, 1]]], np.int32)
    flat_t = TEACHER.reshape(-1, 3).astype(np.float64)
    flat_s = STUDENT.reshape(-1, 3).astype(np.float64)
    expected = np.mean(
        [
            _kl(
                _softmax(flat_t[LABELS.reshape(-1) == c].mean(0) / 2),
                _softmax(flat_s[student_labels.reshape(-1) == c].mean(0) / 2),
            )
            for c in (0, 1)
        ]
    )
    np.testing.assert_allclose(
        losses.classwise_kl_loss(TEACHER, STUDENT, LABELS, 3, student_labels=student_labels).numpy(),
        expected,
        rtol=1e-5,
    )


def test_losses_in_tf_function_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    labels = np.concatenate([LABELS, np.zeros_like(LABELS)])
    probs = np.concatenate([PROBS, np.full_like(PROBS, 1 / 3)])
    has_label = np.array([1.0, 0.0], np.float32)
    global_batch = 2

    @tf.function
    def step(labels, probs, has_label):
        def replica_fn(labels, probs, has_label):
            per_example = losses.segmentation_loss(labels, probs) * has_label
            return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)

        per_replica = strategy.run(replica_fn, args=(labels, probs, has_label))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    with strategy.scope():
        total = step(tf.constant(labels), tf.constant(probs), tf.constant(has_label)).numpy()
    expected = losses.segmentation_loss(LABELS, PROBS).numpy()[0] / global_batch
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_per_example_shape_for_batch_of_three():
    batch_labels = np.repeat(LABELS, 3, axis=0)
    batch_probs = np.repeat(PROBS, 3, axis=0)
    batch_teacher = np.repeat(TEACHER, 3, axis=0)
    batch_student = np.repeat(STUDENT, 3, axis=0)
    single = {
        "cross_entropy": losses.cross_entropy(LABELS, PROBS),
        "soft_dice_loss": losses.soft_dice_loss(LABELS, PROBS),
        "distillation_loss": losses.distillation_loss(TEACHER, STUDENT, 2.0),
        "lsgan_generator_loss": losses.lsgan_generator_loss(PROBS),
        "lsgan_discriminator_loss": losses.lsgan_discriminator_loss(PROBS, PROBS),
        "cycle_loss": losses.cycle_loss(PROBS, PROBS * 0.5),
    }
    batched = {
        "cross_entropy": losses.cross_entropy(batch_labels, batch_probs),
        "soft_dice_loss": losses.soft_dice_loss(batch_labels, batch_probs),
        "distillation_loss": losses.distillation_loss(batch_teacher, batch_student, 2.0),
        "lsgan_generator_loss": losses.lsgan_generator_loss(batch_probs),
        "lsgan_discriminator_loss": losses.lsgan_discriminator_loss(batch_probs, batch_probs),
        "cycle_loss": losses.cycle_loss(batch_probs, batch_probs * 0.5),
    }
    for name, result in batched.items():
        assert result.shape == (3,), name
        # Each example's value does not depend on the rest of the batch.
        np.testing.assert_allclose(result.numpy(), np.repeat(single[name].numpy(), 3), rtol=1e-6)
