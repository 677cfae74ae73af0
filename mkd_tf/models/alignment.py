"""The Image Alignment Module: a CycleGAN that makes assistant-modality slices look like the target's.

Two ResNet generators translate between the modalities (``assistant_to_target`` G, used for
alignment; ``target_to_assistant`` F, used for the cycle-consistency loss ``|x - F(G(x))|``) and two
PatchGAN discriminators judge realism in each modality (least-squares GAN: raw scores, no sigmoid).
Losses and the training loop live with the trainer; this file only defines the networks.

Every op converts to TFLite builtins: reflection padding is ``tf.pad(mode="REFLECT")`` → MIRROR_PAD.

References:
    CycleGAN: J.-Y. Zhu, T. Park, P. Isola, A. A. Efros, "Unpaired Image-to-Image Translation using
    Cycle-Consistent Adversarial Networks", ICCV 2017, arXiv:1703.10593 (the ResNet generator).
    PatchGAN: P. Isola, J.-Y. Zhu, T. Zhou, A. A. Efros, "Image-to-Image Translation with Conditional
    Adversarial Networks", CVPR 2017, arXiv:1611.07004 (the discriminator).
    LSGAN: X. Mao, Q. Li, H. Xie, R. Y. K. Lau, Z. Wang, S. P. Smolley, "Least Squares Generative
    Adversarial Networks", ICCV 2017, arXiv:1611.04076 (the adversarial losses, mkd_tf/losses.py).
"""

import keras
import numpy as np
from keras import ops

from mkd_tf import config
from mkd_tf.models.segmentor import normalization

#: a network setting left out takes ``mkd train``'s default (:data:`mkd_tf.config.DEFAULTS`, ``alignment``)
_DEFAULTS = config.DEFAULTS["alignment"]


@keras.saving.register_keras_serializable(package="mkd_tf")
class ReflectionPadding2D(keras.layers.Layer):
    """Pad height and width by mirroring the border (the edge pixel itself is not repeated).

    Used before the generators' unstrided convolutions instead of zero padding, which makes the
    network see a dark frame and draw artefacts along image borders.

    Args:
        padding: int, rows/columns added on each side. Must be smaller than height and width.

    Returns:
        A tensor `(batch, height + 2 * padding, width + 2 * padding, channels)`.

    Example:
    >>> pad = ReflectionPadding2D(1)
    >>> row = keras.ops.reshape(keras.ops.arange(4.0), (1, 1, 4, 1))  # a 1x4 image: 0 1 2 3
    >>> tuple(pad(keras.ops.tile(row, (1, 2, 1, 1))).shape)  # its middle row reads 1 0 1 2 3 2
    (1, 4, 6, 1)
    """

    def __init__(self, padding, **kwargs):
        super().__init__(**kwargs)
        self.padding = padding

    def call(self, inputs):
        p = self.padding
        return ops.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]], mode="reflect")

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        grow = 2 * self.padding
        return (
            batch,
            None if height is None else height + grow,
            None if width is None else width + grow,
            channels,
        )

    def get_config(self):
        config = super().get_config()
        config.update({"padding": self.padding})
        return config


@keras.saving.register_keras_serializable(package="mkd_tf")
class ResnetBlock(keras.layers.Layer):
    """Residual block: ``x + norm(conv3(relu(norm(conv3(x)))))`` with reflection padding.

    Args:
        filters: int, channels of the input and output.
        norm: "instance", "batch" or "none".

    Returns:
        A tensor with the input's shape `(batch, height, width, filters)`.

    Example:
    >>> block = ResnetBlock(8, "instance")
    >>> tuple(block(keras.ops.zeros((2, 8, 8, 8))).shape)
    (2, 8, 8, 8)
    """

    def __init__(self, filters, norm, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.norm = norm
        use_bias = norm == "none"
        self.pads = [ReflectionPadding2D(1, name=f"pad{i}") for i in (1, 2)]
        self.convs = [
            keras.layers.Conv2D(filters, 3, padding="valid", use_bias=use_bias, name=f"conv{i}") for i in (1, 2)
        ]
        self.norms = [normalization(norm, name=f"norm{i}") for i in (1, 2)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for pad, conv, norm in zip(self.pads, self.convs, self.norms):
            padded = pad.compute_output_shape(shape)
            conv.build(padded)
            if norm is not None:
                norm.build(shape)
        self.built = True

    def call(self, inputs, training=False):
        x = inputs
        for index, (pad, conv, norm) in enumerate(zip(self.pads, self.convs, self.norms)):
            x = conv(pad(x))
            if norm is not None:
                x = norm(x, training=training)
            if index == 0:
                x = ops.relu(x)
        return inputs + x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "norm": self.norm})
        return config


