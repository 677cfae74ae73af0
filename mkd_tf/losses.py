"""Training losses for the segmentors, the distillation between them and the alignment GAN.

Every loss except :func:`classwise_kl_loss` returns a **per-example** vector of shape `(batch,)`. The
training step weights it (e.g. by a `has_label` mask) and reduces it with
`tf.nn.compute_average_loss(per_example, global_batch_size=...)`, which is how losses are scaled across
replicas under `tf.distribute.MirroredStrategy` in this project. None of these functions reduces over
the batch or knows about replicas.

Conventions: tensors are NHWC. `labels` are integer class indices of shape `(batch, height, width)`;
`probabilities` are softmax outputs and `logits` pre-softmax scores, both `(batch, height, width,
classes)`. All functions are plain TensorFlow ops and work inside `tf.function`.
"""

import tensorflow as tf

# Smallest probability fed to a log: -log(1e-7) ~= 16.1 bounds the loss of a confidently wrong pixel.
EPSILON = 1e-7


def _mean_per_example(values):
    """Mean over every axis but the first: `(batch, ...) -> (batch,)`."""
    batch = tf.shape(values)[0]
    return tf.reduce_mean(tf.reshape(values, [batch, -1]), axis=1)


def _one_hot(labels, like):
    """One-hot `labels` `(batch, height, width)` with as many classes and the dtype of `like`."""
    return tf.one_hot(tf.cast(labels, tf.int32), depth=tf.shape(like)[-1], dtype=like.dtype)


def cross_entropy(labels, probabilities, class_weights=None):
    """Pixel-averaged (optionally class-weighted) cross-entropy of softmax probabilities.

    L_b = (1 / HW) * sum_{i} w_{y_i} * ( -log clip(p_{i, y_i}, eps, 1) )

    with eps = 1e-7 and w = 1 when `class_weights` is `None`. The weighted form divides by the pixel
    count, not by the sum of weights (as SIFA's weighted cross-entropy does).

    Args:
        labels: integer tensor `(batch, height, width)`.
        probabilities: float tensor `(batch, height, width, classes)`, rows summing to 1.
        class_weights: optional sequence or tensor `(classes,)` of per-class weights.

    Returns:
        float tensor `(batch,)`.

    Example:
    >>> cross_entropy(tf.zeros((1, 2, 2), tf.int32), tf.fill((1, 2, 2, 2), 0.5)).numpy().round(4)  # [log 2]
    array([0.6931], dtype=float32)
    """
    probabilities = tf.convert_to_tensor(probabilities)
    one_hot = _one_hot(labels, probabilities)
    clipped = tf.clip_by_value(probabilities, EPSILON, 1.0)
    pixel_loss = -tf.reduce_sum(one_hot * tf.math.log(clipped), axis=-1)
    if class_weights is not None:
        weights = tf.cast(tf.convert_to_tensor(class_weights), probabilities.dtype)
        pixel_loss = pixel_loss * tf.reduce_sum(one_hot * weights, axis=-1)
    return _mean_per_example(pixel_loss)


def soft_dice_loss(labels, probabilities, smooth=1e-5, include_background=False):
    """One minus the mean soft Dice over classes, per example.

    L_b = 1 - (1 / |C|) * sum_{c in C} (2 * sum_i p_{ic} g_{ic} + s) / (sum_i p_{ic} + sum_i g_{ic} + s)

    where g is the one-hot of `labels`, sums run over the pixels of example b, s = `smooth`, and C is
    classes 1..K-1 (or 0..K-1 with `include_background`). A class absent from both the label and the
    prediction scores (s / s) = 1, so it does not penalise the example.

    Args:
        labels: integer tensor `(batch, height, width)`.
        probabilities: float tensor `(batch, height, width, classes)`.
        smooth: s, keeps the ratio defined for empty classes.
        include_background: whether class 0 counts in the mean.

    Returns:
        float tensor `(batch,)`.
    """
    probabilities = tf.convert_to_tensor(probabilities)
    one_hot = _one_hot(labels, probabilities)
    if not include_background:
        probabilities = probabilities[..., 1:]
        one_hot = one_hot[..., 1:]
    intersection = tf.reduce_sum(probabilities * one_hot, axis=[1, 2])
    total = tf.reduce_sum(probabilities, axis=[1, 2]) + tf.reduce_sum(one_hot, axis=[1, 2])
    dice = (2.0 * intersection + smooth) / (total + smooth)  # (batch, classes)
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def segmentation_loss(labels, probabilities):
    """Cross-entropy plus soft Dice, the supervised loss of each segmentor.

    L_b = cross_entropy_b + soft_dice_loss_b   (both with their defaults).

    Args:
        labels: integer tensor `(batch, height, width)`.
        probabilities: float tensor `(batch, height, width, classes)`.

    Returns:
        float tensor `(batch,)`.
    """
    return cross_entropy(labels, probabilities) + soft_dice_loss(labels, probabilities)


