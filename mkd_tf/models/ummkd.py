"""UMMKD: unpaired multi-modal segmentation via knowledge distillation (Dou, Liu, Heng, Glocker,
IEEE TMI 2020), the compact baseline MKD is compared with.

Reference: Q. Dou, Q. Liu, P. A. Heng, B. Glocker, "Unpaired Multi-modal Segmentation via Knowledge
Distillation", IEEE Transactions on Medical Imaging 39(7), 2020, arXiv:2001.03111.

One segmentor serves both modalities: its convolution kernels are **shared** and only its batch
normalisation is **modality-specific** (:class:`Segmentor` with ``num_domains=2``; domain 0 is the
assistant modality, e.g. MRI, domain 1 the target, e.g. CT). It learns from both modalities' labelled
slices plus a knowledge-distillation term that makes the two modalities' class-wise averaged soft
predictions agree, which needs no pixel correspondence between the unpaired batches.
"""

import keras
import tensorflow as tf

from mkd_tf import config, losses
from mkd_tf.models.cross_modality import ASSISTANT_DOMAIN, TARGET_DOMAIN, CrossModalityModel
from mkd_tf.models.optimizers import default_optimizer
from mkd_tf.models.segmentor_factory import build_segmentor


def mask_unlabelled(stream):
    """Labels `(batch, height, width)` of ``stream`` with every pixel of an unlabelled slice set to -1.

    ``tf.one_hot(-1)`` is all zeros, so these pixels count towards no class mean in
    :func:`losses.classwise_kl_loss` (their stored labels are placeholders, not background).
    """
    labelled = tf.cast(stream["has_label"], tf.bool)[:, None, None]
    labels = tf.cast(stream["label"], tf.int32)
    return tf.where(labelled, labels, -tf.ones_like(labels))


