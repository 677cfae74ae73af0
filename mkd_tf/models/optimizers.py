"""The optimizers every method trains with, made from the ``optimizer`` settings (:mod:`mkd_tf.config`).

The segmentors learn with Adam at ``segmentor_lr`` (or a schedule of it) and, with ``ema``, keep an
exponential moving average of their weights (Keras ``use_ema``: evaluation, the best checkpoint and export
use it); the IAM's generators and discriminators learn with Adam at their own rates and ``gan_beta_1``
(CycleGAN's 2e-4 and 0.5; Zhu et al., ICCV 2017).
"""

import keras

from mkd_tf import config

#: the optimizer roles of the methods: one for the segmentors, two for the IAM (mkd)
ROLES = ("segmentors", "generators", "discriminators")


def make_optimizer(
    settings: dict,
    role: str,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule | None = None,
    loss_scale: bool = False,
) -> keras.optimizers.Optimizer:
    """Adam for one of :data:`ROLES`.

    Args:
        settings: the ``optimizer`` settings section.
        role: ``"segmentors"``, ``"generators"`` or ``"discriminators"``.
        learning_rate: the segmentors' rate or schedule (``None``: ``segmentor_lr``); the IAM's roles take
            ``generator_lr`` / ``discriminator_lr``.
        loss_scale: wrap it in a ``LossScaleOptimizer`` (``mixed_float16``: float16 gradients would underflow).

    Returns:
        A Keras optimizer, not yet built.

    Example:
        >>> make_optimizer(config.DEFAULTS["optimizer"], "generators").beta_1
        0.5
    """
    if role == "segmentors":
        optimizer = keras.optimizers.Adam(
            settings["segmentor_lr"] if learning_rate is None else learning_rate,
            use_ema=bool(settings["ema"]),
            ema_momentum=float(settings["ema_momentum"]),
        )
    elif role in ROLES:
        optimizer = keras.optimizers.Adam(settings[f"{role[:-1]}_lr"], beta_1=settings["gan_beta_1"])
    else:
        raise ValueError(f"unknown optimizer role {role!r} (one of {', '.join(ROLES)})")
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scale else optimizer


def default_optimizer(role: str) -> keras.optimizers.Optimizer:
    """The optimizer ``mkd train`` gives ``role`` by default (constant rate, no loss scaling)."""
    return make_optimizer(config.DEFAULTS["optimizer"], role)
