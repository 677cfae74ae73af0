"""What every method trained by `mkd train` shares: batches, loss averaging, optimizers, predictors.

A training batch is a dict of unpaired streams, each `{"image": (batch, height, width, 1),
"label": (batch, height, width), "has_label": (batch,)}`:

- `"assistant"`: labelled assistant-modality slices (e.g. MRI);
- `"target"`: all target-modality training slices, labelled or not (e.g. CT);
- `"target_labelled"`: labelled target training slices (absent when the target has no labels).

Every method reads only the streams it needs, so all methods see the same data, augmentation and
step budget: the comparison between them is fair.
"""

import contextlib

import keras
import tensorflow as tf

from mkd_tf import losses
from mkd_tf.models.moving_average import ExponentialMovingAverage

#: batch-norm sets of a segmentor with ``domain_norm`` (one per modality): assistant (or aligned assistant)
#: images, target images. Every method numbers them so.
ASSISTANT_DOMAIN, TARGET_DOMAIN = 0, 1

#: ``schedule`` settings that only some methods read (a method lists its own in ``schedule_settings``)
METHOD_SCHEDULE_SETTINGS = ("mkd_pretrain", "finetune_switch")


def phase_start_step(schedule, name):
    """The step at which the phase set by the ``schedule`` fraction ``name`` starts (MKD's warm start ends,
    finetune switches to the target): ``int(fraction * epochs * steps_per_epoch)``."""
    return int(schedule[name] * schedule["epochs"] * schedule["steps_per_epoch"])


