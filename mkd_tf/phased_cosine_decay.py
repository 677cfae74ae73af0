"""A cosine learning-rate decay that restarts at each phase of a method's schedule."""

import itertools
import math

import keras
import tensorflow as tf


class PhasedCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay of the learning rate within each training phase, back to the full rate at each phase.

    With phases starting at steps s_0 = 0 < s_1 < ... < s_{K-1} and the run ending at S = s_K, step t in
    phase k (s_k <= t < s_{k+1}) gets

        lr(t) = lr_0 * (alpha + (1 - alpha) * (1 + cos(pi * (t - s_k) / (s_{k+1} - s_k))) / 2)

    so each phase starts at ``lr_0`` and ends near ``alpha * lr_0``; steps past S keep the last phase's end
    value. The phases are a method's own schedule (MKD: warm start, then distillation; finetune: the
    assistant, then the target; the other methods: one phase), so a phase that starts on new data or new
    losses starts with the full learning rate, as a fresh run on it would (SGDR's warm restarts).

    Args:
        initial_learning_rate: float, ``lr_0``.
        phase_starts: increasing step numbers starting with 0, one per phase.
        total_steps: int, the run's step count ``S`` (greater than the last phase start).
        alpha: float in [0, 1], the fraction of ``lr_0`` each phase decays to.

    Returns:
        Called with the optimizer's step (`iterations`, a scalar), the learning rate (scalar float32).

    Example:
        >>> schedule = PhasedCosineDecay(1e-3, phase_starts=[0, 70], total_steps=100)
        >>> [round(float(schedule(t)), 6) for t in (0, 35, 70, 85)]
        [0.001, 0.0005, 0.001, 0.0005]
    """

    def __init__(self, initial_learning_rate, phase_starts, total_steps, alpha=0.0):
        starts = [int(s) for s in phase_starts]
        if not starts or starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"phase_starts must increase from 0, got {phase_starts}")
        if int(total_steps) <= starts[-1]:
            raise ValueError(f"total_steps ({total_steps}) must exceed the last phase start ({starts[-1]})")
        self.initial_learning_rate = float(initial_learning_rate)
        self.phase_starts = starts
        self.total_steps = int(total_steps)
        self.alpha = float(alpha)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        starts = tf.constant(self.phase_starts, tf.float32)
        ends = tf.constant(self.phase_starts[1:] + [self.total_steps], tf.float32)
        # The phase of `step`: the last one that has started.
        phase = tf.reduce_sum(tf.cast(starts <= step, tf.int32)) - 1
        start, end = tf.gather(starts, phase), tf.gather(ends, phase)
        progress = tf.clip_by_value((step - start) / (end - start), 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        return self.initial_learning_rate * (self.alpha + (1.0 - self.alpha) * cosine)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "phase_starts": list(self.phase_starts),
            "total_steps": self.total_steps,
            "alpha": self.alpha,
        }