def distillation_loss(teacher_logits, student_logits, temperature):
    """Hinton knowledge distillation between two segmentors' logits, per example.

    L_b = T^2 * (1 / HW) * sum_i KL( softmax(t_i / T) || softmax(s_i / T) )
        = T^2 * (1 / HW) * sum_i sum_k q_{ik} * (log q_{ik} - log r_{ik}),
          q = softmax(t / T), r = softmax(s / T).

    The T^2 factor keeps the gradient magnitude independent of T (Hinton et al., 2015).

    The teacher is **not** stop-gradiented here: in mutual distillation each segmentor is the other's
    teacher, and the project's decision is that the teacher side carries no gradient, so the caller
    passes `tf.stop_gradient(teacher_logits)`.

    Args:
        teacher_logits: float tensor `(batch, height, width, classes)`.
        student_logits: float tensor `(batch, height, width, classes)`.
        temperature: T > 0, Python float or scalar tensor.

    Returns:
        float tensor `(batch,)`; 0 where the two logits are equal.
    """
    teacher_logits = tf.convert_to_tensor(teacher_logits)
    student_logits = tf.cast(student_logits, teacher_logits.dtype)
    temperature = tf.cast(temperature, teacher_logits.dtype)
    teacher_log_probs = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
    student_log_probs = tf.nn.log_softmax(student_logits / temperature, axis=-1)
    pixel_kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return temperature**2 * _mean_per_example(pixel_kl)


def lsgan_generator_loss(fake_scores):
    """Least-squares GAN loss of the generator (Mao et al., 2017), per example.

    L_b = mean_j (D(G(x))_j - 1)^2 over the discriminator's output positions j.

    Args:
        fake_scores: discriminator outputs on generated images, `(batch, ...)`, e.g. PatchGAN
            `(batch, height', width', 1)`.

    Returns:
        float tensor `(batch,)`.
    """
    fake_scores = tf.convert_to_tensor(fake_scores)
    return _mean_per_example(tf.square(fake_scores - 1.0))


def lsgan_discriminator_loss(real_scores, fake_scores):
    """Least-squares GAN loss of the discriminator, per example.

    L_b = 0.5 * [ mean_j (D(y)_j - 1)^2 + mean_j D(G(x))_j^2 ]

    The 0.5 halves the discriminator's learning rate relative to the generator (CycleGAN).

    Args:
        real_scores: discriminator outputs on real images, `(batch, ...)`.
        fake_scores: discriminator outputs on generated images, `(batch, ...)`.

    Returns:
        float tensor `(batch,)`; 0 for a perfect discriminator (real -> 1, fake -> 0).
    """
    real_scores = tf.convert_to_tensor(real_scores)
    fake_scores = tf.convert_to_tensor(fake_scores)
    return 0.5 * (_mean_per_example(tf.square(real_scores - 1.0)) + _mean_per_example(tf.square(fake_scores)))


def cycle_loss(images, reconstructed):
    """Cycle-consistency L1 loss, per example (the weight lambda is applied by the caller).

    L_b = mean_{i,c} | x_{ic} - F(G(x))_{ic} |

    Args:
        images: float tensor `(batch, height, width, channels)`.
        reconstructed: float tensor of the same shape, F(G(images)).

    Returns:
        float tensor `(batch,)`.
    """
    images = tf.convert_to_tensor(images)
    reconstructed = tf.cast(reconstructed, images.dtype)
    return _mean_per_example(tf.abs(images - reconstructed))


