"""An exponential moving average of weights that the model keeps itself (not hidden inside a Keras optimizer).

Keras' ``Optimizer(use_ema=True)`` keeps such an average in a private list: which average belongs to which
weight (to swap them in for validation, copy them at MKD's end of warm start, distil from them) is not public
API. :class:`~mkd_tf.models.cross_modality.CrossModalityModel` keeps one of these instead (the same update,
the same variable names), so the averages are public state.
"""

import keras
import tensorflow as tf


def average_name(weight: keras.Variable) -> str:
    """The name of ``weight``'s average: Keras' own (``<weight path with _>_average``), so checkpoints
    written when the optimizer kept the averages restore into these variables.

    Args:
        weight: a model variable.

    Returns:
        The average's name, unique among one optimizer's variables.
    """
    return f"{weight.path.replace('/', '_')}_average"


class ExponentialMovingAverage:
    """One non-trainable shadow variable per weight, moved after each optimizer step by
    ``average <- momentum * average + (1 - momentum) * weight``; the first step copies the weights.

    This is Keras' ``use_ema`` update, operation for operation (tests/models/test_moving_average.py
    compares the two). Create it inside the strategy scope, like the optimizer: under a distribution strategy
    each replica updates its own copy from its own (identical) weights, as Keras does.

    Args:
        weights: the variables to average (one optimizer's).
        momentum: in [0, 1]; larger averages over more steps.
    """

    def __init__(self, weights, momentum: float):
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.weights = list(weights)
        self.averages = [
            keras.Variable(
                initializer="zeros", shape=weight.shape, dtype=weight.dtype, trainable=False, name=average_name(weight)
            )
            for weight in self.weights
        ]

    def pairs(self) -> list[tuple[keras.Variable, keras.Variable]]:
        """``[(weight, its average)]``."""
        return list(zip(self.weights, self.averages))

    def named(self) -> dict[str, keras.Variable]:
        """``{average_name(weight): average}`` (the checkpoint keys)."""
        return {average_name(weight): average for weight, average in self.pairs()}

    def update(self, first, stepped=None) -> None:
        """Move every average towards its weight (call after the optimizer step).

        Args:
            first: scalar bool tensor, the step was the optimizer's first (the average becomes the weight).
            stepped: scalar bool tensor, the optimizer did step (a ``LossScaleOptimizer`` skips a step
                whose gradients overflowed, and so does Keras' average); None means it did.
        """
        for weight, average in self.pairs():
            momentum = tf.cast(tf.logical_not(first), weight.dtype) * self.momentum
            moved = momentum * average + (1 - momentum) * weight
            average.assign(moved if stepped is None else tf.where(stepped, moved, average))
