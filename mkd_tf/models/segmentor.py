"""A 2-D U-Net that maps one-channel slices to per-pixel class logits.

The model returns **logits**: the mutual-distillation losses soften both segmentors' predictions with a
temperature (``softmax(logits / T)``), which needs the values before softmax. Callers that want
probabilities apply softmax themselves or use :meth:`Segmentor.predict_probabilities`.

With ``num_domains > 1`` (UMMKD, :mod:`mkd_tf.models.ummkd`) the convolutions are shared by all
domains (modalities) while every batch-normalisation position holds one layer per domain, so each
modality keeps its own statistics and affine parameters; ``call(..., domain=d)`` picks the set.
"""

import keras
import tensorflow as tf
from keras import ops

from mkd_tf import config, registry

#: a setting left out takes ``mkd train``'s default (the ``unet`` registration, :mod:`mkd_tf.registry`)
_UNET = registry.SEGMENTORS["unet"].defaults

NORMS = ("batch", "instance", "none")


def check_domains(num_domains, norm):
    """Raise ``ValueError`` unless ``num_domains`` is an int >= 1 usable with ``norm``."""
    if not isinstance(num_domains, int) or num_domains < 1:
        raise ValueError(f"num_domains must be an int >= 1, got {num_domains!r}")
    if num_domains > 1 and norm != "batch":
        # Domain-specific normalisation is about per-domain batch statistics; instance norm has
        # none and "none" has no layer, so a second domain would silently change nothing.
        raise ValueError(f"num_domains > 1 needs norm='batch', got norm={norm!r}")


def normalization(norm, name):
    """The normalisation layer called ``norm`` ("batch", "instance" or "none"), or ``None`` for "none".

    Instance norm is ``GroupNormalization(groups=-1)`` (one group per channel): tensorflow-addons'
    ``InstanceNormalization`` is end-of-life and does not load on Keras 3.
    """
    if norm == "batch":
        return keras.layers.BatchNormalization(name=name)
    if norm == "instance":
        return keras.layers.GroupNormalization(groups=-1, name=name)
    if norm == "none":
        return None
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


@keras.saving.register_keras_serializable(package="mkd_tf")
class ConvBlock(keras.layers.Layer):
    """Two ``3x3`` convolutions, each followed by normalisation and ReLU (the U-Net's unit).

    Args:
        filters: int, output channels of both convolutions.
        norm: "batch", "instance" or "none".
        num_domains: int, number of batch-norm layers at each normalisation position (one per
            domain, convolutions shared); > 1 needs ``norm="batch"``.

    Call arguments:
        inputs: tensor `(batch, height, width, channels)`.
        training: bool, batch statistics on when true.
        domain: Python int in ``[0, num_domains)``, whose normalisation layers are used.

    Returns:
        A tensor `(batch, height, width, filters)` from an input `(batch, height, width, channels)`.

    Example:
    >>> block = ConvBlock(8, norm="instance")
    >>> tuple(block(keras.ops.zeros((2, 16, 16, 3))).shape)
    (2, 16, 16, 8)
    """

    def __init__(self, filters, norm, num_domains=1, **kwargs):
        super().__init__(**kwargs)
        check_domains(num_domains, norm)
        self.filters = filters
        self.norm = norm
        self.num_domains = num_domains
        # A bias before a normalisation layer is cancelled by its mean subtraction.
        use_bias = norm == "none"
        self.convs = [
            keras.layers.Conv2D(filters, 3, padding="same", use_bias=use_bias, name=f"conv{i}") for i in (1, 2)
        ]
        # Flat list, position-major: norms[position * num_domains + domain]. With one domain it is
        # [norm1, norm2] under the same names as before, so existing checkpoints still load.
        if num_domains == 1:
            self.norms = [normalization(norm, name=f"norm{i}") for i in (1, 2)]
        else:
            self.norms = [
                normalization(norm, name=f"norm{i}_domain{domain}") for i in (1, 2) for domain in range(num_domains)
            ]

    def norms_of(self, domain):
        """The normalisation layers (or ``None``) of ``domain``, one per convolution."""
        return self.norms[domain :: self.num_domains]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for position, conv in enumerate(self.convs):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            for norm in self.norms[position * self.num_domains : (position + 1) * self.num_domains]:
                if norm is not None:
                    norm.build(shape)
        self.built = True

    def call(self, inputs, training=False, domain=0):
        x = inputs
        for conv, norm in zip(self.convs, self.norms_of(domain)):
            x = conv(x)
            if norm is not None:
                x = norm(x, training=training)
            x = ops.relu(x)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "norm": self.norm, "num_domains": self.num_domains})
        return config