class UMMKDModel(CrossModalityModel):
    """One shared-kernel segmentor with modality-specific batch norm, trained with UMMKD's losses.

    With a = assistant logits (domain-0 batch norm, on ``batch["assistant"]``) and t = target logits
    (domain-1 batch norm, on ``batch["target_labelled"]``), :meth:`train_step` minimises

        L = seg(a) + seg(t) + kd_weight * KD
        KD = 1/2 * [ CKL(a || t) + CKL(t || a) ] / num_replicas_in_sync

    where seg is cross-entropy + soft Dice (:func:`losses.segmentation_loss`, averaged over the global
    batch, unlabelled slices weighted 0) and CKL is :func:`losses.classwise_kl_loss`: per class c,
    the logits of the pixels labelled c are averaged over the batch, softened with softmax(. / T)
    and compared by KL; the mean runs over classes present in both modalities' labels.

    As in the authors' code the KL is symmetric and **neither side is stop-gradient**: there is one
    network, no teacher, and both modalities are pulled towards each other. The authors average over
    all classes (absent ones contribute KL(uniform || uniform) = 0); here the mean is over classes
    present in both batches, which only rescales the term.

    Replicas: CKL is already a per-replica scalar (class means over the replica's shard, like the
    batch-norm statistics), not a per-example vector that :meth:`average` could divide by the global
    batch size. Dividing it by ``num_replicas_in_sync`` makes the gradients the strategy sums over
    replicas (and the SUM-reduced logs) those of the mean over replicas of CKL; with one replica this
    is exactly the single-device loss.

    Args:
        num_classes: int, classes including background.
        global_batch_size: int, slices per stream per step over all replicas.
        segmentor: dict of segmentor settings (``kind`` and its arguments; ``norm`` is
            forced to `"batch"`, because modality-specific batch norm is the method).
        optimizer: keras optimizer of the segmentor.
        temperature: T of the class-wise softened softmax (UMMKD uses 2).
        kd_weight: weight of KD in L.

    A setting left ``None`` takes ``mkd train``'s default (:func:`mkd_tf.config.method_defaults`).

    Call: ``model.predict_probabilities(images, which="ummkd")`` on target slices
    `(batch, height, width, 1)` -> `(batch, height, width, num_classes)`, through the target's batch
    norm (the segmentor's ``default_domain`` is 1, so an exported segmentor does the same).

    Example:
        >>> model = UMMKDModel(5, 8, segmentor={"base_filters": 4, "depth": 2})
        >>> model.build_for((32, 32, 1))
        >>> model.predict_probabilities(tf.zeros((2, 32, 32, 1))).shape
        TensorShape([2, 32, 32, 5])
    """

    loss_settings = ("ummkd_temperature", "ummkd_weight")

    def __init__(
        self,
        num_classes: int,
        global_batch_size: int,
        segmentor: dict | None = None,
        optimizer: keras.optimizers.Optimizer | None = None,
        temperature: float | None = None,
        kd_weight: float | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, global_batch_size, **kwargs)
        defaults = config.method_defaults("ummkd")  # a setting left out: mkd train's
        self.segmentor_args = {**dict(segmentor if segmentor is not None else defaults["segmentor"]), "norm": "batch"}
        self.temperature = float(defaults["loss"]["ummkd_temperature"] if temperature is None else temperature)
        self.kd_weight = float(defaults["loss"]["ummkd_weight"] if kd_weight is None else kd_weight)
        self.network = build_segmentor(
            num_classes, self.segmentor_args, name="ummkd", num_domains=2, default_domain=TARGET_DOMAIN
        )
        self.segmentor_optimizer = optimizer or default_optimizer("segmentors")

    @classmethod
    def from_settings(cls, config, num_classes, optimizer):
        return cls(
            num_classes,
            config["data"]["batch_size"],
            config["segmentor"],
            optimizer("segmentors"),
            temperature=config["loss"]["ummkd_temperature"],
            kd_weight=config["loss"]["ummkd_weight"],
        )

    def segmentors(self):
        return {"ummkd": self.network}

    def build_for(self, image_shape):
        self.network.build((None,) + tuple(image_shape))
        self.built = True

    def optimizers(self):
        return {"segmentors": (self.segmentor_optimizer, self.network.trainable_variables)}

    def supervised(self, logits, stream):
        """Replica-averaged segmentation loss of ``logits`` on one labelled stream."""
        return self.supervised_loss(logits, stream)

    def train_step(self, batch):
        assistant, target = batch["assistant"], batch["target_labelled"]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            # Same kernels, each modality through its own batch norm.
            assistant_logits = self.network(assistant["image"], training=True, domain=ASSISTANT_DOMAIN)
            target_logits = self.network(target["image"], training=True, domain=TARGET_DOMAIN)

            logs = {
                "seg_assistant": self.supervised(assistant_logits, assistant),
                "seg_target": self.supervised(target_logits, target),
            }

            # Symmetric class-wise KL between the unpaired modalities (no stop-gradient: one network).
            assistant_labels, target_labels = mask_unlabelled(assistant), mask_unlabelled(target)
            assistant_to_target = losses.classwise_kl_loss(
                assistant_logits,
                target_logits,
                assistant_labels,
                self.num_classes,
                self.temperature,
                student_labels=target_labels,
            )
            target_to_assistant = losses.classwise_kl_loss(
                target_logits,
                assistant_logits,
                target_labels,
                self.num_classes,
                self.temperature,
                student_labels=assistant_labels,
            )
            logs["kd"] = 0.5 * (assistant_to_target + target_to_assistant) / float(replicas)

            total = logs["seg_assistant"] + logs["seg_target"] + self.kd_weight * logs["kd"]
        return self.end_step(tape, {"segmentors": total}, logs, total)

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "global_batch_size": self.global_batch_size,
            "segmentor": self.segmentor_args,
            "temperature": self.temperature,
            "kd_weight": self.kd_weight,
            "name": self.name,
        }
