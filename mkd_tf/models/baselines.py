"""The baselines MKD is compared with, on the same code path (batches, losses, loop, evaluation).

- `target-only`: one segmentor on labelled target slices (the supervised lower bound).
- `assistant-only`: one segmentor on raw assistant slices, applied to the target (the appearance gap).
- `joint`: one segmentor on labelled slices of both modalities at once.
- `finetune`: one segmentor on the assistant for the first `switch_step` steps, then on the target.
- `ummkd`: Dou et al. (TMI 2020), see :mod:`mkd_tf.models.ummkd`.

Each is registered in :mod:`mkd_tf.registry` and built by its ``from_settings``.

With ``domain_norm=True`` the methods that see both modalities (`joint`, `finetune`) keep one
batch-norm set per modality with shared convolutions (domain 0: assistant, 1: target; inference on
the target uses 1), as MKD's segmentors do; `target-only` and `assistant-only` see one modality and
ignore it; `ummkd` always has it. Registered defaults, by measurement on the phantom (README, "Method
comparison"): on for `joint` (44.9 -> 77.9 mean Dice over 3 seeds), off for `finetune` (72.6 vs 72.7).
"""

import keras
import tensorflow as tf

from mkd_tf import config
from mkd_tf.models.cross_modality import ASSISTANT_DOMAIN, TARGET_DOMAIN, CrossModalityModel, phase_start_step
from mkd_tf.models.optimizers import default_optimizer
from mkd_tf.models.segmentor_factory import build_segmentor


class SingleSegmentorModel(CrossModalityModel):
    """One segmentor trained on the streams a baseline names.

    Args:
        num_classes: int, classes including background.
        global_batch_size: int, slices per stream per step over all replicas.
        segmentor: dict of segmentor settings (see :func:`~mkd_tf.models.segmentor_factory.build_segmentor`).
        optimizer: keras optimizer for the segmentor.
        predictor: name under which the segmentor is reported (`"real"`, `"syn"`, `"joint"`, ...; ``None``:
            the class's ``predictor_name``).
        domain_norm: bool, one batch-norm set per modality (see the module docstring).

    A setting left ``None`` takes ``mkd train``'s default for :attr:`method_name`
    (:func:`mkd_tf.config.method_defaults`).
    """

    def __init__(
        self,
        num_classes: int,
        global_batch_size: int,
        segmentor: dict | None = None,
        optimizer: keras.optimizers.Optimizer | None = None,
        predictor: str | None = None,
        domain_norm: bool | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, global_batch_size, **kwargs)
        # a setting left out: mkd train's default for this method (one source of truth: mkd_tf.config)
        defaults = config.method_defaults(self.method_name)
        self.segmentor_args = dict(segmentor if segmentor is not None else defaults["segmentor"])
        self.predictor = self.predictor_name if predictor is None else predictor
        self.domain_norm = bool(defaults["segmentor"]["domain_norm"] if domain_norm is None else domain_norm)
        domains = {"num_domains": 2, "default_domain": TARGET_DOMAIN} if self.domain_norm else {}
        self.segmentor = build_segmentor(num_classes, self.segmentor_args, name=self.predictor, **domains)
        self.segmentor_optimizer = optimizer or default_optimizer("segmentors")

    #: the name of the segmentor's predictor when built from settings
    predictor_name = "segmentor"
    #: the registered method (:mod:`mkd_tf.registry`) whose defaults a setting left out takes
    method_name = "target-only"

    @classmethod
    def from_settings(cls, config, num_classes, optimizer):
        return cls(
            num_classes,
            config["data"]["batch_size"],
            config["segmentor"],
            optimizer("segmentors"),
            predictor=cls.predictor_name,
            domain_norm=config["segmentor"]["domain_norm"],
        )

    def segmentors(self):
        return {self.predictor: self.segmentor}

    def build_for(self, image_shape):
        self.segmentor.build((None,) + tuple(image_shape))
        self.built = True

    def optimizers(self):
        return {"segmentors": (self.segmentor_optimizer, self.segmentor.trainable_variables)}

    def supervised(self, stream, domain=None):
        """Replica-averaged segmentation loss of the segmentor on one labelled stream; ``domain``
        (ASSISTANT_DOMAIN or TARGET_DOMAIN) picks the batch-norm set when ``domain_norm`` is on."""
        logits = self.segmentor(stream["image"], training=True, domain=domain if self.domain_norm else None)
        return self.supervised_loss(logits, stream)

    def loss_terms(self, batch):
        """Dict of named loss terms; their sum is minimised."""
        raise NotImplementedError

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            logs = self.loss_terms(batch)
            total = tf.add_n(list(logs.values()))
        return self.end_step(tape, {"segmentors": total}, logs, total)


class TargetOnlyModel(SingleSegmentorModel):
    """Supervised on labelled target slices only."""

    predictor_name = "real"

    def loss_terms(self, batch):
        return {"seg_real": self.supervised(batch["target_labelled"])}


class AssistantOnlyModel(SingleSegmentorModel):
    """Supervised on raw (unaligned) assistant slices; evaluated on the target."""

    predictor_name = "syn"
    method_name = "assistant-only"

    def loss_terms(self, batch):
        return {"seg_syn": self.supervised(batch["assistant"])}


class JointModel(SingleSegmentorModel):
    """Supervised on both modalities' labelled slices with one set of weights."""

    predictor_name = "joint"
    method_name = "joint"

    def loss_terms(self, batch):
        return {
            "seg_assistant": self.supervised(batch["assistant"], ASSISTANT_DOMAIN),
            "seg_target": self.supervised(batch["target_labelled"], TARGET_DOMAIN),
        }


class FinetuneModel(SingleSegmentorModel):
    """Assistant first, then target: the step budget is split at ``switch_step``.

    Args:
        switch_step: steps spent on the assistant before training on the target (``None``: ``mkd
            train``'s default, ``schedule.finetune_switch`` of the default budget).
    """

    predictor_name = "finetune"
    method_name = "finetune"
    schedule_settings = ("finetune_switch",)

    def __init__(self, *args, switch_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if switch_step is None:  # mkd train's: schedule.finetune_switch of the default budget
            switch_step = phase_start_step(config.method_defaults("finetune")["schedule"], "finetune_switch")
        self.switch_step = int(switch_step)

    @classmethod
    def from_settings(cls, config, num_classes, optimizer):
        model = super().from_settings(config, num_classes, optimizer)
        model.switch_step = phase_start_step(config["schedule"], "finetune_switch")
        return model

    def training_phase(self, steps_done):
        """Its one segmentor learns the assistant until ``switch_step``, then the target."""
        return ("assistant" if steps_done <= self.switch_step and self.switch_step > 0 else "target"), (
            self.predictor_names()
        )

    def phase_note(self, phase):
        if phase != "assistant":
            return None
        return f"(steps 1-{self.switch_step} train on the assistant only: the target Dice is expected low until then)"

    def loss_terms(self, batch):
        on_assistant = self.step_counter < self.switch_step
        loss = tf.cond(
            on_assistant,
            lambda: self.supervised(batch["assistant"], ASSISTANT_DOMAIN),
            lambda: self.supervised(batch["target_labelled"], TARGET_DOMAIN),
        )
        return {"seg": loss}
