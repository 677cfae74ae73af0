"""The baselines MKD is compared with, on the same code path (batches, losses, loop, evaluation).

- `target-only`: one segmentor on labelled target slices (the supervised lower bound).
- `assistant-only`: one segmentor on raw assistant slices, applied to the target (the appearance gap).
- `joint`: one segmentor on labelled slices of both modalities at once.
- `finetune`: one segmentor on the assistant for the first `switch_step` steps, then on the target.
- `ummkd`: Dou et al. (TMI 2020), see :mod:`mkd_tf.models.ummkd`.
"""

import keras
import tensorflow as tf

from mkd_tf import losses
from mkd_tf.errors import MkdError
from mkd_tf.models.cross_modality import CrossModalityModel
from mkd_tf.models.segmentor import Segmentor


#: methods that cannot train without labelled target slices
NEEDS_LABELLED_TARGET = ("target-only", "joint", "finetune", "ummkd")


class SingleSegmentorModel(CrossModalityModel):
    """One segmentor trained on the streams a baseline names.

    Args:
        num_classes: int, classes including background.
        global_batch_size: int, slices per stream per step over all replicas.
        segmentor: dict of :class:`Segmentor` arguments.
        optimizer: keras optimizer for the segmentor.
        predictor: name under which the segmentor is reported (`"real"`, `"syn"`, `"joint"`, ...).
    """

    def __init__(self, num_classes, global_batch_size, segmentor=None, optimizer=None, predictor="segmentor",
                 **kwargs):
        super().__init__(num_classes, global_batch_size, **kwargs)
        self.segmentor_args = dict(segmentor or {})
        self.predictor = predictor
        self.segmentor = Segmentor(num_classes, name=predictor, **self.segmentor_args)
        self.segmentor_optimizer = optimizer or keras.optimizers.Adam(1e-3)

    def segmentors(self):
        return {self.predictor: self.segmentor}

    def build_for(self, image_shape):
        self.segmentor.build((None,) + tuple(image_shape))
        self.built = True

    def optimizers(self):
        return {"segmentors": (self.segmentor_optimizer, self.segmentor.trainable_variables)}

    def supervised(self, stream):
        """Replica-averaged segmentation loss of the segmentor on one labelled stream."""
        logits = self.segmentor(stream["image"], training=True)
        return self.average(losses.segmentation_loss(stream["label"], tf.nn.softmax(logits)) * stream["has_label"])

    def loss_terms(self, batch):
        """Dict of named loss terms; their sum is minimised."""
        raise NotImplementedError

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            logs = self.loss_terms(batch)
            total = tf.add_n(list(logs.values()))
        self.step(tape, total, "segmentors")
        self.step_counter.assign_add(1)
        logs["total"] = total
        return logs


class TargetOnlyModel(SingleSegmentorModel):
    """Supervised on labelled target slices only."""

    def loss_terms(self, batch):
        return {"seg_real": self.supervised(batch["target_labelled"])}


class AssistantOnlyModel(SingleSegmentorModel):
    """Supervised on raw (unaligned) assistant slices; evaluated on the target."""

    def loss_terms(self, batch):
        return {"seg_syn": self.supervised(batch["assistant"])}


class JointModel(SingleSegmentorModel):
    """Supervised on both modalities' labelled slices with one set of weights."""

    def loss_terms(self, batch):
        return {"seg_assistant": self.supervised(batch["assistant"]),
                "seg_target": self.supervised(batch["target_labelled"])}


class FinetuneModel(SingleSegmentorModel):
    """Assistant first, then target: the step budget is split at ``switch_step``.

    Args:
        switch_step: steps spent on the assistant before training on the target.
    """

    def __init__(self, *args, switch_step=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.switch_step = int(switch_step)

    def loss_terms(self, batch):
        on_assistant = self.step_counter < self.switch_step
        loss = tf.cond(on_assistant, lambda: self.supervised(batch["assistant"]),
                       lambda: self.supervised(batch["target_labelled"]))
        return {"seg": loss}


def build(method, num_classes, global_batch_size, segmentor, optimizer, loss=None, switch_step=0):
    """The baseline model called ``method``."""
    if method == "target-only":
        return TargetOnlyModel(num_classes, global_batch_size, segmentor, optimizer, predictor="real")
    if method == "assistant-only":
        return AssistantOnlyModel(num_classes, global_batch_size, segmentor, optimizer, predictor="syn")
    if method == "joint":
        return JointModel(num_classes, global_batch_size, segmentor, optimizer, predictor="joint")
    if method == "finetune":
        return FinetuneModel(num_classes, global_batch_size, segmentor, optimizer, predictor="finetune",
                             switch_step=switch_step)
    if method == "ummkd":
        from mkd_tf.models.ummkd import UMMKDModel

        loss = loss or {}
        return UMMKDModel(num_classes, global_batch_size, segmentor, optimizer,
                          temperature=loss.get("ummkd_temperature", 2.0), kd_weight=loss.get("ummkd_weight", 1.0))
    raise MkdError(f"unknown method '{method}'")