def _conv_norm_relu(layers, x, training):
    """Apply ``(conv, norm-or-None)`` then ReLU."""
    conv, norm_layer = layers
    x = conv(x)
    if norm_layer is not None:
        x = norm_layer(x, training=training)
    return ops.relu(x)


@keras.saving.register_keras_serializable(package="mkd_tf")
class ResnetGenerator(keras.Model):
    """CycleGAN's ResNet image-to-image generator for one-channel slices.

    Layers (k = ``base_filters``): c7s1-k, d2k, d4k (``3x3`` stride-2 convolutions), ``num_blocks``
    x R4k (:class:`ResnetBlock`), u2k, uk (``3x3`` stride-2 transposed convolutions), c7s1-1.
    Every hidden convolution is followed by normalisation and ReLU; ``7x7`` convolutions use
    reflection padding.

    The output layer is **linear** (no tanh): slices are z-scored / HU-scaled, roughly zero mean and
    unit variance but unbounded (bone and contrast sit several standard deviations out), so tanh
    would need an arbitrary scale and would saturate, killing gradients, exactly on those tails.

    With ``residual=True`` the network predicts a correction added to its input,
    ``G(x) = x + r(x)``, and the last convolution of ``r`` starts at zero: an untrained generator is
    exactly the identity, so aligned images keep the anatomy from the first step and the GAN only
    has to learn the change of appearance. Measured on the phantom benchmark (issue 9), this is the
    largest single gain of MKD over the plain generator, which starts by emitting noise.

    Args:
        base_filters: int, channels of the first layer (``k`` above).
        num_blocks: int >= 0, residual blocks at quarter resolution (6 for 128-256 px slices in
            the paper's CycleGAN, 9 for larger).
        norm: "instance" (``GroupNormalization(groups=-1)``), "batch" or "none".
        residual: bool, ``G(x) = x + r(x)`` with ``r``'s last convolution zero-initialised
            (starts as the identity); false: the plain CycleGAN generator.
        skip_kernel: odd int >= 1, with ``residual``: the identity path becomes a learnable
            ``skip_kernel x skip_kernel`` convolution (reflection padding, with bias) initialised to the
            identity (a centred delta kernel), ``G(x) = s(x) + r(x)``. ``r`` sees the image only at
            quarter resolution, so it cannot cancel pixel-level noise that the identity path passes on; a
            learnable skip can low-pass and re-scale the input at full resolution. 1: the plain identity.

    Call arguments:
        images: float32 tensor `(batch, height, width, 1)`, height and width divisible by 4 and >= 8.
        training: bool, batch statistics on when true (matters only for ``norm="batch"``).

    Returns:
        Translated images, float tensor `(batch, height, width, 1)`.

    Example:
    >>> generator = ResnetGenerator(base_filters=4, num_blocks=1)
    >>> tuple(generator(keras.ops.zeros((2, 32, 32, 1))).shape)
    (2, 32, 32, 1)
    """

    #: the last layer, kept in float32 under a mixed-precision policy (training.float32_outputs)
    output_layer_name = "head"

    def __init__(
        self,
        base_filters=_DEFAULTS["base_filters"],
        num_blocks=_DEFAULTS["num_blocks"],
        norm=_DEFAULTS["norm"],
        residual=_DEFAULTS["residual"],
        skip_kernel=_DEFAULTS["skip_kernel"],
        **kwargs,
    ):
        super().__init__(**kwargs)
        if base_filters < 1:
            raise ValueError(f"base_filters must be >= 1, got {base_filters}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if skip_kernel < 1 or skip_kernel % 2 == 0:
            raise ValueError(f"skip_kernel must be an odd number >= 1, got {skip_kernel}")
        self.skip_kernel = int(skip_kernel)
        self.base_filters = base_filters
        self.num_blocks = num_blocks
        self.norm = norm
        self.residual = bool(residual)
        use_bias = norm == "none"
        k = base_filters

        self.stem_pad = ReflectionPadding2D(3, name="stem_pad")
        self.stem = (
            keras.layers.Conv2D(k, 7, padding="valid", use_bias=use_bias, name="stem_conv"),
            normalization(norm, name="stem_norm"),
        )
        self.downsamplers = [
            (
                keras.layers.Conv2D(k * 2**i, 3, strides=2, padding="same", use_bias=use_bias, name=f"down{i}_conv"),
                normalization(norm, name=f"down{i}_norm"),
            )
            for i in (1, 2)
        ]
        self.blocks = [ResnetBlock(4 * k, norm, name=f"block{i}") for i in range(num_blocks)]
        self.upsamplers = [
            (
                keras.layers.Conv2DTranspose(
                    k * 2**i, 3, strides=2, padding="same", use_bias=use_bias, name=f"up{i}_conv"
                ),
                normalization(norm, name=f"up{i}_norm"),
            )
            for i in (1, 0)
        ]
        self.head_pad = ReflectionPadding2D(3, name="head_pad")
        # Residual: a zero last layer makes r(x) = 0, so G starts as the identity.
        head_init = "zeros" if self.residual else "glorot_uniform"
        self.head = keras.layers.Conv2D(1, 7, padding="valid", kernel_initializer=head_init, name="head_conv")
        self.skip = None
        if self.residual and self.skip_kernel > 1:
            identity = np.zeros((self.skip_kernel, self.skip_kernel, 1, 1), np.float32)
            identity[self.skip_kernel // 2, self.skip_kernel // 2] = 1.0
            self.skip_pad = ReflectionPadding2D(self.skip_kernel // 2, name="skip_pad")
            self.skip = keras.layers.Conv2D(
                1,
                self.skip_kernel,
                padding="valid",
                kernel_initializer=keras.initializers.Constant(identity),
                name="skip_conv",
            )

    def check_input_shape(self, shape):
        """Raise ``ValueError`` unless ``shape`` is `(batch, height, width, 1)` with height and width
        divisible by 4 and at least 8 (the reflection pads need that much image to mirror)."""
        shape = tuple(shape)
        if len(shape) != 4 or (shape[-1] is not None and shape[-1] != 1):
            raise ValueError(f"ResnetGenerator expects (batch, height, width, 1), got {shape}")
        for axis, size in zip(("height", "width"), shape[1:3]):
            if size is not None and (size % 4 or size < 8):
                raise ValueError(
                    f"ResnetGenerator needs {axis} divisible by 4 and >= 8, got {size} (input shape {shape})"
                )

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        # A symbolic run creates every sublayer's weights now, outside any tf.function.
        self._run(keras.KerasTensor(tuple(input_shape)), training=False)
        self.built = True

    def call(self, images, training=False):
        self.check_input_shape(images.shape)
        return self._run(images, training=training)

    def _run(self, images, training):
        x = _conv_norm_relu(self.stem, self.stem_pad(images), training)
        for layers in self.downsamplers:
            x = _conv_norm_relu(layers, x, training)
        for block in self.blocks:
            x = block(x, training=training)
        for layers in self.upsamplers:
            x = _conv_norm_relu(layers, x, training)
        correction = self.head(self.head_pad(x))
        if not self.residual:
            return correction
        return (images if self.skip is None else self.skip(self.skip_pad(images))) + correction

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "base_filters": self.base_filters,
                "num_blocks": self.num_blocks,
                "norm": self.norm,
                "residual": self.residual,
                "skip_kernel": self.skip_kernel,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="mkd_tf")
class PatchDiscriminator(keras.Model):
    """PatchGAN discriminator (the 70x70 one for ``num_layers=3``) with raw least-squares scores.

    Layers (k = ``base_filters``): ``num_layers`` ``4x4`` stride-2 convolutions with
    ``k * min(2**i, 8)`` channels, then one ``4x4`` stride-1 convolution with
    ``k * min(2**num_layers, 8)`` channels, then a ``4x4`` stride-1 convolution to one score map;
    each ``4x4`` convolution has one pixel of zero padding, as in pix2pix. LeakyReLU(0.2) after every
    hidden layer; normalisation after every hidden layer except the first. No sigmoid: the
    least-squares GAN loss compares scores with 1 (real) and 0 (fake) directly.

    Args:
        base_filters: int, channels of the first layer (64 in pix2pix / CycleGAN).
        num_layers: int >= 1, number of stride-2 layers; each output score sees a
            ``70x70`` patch for 3, ``34x34`` for 2, ``16x16`` for 1.
        norm: "instance" (``GroupNormalization(groups=-1)``), "batch" or "none".

    Call arguments:
        images: float32 tensor `(batch, height, width, 1)`; ``height // 2**num_layers`` must be >= 3.
        training: bool, batch statistics on when true (matters only for ``norm="batch"``).

    Returns:
        Realism scores, float tensor `(batch, height // 2**num_layers - 2, width // 2**num_layers - 2, 1)`
        for even sizes, e.g. `(batch, 2, 2, 1)` for 32x32 input and ``num_layers=3``.

    Example:
    >>> discriminator = PatchDiscriminator(base_filters=4, num_layers=3)
    >>> tuple(discriminator(keras.ops.zeros((2, 32, 32, 1))).shape)
    (2, 2, 2, 1)
    """

    #: the last layer, kept in float32 under a mixed-precision policy (training.float32_outputs)
    output_layer_name = "score"

    def __init__(
        self,
        base_filters=_DEFAULTS["disc_filters"],
        num_layers=_DEFAULTS["disc_layers"],
        norm=_DEFAULTS["norm"],
        **kwargs,
    ):
        super().__init__(**kwargs)
        if base_filters < 1:
            raise ValueError(f"base_filters must be >= 1, got {base_filters}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.base_filters = base_filters
        self.num_layers = num_layers
        self.norm = norm
        use_bias = norm == "none"

        # (filters, stride, normalised) per hidden layer.
        plan = [(base_filters, 2, False)]
        plan += [(base_filters * min(2**i, 8), 2, True) for i in range(1, num_layers)]
        plan += [(base_filters * min(2**num_layers, 8), 1, True)]
        self.pads = []
        self.convs = []
        self.norms = []
        self.activations = []
        for index, (filters, stride, normalised) in enumerate(plan):
            self.pads.append(keras.layers.ZeroPadding2D(1, name=f"pad{index}"))
            self.convs.append(
                keras.layers.Conv2D(
                    filters,
                    4,
                    strides=stride,
                    padding="valid",
                    use_bias=use_bias or not normalised,
                    name=f"conv{index}",
                )
            )
            self.norms.append(normalization(norm, name=f"norm{index}") if normalised else None)
            self.activations.append(keras.layers.LeakyReLU(negative_slope=0.2, name=f"lrelu{index}"))
        self.score_pad = keras.layers.ZeroPadding2D(1, name="score_pad")
        self.score = keras.layers.Conv2D(1, 4, padding="valid", name="score")

    def output_size(self, size):
        """Score-map side length for an input side ``size`` (``None`` stays ``None``)."""
        if size is None:
            return None
        for _ in range(self.num_layers):
            size = (size + 2 - 4) // 2 + 1
        return size - 2  # two stride-1 4x4 convolutions with 1 pixel padding each lose one

    def check_input_shape(self, shape):
        """Raise ``ValueError`` unless ``shape`` is `(batch, height, width, 1)` large enough for at
        least one score per axis."""
        shape = tuple(shape)
        if len(shape) != 4 or (shape[-1] is not None and shape[-1] != 1):
            raise ValueError(f"PatchDiscriminator expects (batch, height, width, 1), got {shape}")
        for axis, size in zip(("height", "width"), shape[1:3]):
            if size is not None and self.output_size(size) < 1:
                raise ValueError(
                    f"PatchDiscriminator with {self.num_layers} layers needs a larger {axis} "
                    f"than {size} (input shape {shape})"
                )

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        self._run(keras.KerasTensor(tuple(input_shape)), training=False)
        self.built = True

    def call(self, images, training=False):
        self.check_input_shape(images.shape)
        return self._run(images, training=training)

    def _run(self, images, training):
        x = images
        for pad, conv, norm, activation in zip(self.pads, self.convs, self.norms, self.activations):
            x = conv(pad(x))
            if norm is not None:
                x = norm(x, training=training)
            x = activation(x)
        return self.score(self.score_pad(x))

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        return (batch, self.output_size(height), self.output_size(width), 1)

    def get_config(self):
        config = super().get_config()
        config.update({"base_filters": self.base_filters, "num_layers": self.num_layers, "norm": self.norm})
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="mkd_tf")
class ImageAlignmentModule(keras.Model):
    """CycleGAN pair of generators and discriminators aligning the assistant modality to the target.

    Owns:
        ``assistant_to_target`` (G): :class:`ResnetGenerator`, assistant → target appearance.
        ``target_to_assistant`` (F): :class:`ResnetGenerator`, target → assistant appearance.
        ``target_discriminator`` (D_T): :class:`PatchDiscriminator`, real target vs ``G(assistant)``.
        ``assistant_discriminator`` (D_A): :class:`PatchDiscriminator`, real assistant vs ``F(target)``.

    Calling the module (or :meth:`align`) runs G only; building it builds all four networks for
    the given slice shape (assistant and target slices share it), so every variable exists before
    a ``tf.function`` or distribution strategy traces the training step. Train the two groups
    with separate optimizers over :attr:`generator_variables` and :attr:`discriminator_variables`.

    Args:
        base_filters: int, first-layer channels of both generators.
        num_blocks: int, residual blocks in both generators.
        disc_filters: int, first-layer channels of both discriminators.
        disc_layers: int, stride-2 layers of both discriminators (3 = 70x70 PatchGAN).
        norm: "instance", "batch" or "none", for all four networks.
        residual: bool, identity-initialised residual generators (see :class:`ResnetGenerator`).
        skip_kernel: odd int, the generators' learnable identity-initialised skip (1: plain identity).

    Call arguments:
        assistant_images: float32 tensor `(batch, height, width, 1)`.
        training: bool.

    Returns:
        Aligned images ``G(assistant_images)``, float tensor `(batch, height, width, 1)`.

    Example:
    >>> module = ImageAlignmentModule(base_filters=4, num_blocks=1, disc_filters=4)
    >>> module.build((None, 32, 32, 1))
    >>> tuple(module.align(keras.ops.zeros((2, 32, 32, 1))).shape)
    (2, 32, 32, 1)
    >>> tuple(module.target_discriminator(keras.ops.zeros((2, 32, 32, 1))).shape)
    (2, 2, 2, 1)
    """

    def __init__(
        self,
        base_filters=_DEFAULTS["base_filters"],
        num_blocks=_DEFAULTS["num_blocks"],
        disc_filters=_DEFAULTS["disc_filters"],
        disc_layers=_DEFAULTS["disc_layers"],
        norm=_DEFAULTS["norm"],
        residual=_DEFAULTS["residual"],
        skip_kernel=_DEFAULTS["skip_kernel"],
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.residual = bool(residual)
        self.skip_kernel = int(skip_kernel)
        self.base_filters = base_filters
        self.num_blocks = num_blocks
        self.disc_filters = disc_filters
        self.disc_layers = disc_layers
        self.norm = norm
        self.assistant_to_target = ResnetGenerator(
            base_filters, num_blocks, norm, residual, skip_kernel, name="assistant_to_target"
        )
        self.target_to_assistant = ResnetGenerator(
            base_filters, num_blocks, norm, residual, skip_kernel, name="target_to_assistant"
        )
        self.target_discriminator = PatchDiscriminator(disc_filters, disc_layers, norm, name="target_discriminator")
        self.assistant_discriminator = PatchDiscriminator(
            disc_filters, disc_layers, norm, name="assistant_discriminator"
        )

    @property
    def generators(self):
        return [self.assistant_to_target, self.target_to_assistant]

    @property
    def discriminators(self):
        return [self.target_discriminator, self.assistant_discriminator]

    @property
    def generator_variables(self):
        """Trainable variables of G and F (for the generator optimizer)."""
        return [v for model in self.generators for v in model.trainable_variables]

    @property
    def discriminator_variables(self):
        """Trainable variables of D_T and D_A (for the discriminator optimizer)."""
        return [v for model in self.discriminators for v in model.trainable_variables]

    def build(self, input_shape):
        for model in self.generators + self.discriminators:
            model.build(input_shape)
        self.built = True

    def call(self, assistant_images, training=False):
        return self.assistant_to_target(assistant_images, training=training)

    def align(self, assistant_images, training=False):
        """``G(assistant_images)``: assistant slices in target appearance, `(batch, height, width, 1)`."""
        return self(assistant_images, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "base_filters": self.base_filters,
                "num_blocks": self.num_blocks,
                "disc_filters": self.disc_filters,
                "disc_layers": self.disc_layers,
                "norm": self.norm,
                "residual": self.residual,
                "skip_kernel": self.skip_kernel,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
