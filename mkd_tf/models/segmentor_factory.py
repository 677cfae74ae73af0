"""Segmentor factory: the network of a ``segmentor`` settings dict, whatever its registered kind.

Every method makes its segmentors here, so a new architecture is one new module plus one
:func:`mkd_tf.registry.register_segmentor` call (the pattern of tensorflow/models'
``official/vision/modeling/backbones/factory.py``).
"""

from mkd_tf import registry

#: settings that are not the architecture's constructor arguments (the method reads the ``domain_norm`` ones)
_NOT_ARCHITECTURE = ("kind", "domain_norm", "syn_domain_norm")


def build_segmentor(num_classes, settings=None, name="segmentor", num_domains=1, default_domain=0):
    """A segmentor (a Keras model returning logits) of the kind ``settings["kind"]`` (default ``"unet"``).

    Args:
        num_classes: int, output classes including background.
        settings: dict of the ``segmentor`` config section: ``kind``, ``norm``, ``domain_norm`` and the
            kind's own settings (missing ones take the kind's defaults).
        name: the Keras name of the model.
        num_domains, default_domain: batch-norm sets and the one used at inference (see
            :class:`mkd_tf.models.segmentor.Segmentor`).

    Returns:
        The model; called on `(batch, height, width, 1)` it returns logits `(batch, height, width, classes)`.

    Example:
        >>> import keras
        >>> segmentor = build_segmentor(5, {"kind": "unet", "base_filters": 4, "depth": 2}, name="s")
        >>> type(segmentor).__name__, tuple(segmentor(keras.ops.zeros((1, 32, 32, 1))).shape)
        ('Segmentor', (1, 32, 32, 5))
    """
    settings = dict(settings or {})
    kind = settings.get("kind", "unet")
    if kind not in registry.SEGMENTORS:
        raise ValueError(f"unknown segmentor kind {kind!r} (registered: {', '.join(registry.SEGMENTORS)})")
    registered = registry.SEGMENTORS[kind]
    arguments = {**registered.defaults, **{k: v for k, v in settings.items() if k not in _NOT_ARCHITECTURE}}
    return registry.load(registered.model)(
        num_classes, name=name, num_domains=num_domains, default_domain=default_domain, **arguments
    )