@keras.saving.register_keras_serializable(package="mkd_tf")
class Segmentor(keras.Model):
    """2-D U-Net segmentor returning per-pixel class logits.

    ``depth`` times: a :class:`ConvBlock` then ``2x2`` max pooling (channels double each level, from
    ``base_filters``); a bottleneck block; then ``depth`` times: a ``2x2`` stride-2 transposed
    convolution, concatenation with the encoder's block at that scale, and a :class:`ConvBlock`;
    finally a ``1x1`` convolution to ``num_classes``. Every op is a TFLite builtin (CONV_2D,
    MAX_POOL_2D, TRANSPOSE_CONV, CONCATENATION, and for instance norm MEAN / SQUARED_DIFFERENCE /
    RSQRT arithmetic).

    The output is **logits**, not probabilities: the distillation losses divide logits by a
    temperature before softmax. Use :meth:`predict_probabilities` or apply softmax on the last axis.

    Args:
        num_classes: int, number of output classes including background.
        base_filters: int, channels of the first level; level ``i`` has ``base_filters * 2**i``.
        depth: int >= 1, number of downsamplings. Height and width must be divisible by ``2**depth``.
        norm: "batch", "instance" (``GroupNormalization(groups=-1)``) or "none".
        dropout: float in ``[0, 1)``, dropout rate applied to the bottleneck features during training.
        num_domains: int >= 1, domains (modalities) sharing the convolutions, each with its own
            batch-norm layers (UMMKD); > 1 needs ``norm="batch"``.
        default_domain: int in ``[0, num_domains)``, the domain used when ``call`` is not given one,
            e.g. by an exported model that calls ``segmentor(images, training=False)``.

    Call arguments:
        images: float32 tensor `(batch, height, width, 1)`.
        training: bool, batch statistics and dropout on when true.
        domain: optional Python int in ``[0, num_domains)`` selecting the batch-norm layers at
            trace time (default: ``default_domain``).

    Returns:
        Logits, float tensor `(batch, height, width, num_classes)`.

    Example:
    >>> model = Segmentor(num_classes=5, base_filters=4, depth=2)
    >>> logits = model(keras.ops.zeros((2, 32, 32, 1)))
    >>> tuple(logits.shape)
    (2, 32, 32, 5)
    >>> tuple(model.predict_probabilities(keras.ops.zeros((2, 32, 32, 1))).shape)
    (2, 32, 32, 5)
    >>> shared = Segmentor(5, base_filters=4, depth=2, num_domains=2, default_domain=1)
    >>> tuple(shared(keras.ops.zeros((2, 32, 32, 1)), domain=0).shape)
    (2, 32, 32, 5)
    """

    #: the last layer, kept in float32 under a mixed-precision policy (training.float32_outputs)
    output_layer_name = "classifier"

    def __init__(
        self,
        num_classes,
        base_filters=_UNET["base_filters"],
        depth=_UNET["depth"],
        norm=config.DEFAULTS["segmentor"]["norm"],
        dropout=_UNET["dropout"],
        num_domains=1,
        default_domain=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if base_filters < 1:
            raise ValueError(f"base_filters must be >= 1, got {base_filters}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_domains(num_domains, norm)
        if not isinstance(default_domain, int) or not 0 <= default_domain < num_domains:
            raise ValueError(f"default_domain must be an int in [0, {num_domains}), got {default_domain!r}")
        self.num_classes = num_classes
        self.base_filters = base_filters
        self.depth = depth
        self.norm = norm
        self.dropout = dropout
        self.num_domains = num_domains
        self.default_domain = default_domain

        self.encoder_blocks = [
            ConvBlock(base_filters * 2**level, norm, num_domains, name=f"encoder{level}") for level in range(depth)
        ]
        self.pools = [keras.layers.MaxPooling2D(2, name=f"pool{level}") for level in range(depth)]
        self.bottleneck = ConvBlock(base_filters * 2**depth, norm, num_domains, name="bottleneck")
        self.bottleneck_dropout = keras.layers.Dropout(dropout, name="bottleneck_dropout")
        # Decoder lists run from the deepest level up, in the order they are applied.
        levels_up = range(depth - 1, -1, -1)
        self.upsamplers = [
            keras.layers.Conv2DTranspose(base_filters * 2**level, 2, strides=2, padding="same", name=f"up{level}")
            for level in levels_up
        ]
        self.concats = [keras.layers.Concatenate(name=f"skip{level}") for level in levels_up]
        self.decoder_blocks = [
            ConvBlock(base_filters * 2**level, norm, num_domains, name=f"decoder{level}") for level in levels_up
        ]
        self.classifier = keras.layers.Conv2D(num_classes, 1, name="logits")

    def check_input_shape(self, shape):
        """Raise ``ValueError`` unless ``shape`` is `(batch, height, width, 1)` with height and width
        divisible by ``2**depth`` (unknown sizes are accepted: they are checked when known)."""
        shape = tuple(shape)
        if len(shape) != 4 or (shape[-1] is not None and shape[-1] != 1):
            raise ValueError(f"Segmentor expects images (batch, height, width, 1), got shape {shape}")
        multiple = 2**self.depth
        for axis, size in zip(("height", "width"), shape[1:3]):
            if size is not None and size % multiple:
                raise ValueError(
                    f"Segmentor with depth {self.depth} needs {axis} divisible by {multiple}, "
                    f"got {size} (input shape {shape})"
                )

    def build(self, input_shape):
        self.check_input_shape(input_shape)
        # Build by running on a symbolic input so every sublayer creates its weights now, before
        # any tf.function / distribution-strategy tracing, and summary() works. Each ConvBlock's
        # build creates the batch-norm layers of every domain.
        shape = tuple(input_shape)
        self._run(keras.KerasTensor(shape), training=False, domain=self.default_domain)
        self.built = True

    def resolve_domain(self, domain):
        """``domain`` as a Python int in ``[0, num_domains)``; ``None`` means ``default_domain``.

        The domain picks layers while the graph is traced, so it must be known then: a Python
        or NumPy int, or a tensor with a constant value (Keras turns NumPy scalars into tensors).
        """
        if domain is None:
            return self.default_domain
        if tf.is_tensor(domain):
            value = tf.get_static_value(domain)
            if value is None:
                raise TypeError("Segmentor domain must be known at trace time (a Python int), got a tensor")
            domain = value
        domain = int(domain)
        if not 0 <= domain < self.num_domains:
            raise ValueError(f"domain must be in [0, {self.num_domains}), got {domain}")
        return domain

    def domain_variable_pairs(self, source, destination):
        """``[(variable of domain source, same variable of domain destination)]`` over every
        batch-norm layer (gamma, beta, moving mean and variance), e.g. to start a domain from another."""
        pairs = []
        for block in self.encoder_blocks + [self.bottleneck] + self.decoder_blocks:
            for from_norm, to_norm in zip(block.norms_of(source), block.norms_of(destination)):
                if from_norm is not None:
                    pairs += list(zip(from_norm.variables, to_norm.variables))
        return pairs

    def call(self, images, training=False, domain=None):
        self.check_input_shape(images.shape)
        return self._run(images, training=training, domain=self.resolve_domain(domain))

    def _run(self, images, training, domain):
        x = images
        skips = []
        for block, pool in zip(self.encoder_blocks, self.pools):
            x = block(x, training=training, domain=domain)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x, training=training, domain=domain)
        x = self.bottleneck_dropout(x, training=training)
        for upsample, concat, block, skip in zip(self.upsamplers, self.concats, self.decoder_blocks, reversed(skips)):
            x = upsample(x)
            x = concat([x, skip])
            x = block(x, training=training, domain=domain)
        return self.classifier(x)

    def predict_probabilities(self, images, domain=None):
        """Softmax of the inference-mode logits: `(batch, height, width, num_classes)`, summing to 1."""
        return ops.softmax(self(images, training=False, domain=domain), axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "base_filters": self.base_filters,
                "depth": self.depth,
                "norm": self.norm,
                "dropout": self.dropout,
                "num_domains": self.num_domains,
                "default_domain": self.default_domain,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