class CrossModalityModel(keras.Model):
    """Base class of the methods: MKD and its baselines.

    Subclasses implement :meth:`train_step` (returning a dict of scalar losses) and
    :meth:`segmentors` (name -> model returning logits on target-modality slices).

    Args:
        num_classes: int, classes including background.
        global_batch_size: int, slices per stream per step summed over replicas; per-example losses
            are divided by it (:meth:`average`) so that an update on N replicas equals the
            single-device update on the same global batch.
    """

    #: names of the batch streams the method reads
    streams = ("assistant", "target", "target_labelled")
    #: the ``loss`` settings :meth:`from_settings` reads (the others cannot change what it learns)
    loss_settings = ()
    #: the method-specific ``schedule`` settings (:data:`METHOD_SCHEDULE_SETTINGS`) :meth:`from_settings` reads
    schedule_settings = ()
    #: whether :meth:`from_settings` reads the ``alignment`` settings (the method has an IAM)
    reads_alignment = False

    def __init__(self, num_classes, global_batch_size, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.global_batch_size = int(global_batch_size)
        self.step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_counter")
        #: optimizer name -> :class:`ExponentialMovingAverage` of its variables (see :meth:`build_optimizers`)
        self.weight_averages = {}

    # --- losses -------------------------------------------------------------------------------
    def average(self, per_example):
        """Sum of per-example losses / global batch size (replica-safe mean)."""
        return tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)

    def supervised_loss(self, logits, stream):
        """The supervised segmentation loss of ``logits`` on one labelled stream:
        ``(1 / B) * sum_i has_label_i * L_seg(y_i, softmax(logits_i))`` over the global batch ``B``, with
        :func:`~mkd_tf.losses.segmentation_loss` as ``L_seg``; slices without a label count zero.

        Args:
            logits: float tensor `(batch, height, width, classes)`.
            stream: dict with ``label`` `(batch, height, width)` int and ``has_label`` `(batch,)` float.

        Returns:
            Scalar float tensor.
        """
        return self.average(losses.segmentation_loss(stream["label"], tf.nn.softmax(logits)) * stream["has_label"])

    # --- models ----------------------------------------------------------------------------------
    def segmentors(self):
        """Name -> segmentor (logits) usable on target-modality slices."""
        raise NotImplementedError

    def predict_probabilities(self, images, which="ensemble"):
        """Softmax probabilities `(batch, height, width, classes)` of one predictor on target slices.

        Args:
            images: `(batch, height, width, 1)` preprocessed target slices.
            which: a key of :meth:`segmentors`, or `"ensemble"` (mean of all segmentors' softmax).
        """
        segmentors = self.segmentors()
        if which == "ensemble":
            probabilities = [tf.nn.softmax(model(images, training=False), axis=-1) for model in segmentors.values()]
            return tf.add_n(probabilities) / float(len(probabilities))
        if which not in segmentors:
            raise KeyError(f"unknown predictor {which!r}; have {sorted(segmentors)} and 'ensemble'")
        return tf.nn.softmax(segmentors[which](images, training=False), axis=-1)

    def predictor_names(self):
        """Every predictor of the model: its segmentors' names, then ``ensemble`` if it has two or more."""
        names = list(self.segmentors())
        return names + ["ensemble"] if len(names) > 1 else names

    def main_predictor(self) -> str:
        """The predictor a run reports, exports and (unless ``schedule.select_by`` says otherwise) selects its
        best checkpoint by: ``ensemble`` of two or more segmentors, else the one segmentor."""
        names = list(self.segmentors())
        return "ensemble" if len(names) > 1 else names[0]

    def training_phase(self, steps_done):
        """`(phase name or None, predictors that train on the target task then)` after ``steps_done`` steps.

        Methods with phases (MKD's warm start, finetune's assistant-then-target) override it so that the
        epoch log and TensorBoard say which phase an epoch ended in and report a predictor that is
        training in it; one-phase methods return `(None, all predictors)`.
        """
        return None, self.predictor_names()

    def phase_note(self, phase):
        """One sentence the epoch log prints when ``phase`` (of :meth:`training_phase`) is first reported, or
        `None`."""
        return None

    # --- building ------------------------------------------------------------------------------
    def build_for(self, image_shape):
        """Create every variable for slices of `image_shape = (height, width, 1)`."""
        raise NotImplementedError

    def optimizers(self):
        """Name -> (optimizer, variables) pairs; built together inside the strategy scope."""
        raise NotImplementedError

    def build_optimizers(self):
        """Build each optimizer on its variables (call inside `strategy.scope()`).

        An optimizer made with Keras' ``use_ema=True`` asks for an exponential moving average of its
        variables: the model keeps it (:attr:`weight_averages`, the same update and variable names, but
        public state) and the optimizer's own is switched off, so the averages exist once.
        """
        for name, (optimizer, variables) in self.optimizers().items():
            inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's averages
            if inner.use_ema and not inner.built:
                if inner.ema_overwrite_frequency:
                    raise ValueError(f"optimizer {name!r}: ema_overwrite_frequency is not supported")
                self.weight_averages[name] = ExponentialMovingAverage(variables, inner.ema_momentum)
                inner.use_ema = False
            optimizer.build(variables)

    @classmethod
    def from_settings(cls, config, num_classes, optimizer):
        """The model of a resolved ``config`` (:mod:`mkd_tf.config`); ``optimizer(role)`` makes the
        configured optimizer of ``"segmentors"``, ``"generators"`` or ``"discriminators"``. Registered
        methods (:mod:`mkd_tf.registry`) are built through it."""
        raise NotImplementedError

    def end_step(self, tape, losses_by_optimizer, logs, total):
        """The end of every training step: one update per ``{optimizer name: loss}`` from ``tape``,
        the step counter, and ``logs`` with ``"total"``. Returns ``logs``."""
        for name, loss in losses_by_optimizer.items():
            self.step(tape, loss, name)
        self.step_counter.assign_add(1)
        logs["total"] = total
        return logs

    def step(self, tape, loss, name):
        """One optimizer step for ``name`` from ``loss`` recorded on ``tape``."""
        optimizer, variables = self.optimizers()[name]
        if hasattr(optimizer, "inner_optimizer"):
            # A LossScaleOptimizer (mixed float16): back-propagate from the loss scale instead of 1, i.e.
            # the gradient of scale * loss (the tape has closed, so the product itself is not recorded);
            # apply_gradients divides the scale out again and skips a step whose gradients overflowed.
            gradients = tape.gradient(loss, variables, output_gradients=optimizer.scale_loss(tf.ones_like(loss)))
        else:
            gradients = tape.gradient(loss, variables)
        average = self.weight_averages.get(name)
        before = tf.identity(optimizer.iterations) if average is not None else None
        # A variable the loss does not reach (e.g. the target's batch-norm set during MKD's warm start,
        # which sees assistant images only) is left alone, as Keras would, without its warning.
        # (the name scope lets benchmarks/training_cost.py attribute the update's FLOPs to ``name``)
        with tf.name_scope(f"{name}_update"):
            optimizer.apply_gradients([(g, v) for g, v in zip(gradients, variables) if g is not None])
            if average is not None:  # after the step, as Keras' use_ema; not after a skipped (overflowed) one
                scaled = hasattr(optimizer, "inner_optimizer")  # only a LossScaleOptimizer skips steps
                stepped = tf.not_equal(optimizer.iterations, before) if scaled else None
                average.update(first=tf.equal(before, 0), stepped=stepped)

    #: steps at the start of training that run :meth:`pretrain_step` instead of :meth:`train_step`
    pretrain_steps = 0

    def pretrain_step(self, batch):
        """The step of the first :attr:`pretrain_steps` steps (methods with a warm start override it)."""
        return self.train_step(batch)

    def end_pretraining(self):
        """Called once by the training loop before the first :meth:`train_step` after the warm start."""

    def moving_averages(self, started_only=False):
        """``[(variable, its moving average)]`` over :attr:`weight_averages` (optimizers made with Keras'
        ``use_ema=True``); ``started_only``: skip optimizers that have not stepped yet (their average is
        not one yet)."""
        pairs = []
        for name, average in self.weight_averages.items():
            optimizer, _ = self.optimizers()[name]
            if started_only and int(optimizer.iterations.numpy()) == 0:
                continue  # the average starts at the first step's weights
            pairs += average.pairs()
        return pairs

    def average_by_variable(self):
        """``{id(variable): its moving average}`` over :meth:`moving_averages` (variables are not hashable)."""
        return {id(variable): average for variable, average in self.moving_averages()}

    def copy_variables(self, pairs):
        """Assign each ``(source, destination)`` variable pair, and the optimizer's moving average of
        ``destination`` (``use_ema``) from that of ``source``, so the averaged weights follow too."""
        averages = self.average_by_variable()
        for source, destination in pairs:
            destination.assign(source)
            if id(source) in averages and id(destination) in averages:
                averages[id(destination)].assign(averages[id(source)])

    def load_averaged_weights(self):
        """Assign to every variable whose optimizer keeps an exponential moving average (Keras
        ``use_ema=True``) that average. Returns ``[(variable, raw value)]`` to undo it.

        Evaluation, the best checkpoint and export use the averaged weights; training and the resume
        checkpoints keep the raw ones (the averages are optimizer variables, checkpointed with it).
        """
        swapped = []
        for variable, average in self.moving_averages(started_only=True):
            swapped.append((variable, tf.identity(variable.value)))
            variable.assign(average)
        return swapped

    @contextlib.contextmanager
    def averaged_weights(self):
        """Inside the block the model holds its averaged weights (:meth:`load_averaged_weights`)."""
        swapped = self.load_averaged_weights()
        try:
            yield
        finally:
            for variable, raw in swapped:
                variable.assign(raw)

    def image_panels(self, batch):
        """Images for TensorBoard, each `(batch, height, width, 1)` in [0, 1] (overridden by MKD)."""
        return {}