def structure_loss(images, translated, window=7, epsilon=1e-4):
    """Contrast-free structure loss between an image and its translation, per example.

    L_s = mean_p ( 1 - NCC_p(x, G(x))^2 ),  NCC_p = cov_p / sqrt(var_p(x) var_p(G(x)) + epsilon)

    with local means, variances and covariance over ``window x window`` neighbourhoods ``p``. It is zero
    for any translation that is locally an affine intensity map (contrast compressed, expanded or
    inverted, level shifted), so it lets G change appearance freely while edges must stay where they
    are: anatomy is kept without the L1 cycle loss's pull towards the source's contrast.

    Args:
        images: float tensor `(batch, height, width, 1)`.
        translated: float tensor of the same shape.
        window: odd int, side of the neighbourhood.
        epsilon: float, keeps flat neighbourhoods finite.

    Returns:
        float tensor `(batch,)`.
    """
    images = tf.convert_to_tensor(images)
    translated = tf.cast(translated, images.dtype)
    pad = window // 2

    def local_mean(values):
        padded = tf.pad(values, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        return tf.nn.avg_pool2d(padded, window, 1, "VALID")

    mean_x, mean_y = local_mean(images), local_mean(translated)
    var_x = tf.nn.relu(local_mean(images * images) - mean_x * mean_x)
    var_y = tf.nn.relu(local_mean(translated * translated) - mean_y * mean_y)
    cov = local_mean(images * translated) - mean_x * mean_y
    squared_ncc = tf.square(cov) / (var_x * var_y + epsilon)
    return _mean_per_example(1.0 - squared_ncc)


def classwise_kl_loss(teacher_logits, student_logits, labels, num_classes, temperature=2.0, student_labels=None):
    """Class-wise averaged KL distillation of UMMKD (Dou et al., IEEE TMI 2020), a scalar.

    For each class c, the logits of all pixels labelled c are averaged over the whole batch, softened
    with T and compared across the two networks:

        z^t_c = mean_{i : y_i = c} t_i,      z^s_c = mean_{i : y'_i = c} s_i      (vectors over classes)
        q^t_c = softmax(z^t_c / T),          q^s_c = softmax(z^s_c / T)
        L = (1 / |P|) * sum_{c in P} KL( q^t_c || q^s_c )

    where y are `labels` (for the teacher's pixels), y' are `student_labels` (default: `labels`, i.e.
    both networks saw the same images) and P is the set of classes present in both y and y'. Because
    the averaging is over pixels of the whole batch, the loss is a single scalar per replica, not a
    per-example vector, and it needs no pixel correspondence between the two inputs: that is what
    lets UMMKD distil between unpaired CT and MRI batches. No T^2 factor is applied (as in UMMKD).

    As in :func:`distillation_loss`, the caller stop-gradients the teacher's logits. Under a
    distribution strategy the caller divides by `num_replicas_in_sync` before summing replicas.

    Args:
        teacher_logits: float tensor `(batch, height, width, classes)`.
        student_logits: float tensor `(batch', height', width', classes)`.
        labels: integer tensor `(batch, height, width)` for `teacher_logits`.
        num_classes: K, the static number of classes.
        temperature: T > 0.
        student_labels: integer tensor `(batch', height', width')` for `student_logits`, when the two
            networks saw different images.

    Returns:
        float scalar tensor; 0 when no class is present in both label maps.
    """
    teacher_logits = tf.convert_to_tensor(teacher_logits)
    student_logits = tf.cast(student_logits, teacher_logits.dtype)
    temperature = tf.cast(temperature, teacher_logits.dtype)
    if student_labels is None:
        student_labels = labels

    def class_means(logits, class_labels):
        """Per-class mean logit vectors `(K, K)` and per-class pixel counts `(K,)`."""
        flat_logits = tf.reshape(logits, [-1, num_classes])
        one_hot = tf.one_hot(tf.reshape(tf.cast(class_labels, tf.int32), [-1]), num_classes, dtype=logits.dtype)
        counts = tf.reduce_sum(one_hot, axis=0)
        sums = tf.matmul(one_hot, flat_logits, transpose_a=True)  # row c: sum of logits labelled c
        return sums / tf.maximum(counts, 1.0)[:, None], counts

    teacher_means, teacher_counts = class_means(teacher_logits, labels)
    student_means, student_counts = class_means(student_logits, student_labels)
    teacher_log_probs = tf.nn.log_softmax(teacher_means / temperature, axis=-1)
    student_log_probs = tf.nn.log_softmax(student_means / temperature, axis=-1)
    class_kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    present = tf.cast((teacher_counts > 0) & (student_counts > 0), class_kl.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(class_kl * present), tf.reduce_sum(present))
