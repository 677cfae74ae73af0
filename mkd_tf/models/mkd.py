"""Online Mutual Knowledge Distillation (Li, Yu, Wang, Heng, AAAI 2020) as one Keras model.

Reference: K. Li, L. Yu, S. Wang, P.-A. Heng, "Towards Cross-Modality Medical Image Segmentation with
Online Mutual Knowledge Distillation", AAAI 2020, arXiv:2010.01532.

The model owns the Image Alignment Module (G: assistant -> target, F: target -> assistant, and their
PatchGAN discriminators), the segmentor S_syn that learns on aligned assistant images and the
segmentor S_real that learns on target images. :meth:`MKDModel.train_step` reads like the method:

1. align assistant images to target appearance: ``aligned = G(assistant)``;
2. supervised segmentation (cross-entropy + soft Dice): S_syn on ``aligned`` with assistant labels,
   S_real on labelled target images (and, by default, S_syn on them too: ``syn_on_target``);
3. mutual distillation, KL(teacher_T || student_T) * T^2 on temperature-softened logits:
   S_syn -> S_real on aligned images (weight lambda_s2r), S_real -> S_syn on all target images,
   labelled and unlabelled (weight lambda_r2s). **The teacher side is stop-gradient**: each
   segmentor is only taught, never pulled towards its student, which keeps the two from collapsing
   onto each other's mistakes; the aligned images are stop-gradient in the KD terms too, so the
   generator learns from adversarial, cycle and segmentation losses only;
4. IAM: least-squares adversarial + L1 cycle losses for G and F (optionally a contrast-free structure
   loss between each image and its translation, ``loss_weights.structure``), and S_syn's segmentation
   loss on aligned images also flows into G so that alignment keeps anatomy; the discriminators learn
   to tell real from aligned images;
5. three optimizers (segmentors, generators, discriminators), built inside the strategy scope.

Domain normalisation (``domain_norm=True``): each segmentor keeps **one batch-norm set per input
domain** -- domain 0 for (aligned) assistant images, domain 1 for target images -- with shared
convolutions, as UMMKD does. Both segmentors see both domains (S_real the aligned images in
S_syn -> S_real distillation, S_syn the target images in S_real -> S_syn distillation); with one
batch-norm set their moving statistics, used at inference on the target, would be a mixture of the
two domains' statistics. Inference uses domain 1. ``syn_domain_norm=False`` keeps per-domain sets in
S_real only: S_syn then reads aligned and target images through one set (the paper's S_syn), whose
moving statistics fit target images at inference only as far as the IAM makes aligned images look like
them (on the phantom that is all the IAM's ablation costs: benchmarks/target_statistics.py).

Ablations: ``use_iam=False`` feeds raw assistant images to S_syn (no alignment); ``kd_s2r=False`` /
``kd_r2s=False`` drop one direction of distillation (without r2s, with ``syn_on_target=0`` and
``lambda_s2r_target=0``, S_syn never sees a target image, so with domain normalisation it predicts
target images with its assistant-domain set, domain 0).

Beyond the paper (measured, see the README's method comparison): by default S_syn is also supervised on
the labelled target slices (``loss_weights.syn_on_target=1``), as S_real is; ``0`` is the paper's S_syn.
"""

from dataclasses import asdict, dataclass, fields

import keras
import numpy as np
import tensorflow as tf

from mkd_tf import losses
from mkd_tf.errors import fail
from mkd_tf.models.alignment import ImageAlignmentModule
from mkd_tf.models.cross_modality import ASSISTANT_DOMAIN, TARGET_DOMAIN, CrossModalityModel, phase_start_step
from mkd_tf.models.segmentor_factory import build_segmentor

#: ``alignment.discriminator_every: null`` (the default) on one device: the discriminators learn on every 2nd
#: step (with the target cycle off and the IAM frozen after the warm start, measured to keep Dice on both
#: phantoms at half the IAM's cost: benchmarks/README.md, "Where MKD's FLOPs go")
AUTO_DISCRIMINATOR_EVERY = 2
#: ``alignment`` settings of how MKD trains its IAM (arguments of :class:`MKDModel`, not of the networks)
#: (config name -> argument name)
TRAINING_SETTINGS = {
    "target_cycle": "target_cycle",
    "discriminator_every": "discriminator_every",
    "freeze_after_warm_start": "freeze_iam_after_warm_start",
}


@dataclass
class MKDLossWeights:
    """Loss weights and the distillation temperature.

    Args:
        temperature: T of the softened softmax in both KD directions.
        lambda_s2r: weight of S_syn -> S_real distillation.
        lambda_r2s: weight of S_real -> S_syn distillation.
        adversarial: weight of the generators' LSGAN loss.
        cycle: weight of the L1 cycle-consistency loss (CycleGAN's 10).
        segmentation_to_generator: weight of S_syn's segmentation loss in G's objective.
        real_on_aligned: weight of a supervised loss of S_real on aligned assistant images with the
            assistant's labels (0: S_real learns the assistant only through S_syn's distillation).
        syn_on_target: weight of a supervised loss of S_syn on the labelled target images (0: S_syn
            learns the target only through S_real's distillation, as in the paper; 1, the default, was
            measured better on the phantom: both segmentors learn the target's labels and the ensemble
            beats each of them).
        lambda_s2r_target: weight of S_syn -> S_real distillation on target images as well (0: S_syn
            teaches S_real only on aligned assistant images, as in the paper; with it the two segmentors
            distil each other in both directions on the target, as in deep mutual learning).
        structure: weight of the contrast-free structure loss (:func:`~mkd_tf.losses.structure_loss`)
            between each image and its translation, for G and F (0: none, the paper).
        pretrain_on_target: weight of a supervised loss of both segmentors on the labelled target images
            during the warm start (0: the warm start sees the assistant only, as finetune's first phase;
            > 0: it trains the target's batch-norm set too, which then is not copied from the assistant's).
        average_teachers: distil from each teacher segmentor's exponential moving average of weights (the
            segmentor optimizer's ``use_ema`` averages, a mean teacher) instead of its current weights
            (False: the paper's online teachers).
        student_perturbation: s > 0 shows each student of the paper's two KD terms (S_real on aligned
            images, S_syn on target images) a perturbed view while its teacher sees the clean one: per
            slice, contrast ``c ~ U(1 - s, 1 + s)`` about the slice mean plus Gaussian noise of ``s`` times
            the slice's std (0: both see the same images, the paper).
        aligned_as_target: weight of a supervised loss of S_real on aligned assistant images (assistant
            labels) read as target images: through its target batch-norm set with frozen statistics
            (inference-mode batch norm, so the set's moving statistics stay the target's), in the segmentors'
            objective (0: none, the paper). Without the IAM it is raw assistant images S_real reads as target.
        real_to_generator: weight of the same loss in G's objective: ``G(assistant)`` must read correctly to
            S_real as it reads target images (0: none, the paper). Unlike ``segmentation_to_generator``
            (S_syn on its own assistant set, which adapts to whatever G outputs), this pulls G towards
            images a target segmentor understands.
        pseudo_labels: weight of self-training on target images: each segmentor learns the hard labels of
            the two segmentors' stop-gradient average prediction where it is confident
            (:func:`~mkd_tf.losses.pseudo_label_loss`), on every target slice, labelled or not (0: none,
            the paper; the paper's CT teacher is S_real alone, and S_real learns nothing from unlabelled CT).
        pseudo_label_threshold: the confidence tau an averaged prediction needs to become a pseudo-label.
    """

    temperature: float = 2.0
    lambda_s2r: float = 1.0
    lambda_r2s: float = 1.0
    adversarial: float = 1.0
    cycle: float = 10.0
    segmentation_to_generator: float = 1.0
    real_on_aligned: float = 0.0
    syn_on_target: float = 1.0
    lambda_s2r_target: float = 0.0
    structure: float = 0.0
    pretrain_on_target: float = 0.0
    average_teachers: bool = False
    student_perturbation: float = 0.0
    aligned_as_target: float = 0.0
    real_to_generator: float = 0.0
    pseudo_labels: float = 0.0
    pseudo_label_threshold: float = 0.9


def _to_unit(images):
    """Min-max each image to [0, 1] for TensorBoard panels."""
    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
    return (images - low) / tf.maximum(high - low, 1e-6)


class MKDModel(CrossModalityModel):
    """IAM + two segmentors trained with online mutual knowledge distillation.

    Args:
        num_classes: int, classes including background.
        global_batch_size: int, slices per stream per step over all replicas.
        segmentor: dict of segmentor settings (``kind`` and its arguments, see
            :func:`~mkd_tf.models.segmentor_factory.build_segmentor`).
        alignment: dict of :class:`ImageAlignmentModule` arguments.
        loss_weights: :class:`MKDLossWeights` or a dict of its fields.
        use_iam, kd_s2r, kd_r2s: ablation switches (all on = the full method).
        pretrain_steps: int, steps of :meth:`pretrain_step` (warm start on the assistant) before
            :meth:`train_step`; 0 starts with mutual distillation.
        domain_norm: bool, one batch-norm set per input domain in both segmentors (needs
            ``segmentor["norm"] == "batch"``).
        syn_domain_norm: bool, with ``domain_norm``: ``False`` gives S_syn one batch-norm set for both
            domains (S_real keeps one per domain).
        target_cycle: bool, the IAM's target cycle ``|target - G(F(target))|`` (False: only the assistant's
            cycle ``|assistant - F(G(assistant))|``; saves one generator pass and its gradient per step).
        discriminator_every: int k >= 1, the discriminators learn on every k-th step only (steps 0, k,
            2k, ... of the run, warm start included); their loss is still computed (and logged) every step.
            ``None``: :data:`AUTO_DISCRIMINATOR_EVERY` on one device, every step under a distribution
            strategy (whose gradient all-reduce cannot sit inside the ``tf.cond`` that skips a step).
        freeze_iam_after_warm_start: bool, after the warm start the IAM stops learning: distillation
            steps run G's forward pass alone (inference mode, no gradient), not F, the discriminators or
            the cycle (only with ``pretrain_steps > 0``: without a warm start the IAM learns throughout).
            The defaults of these three are ``mkd train``'s (the cheaper IAM); the paper trains the IAM
            with ``target_cycle=True, discriminator_every=1, freeze_iam_after_warm_start=False``.
        optimizers: dict with keras optimizers under `"segmentors"`, `"generators"`, `"discriminators"`.

    Call: ``model.predict_probabilities(images, which="ensemble"|"syn"|"real")`` on target slices
    `(batch, height, width, 1)` -> `(batch, height, width, num_classes)`.

    Example:
        >>> model = MKDModel(5, 8, segmentor={"base_filters": 4, "depth": 2},
        ...                  alignment={"base_filters": 4, "num_blocks": 1, "disc_filters": 4})
        >>> model.build_for((32, 32, 1))
    """

    loss_settings = tuple(field.name for field in fields(MKDLossWeights))
    schedule_settings = ("mkd_pretrain",)
    reads_alignment = True

    def __init__(
        self,
        num_classes,
        global_batch_size,
        segmentor=None,
        alignment=None,
        loss_weights=None,
        use_iam=True,
        kd_s2r=True,
        kd_r2s=True,
        optimizers=None,
        pretrain_steps=0,
        domain_norm=False,
        syn_domain_norm=True,
        target_cycle=False,
        discriminator_every=None,
        freeze_iam_after_warm_start=True,
        **kwargs,
    ):
        super().__init__(num_classes, global_batch_size, **kwargs)
        self.pretrain_steps = int(pretrain_steps)
        self.segmentor_args = dict(segmentor or {})
        self.alignment_args = dict(alignment or {})
        self.loss_weights = (
            loss_weights if isinstance(loss_weights, MKDLossWeights) else MKDLossWeights(**(loss_weights or {}))
        )
        self.use_iam, self.kd_s2r, self.kd_r2s = bool(use_iam), bool(kd_s2r), bool(kd_r2s)
        self.domain_norm = bool(domain_norm)
        self.target_cycle = bool(target_cycle)
        self.discriminator_every = None if discriminator_every is None else int(discriminator_every)
        if self.discriminator_every is not None and self.discriminator_every < 1:
            raise ValueError(f"discriminator_every must be >= 1, got {discriminator_every}")
        # without a warm start there is nothing to freeze after: the IAM then learns throughout
        self.freeze_iam_after_warm_start = bool(freeze_iam_after_warm_start) and self.pretrain_steps > 0
        self.syn_domain_norm = self.domain_norm and bool(syn_domain_norm)
        # the run's seed for the students' perturbations (drawn from the seeded global RNG only when used, so
        # that runs without it draw the same initial weights as before)
        self.perturbation_seed = int(np.random.randint(0, 2**20)) if self.loss_weights.student_perturbation else 0
        domains = {"num_domains": 2, "default_domain": TARGET_DOMAIN} if self.domain_norm else {}
        # Without S_real -> S_syn distillation, its own target supervision and S_syn -> S_real distillation
        # on target images, S_syn never sees a target image in training: its target batch-norm set would
        # keep the statistics copied at the end of the warm start, so on target images it uses the set it
        # trains on aligned images with (G makes those look like the target).
        weights = self.loss_weights
        syn_sees_target = (
            self.kd_r2s or weights.syn_on_target > 0 or weights.lambda_s2r_target > 0 or weights.pseudo_labels > 0
        )
        syn_domains = {}
        if self.syn_domain_norm:
            syn_domains = domains if syn_sees_target else dict(domains, default_domain=ASSISTANT_DOMAIN)
        self.synthetic_segmentor = build_segmentor(num_classes, self.segmentor_args, name="s_syn", **syn_domains)
        self.real_segmentor = build_segmentor(num_classes, self.segmentor_args, name="s_real", **domains)
        self.alignment = ImageAlignmentModule(name="iam", **self.alignment_args) if self.use_iam else None
        optimizers = optimizers or {}
        self.segmentor_optimizer = optimizers.get("segmentors") or keras.optimizers.Adam(1e-3)
        if self.use_iam:
            self.generator_optimizer = optimizers.get("generators") or keras.optimizers.Adam(2e-4, beta_1=0.5)
            self.discriminator_optimizer = optimizers.get("discriminators") or keras.optimizers.Adam(2e-4, beta_1=0.5)

    @classmethod
    def from_settings(cls, config, num_classes, optimizer):
        schedule = config["schedule"]
        loss_weights = {field.name: config["loss"][field.name] for field in fields(MKDLossWeights)}
        if config["data"]["target_labelled"] == 0:
            loss_weights["syn_on_target"] = 0.0  # no labelled target slices: S_syn cannot learn from them
        # the IAM's training settings (TRAINING_SETTINGS) are the model's arguments, the rest the networks'
        alignment = {k: v for k, v in config["alignment"].items() if k not in TRAINING_SETTINGS}
        return cls(
            num_classes,
            config["data"]["batch_size"],
            segmentor=config["segmentor"],
            alignment=alignment,
            **{argument: config["alignment"][name] for name, argument in TRAINING_SETTINGS.items()},
            loss_weights=loss_weights,
            use_iam=config["ablation"]["iam"],
            kd_s2r=config["ablation"]["kd_s2r"],
            kd_r2s=config["ablation"]["kd_r2s"],
            pretrain_steps=phase_start_step(schedule, "mkd_pretrain"),
            domain_norm=config["segmentor"]["domain_norm"],
            syn_domain_norm=config["segmentor"]["syn_domain_norm"],
            optimizers={role: optimizer(role) for role in ("segmentors", "generators", "discriminators")},
        )

    def segmentors(self):
        return {"syn": self.synthetic_segmentor, "real": self.real_segmentor}

    def has_domain_sets(self, segmentor):
        """Whether ``segmentor`` keeps one batch-norm set per domain (``domain_norm``; S_syn only with
        ``syn_domain_norm``)."""
        return self.syn_domain_norm if segmentor is self.synthetic_segmentor else self.domain_norm

    def domain_of(self, segmentor, domain):
        """``domain`` if ``segmentor`` keeps one batch-norm set per domain, else ``None`` (its only set)."""
        return domain if self.has_domain_sets(segmentor) else None

    def on_assistant(self, segmentor, images):
        """Training-mode logits of ``segmentor`` on (aligned) assistant-domain images."""
        return segmentor(images, training=True, domain=self.domain_of(segmentor, ASSISTANT_DOMAIN))

    def on_target(self, segmentor, images, training=True):
        """Logits of ``segmentor`` on ``images`` read as target-domain images (training-mode by default;
        ``training=False`` uses the set's moving statistics and leaves them untouched)."""
        return segmentor(images, training=training, domain=self.domain_of(segmentor, TARGET_DOMAIN))

    def supervised_on_target(self, segmentor, labelled_target):
        """Segmentation loss of ``segmentor`` on the labelled target slices (with the target's batch-norm
        set), averaged over the global batch; slices without a label count zero."""
        return self.supervised_loss(self.on_target(segmentor, labelled_target["image"]), labelled_target)

    def teacher(self, segmentor, student_logits, images, domain):
        """Stop-gradient teacher logits of ``segmentor`` on ``images``: ``student_logits`` (its current
        weights, already computed) or, with ``average_teachers``, the same training-mode pass with its
        optimizer's moving average of the weights (its batch-norm statistics are left untouched)."""
        if not self.loss_weights.average_teachers:
            return tf.stop_gradient(student_logits)
        averages = self.average_by_variable()
        averaged = [averages[id(variable)] for variable in segmentor.trainable_variables]
        logits, _ = segmentor.stateless_call(
            averaged,
            segmentor.non_trainable_variables,
            images,
            training=True,
            domain=self.domain_of(segmentor, domain),
        )
        return tf.stop_gradient(logits)

    def student_view(self, images, stream):
        """``images`` as a KD student sees them: unchanged, or with ``student_perturbation`` s > 0 each slice
        re-contrasted by ``c ~ U(1 - s, 1 + s)`` about its mean plus noise ``N(0, (s * std)^2)``. Stateless
        draws from (run seed, step, replica, ``stream``), so a run repeats and replicas differ."""
        strength = self.loss_weights.student_perturbation
        if not strength:
            return images
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.stack([self.step_counter, tf.cast(replica, tf.int64) * 2 + stream + 1000 * self.perturbation_seed])
        contrast_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
        mean, variance = tf.nn.moments(images, axes=[1, 2, 3], keepdims=True)
        contrast = tf.random.stateless_uniform(
            tf.shape(mean), contrast_seed, minval=1.0 - strength, maxval=1.0 + strength
        )
        noise = tf.random.stateless_normal(tf.shape(images), noise_seed)
        return (images - mean) * contrast + mean + strength * tf.sqrt(variance) * noise

    def build_for(self, image_shape):
        shape = (None,) + tuple(image_shape)
        self.synthetic_segmentor.build(shape)
        self.real_segmentor.build(shape)
        if self.alignment is not None:
            self.alignment.build(shape)
        self.built = True

    def optimizers(self):
        segmentor_variables = self.synthetic_segmentor.trainable_variables + self.real_segmentor.trainable_variables
        groups = {"segmentors": (self.segmentor_optimizer, segmentor_variables)}
        if self.alignment is not None:
            groups["generators"] = (self.generator_optimizer, self.alignment.generator_variables)
            groups["discriminators"] = (self.discriminator_optimizer, self.alignment.discriminator_variables)
        return groups

    def train_step(self, batch):
        w = self.loss_weights
        assistant, target = batch["assistant"], batch["target"]
        labelled_target = batch.get("target_labelled")
        logs = {}
        train_iam = self.use_iam and not self.freeze_iam_after_warm_start
        if self.use_iam and self.freeze_iam_after_warm_start:
            # The IAM is frozen after the warm start: G's forward pass alone, outside the tape (no gradient
            # reaches G, and F and the discriminators are not run at all).
            with tf.name_scope("generator_align"):
                frozen_aligned = self.alignment.assistant_to_target(assistant["image"], training=False)
        with tf.GradientTape(persistent=True) as tape:
            # 1. Align assistant images to the target appearance.
            if train_iam:
                with tf.name_scope("generator_align"):
                    aligned = self.alignment.assistant_to_target(assistant["image"], training=True)
            elif self.use_iam:
                aligned = frozen_aligned
            else:
                aligned = assistant["image"]

            # 2. Supervised segmentation losses.
            with tf.name_scope("segmentor_syn_on_aligned"):
                syn_on_aligned = self.on_assistant(self.synthetic_segmentor, aligned)
            logs["seg_syn"] = self.average(losses.segmentation_loss(assistant["label"], tf.nn.softmax(syn_on_aligned)))
            segmentation = logs["seg_syn"]
            if labelled_target is not None:
                with tf.name_scope("segmentor_real_on_labelled_target"):
                    logs["seg_real"] = self.supervised_on_target(self.real_segmentor, labelled_target)
                segmentation += logs["seg_real"]
            if labelled_target is not None and w.syn_on_target:
                with tf.name_scope("segmentor_syn_on_labelled_target"):
                    logs["seg_syn_target"] = self.supervised_on_target(self.synthetic_segmentor, labelled_target)
                segmentation += w.syn_on_target * logs["seg_syn_target"]

            if w.aligned_as_target or (self.use_iam and w.real_to_generator):
                # S_real reads aligned images as it reads the target: its target set with frozen statistics
                # (inference-mode batch norm), so the target's moving statistics stay those of target images.
                with tf.name_scope("segmentor_real_reads_aligned_as_target"):
                    real_reads_aligned = self.on_target(self.real_segmentor, aligned, training=False)
                logs["seg_real_aligned_as_target"] = self.average(
                    losses.segmentation_loss(assistant["label"], tf.nn.softmax(real_reads_aligned))
                )
                if w.aligned_as_target:
                    segmentation += w.aligned_as_target * logs["seg_real_aligned_as_target"]

            if self.kd_s2r or w.real_on_aligned:
                with tf.name_scope("segmentor_real_on_aligned"):
                    real_on_aligned = self.on_assistant(
                        self.real_segmentor, self.student_view(tf.stop_gradient(aligned), 0)
                    )
            if w.real_on_aligned:
                logs["seg_real_aligned"] = self.average(
                    losses.segmentation_loss(assistant["label"], tf.nn.softmax(real_on_aligned))
                )
                segmentation += w.real_on_aligned * logs["seg_real_aligned"]

            # 3. Mutual distillation; teachers (and the aligned images) are stop-gradient.
            distillation = 0.0
            if self.kd_s2r:
                logs["kd_s2r"] = self.average(
                    losses.distillation_loss(
                        self.teacher(self.synthetic_segmentor, syn_on_aligned, aligned, ASSISTANT_DOMAIN),
                        real_on_aligned,
                        w.temperature,
                    )
                )
                distillation += w.lambda_s2r * logs["kd_s2r"]
            if self.kd_r2s or w.lambda_s2r_target or w.pseudo_labels:
                with tf.name_scope("segmentor_real_on_target"):
                    real_on_target = self.on_target(self.real_segmentor, target["image"])
                with tf.name_scope("segmentor_syn_on_target"):
                    syn_on_target = self.on_target(self.synthetic_segmentor, self.student_view(target["image"], 1))
            if self.kd_r2s:
                logs["kd_r2s"] = self.average(
                    losses.distillation_loss(
                        self.teacher(self.real_segmentor, real_on_target, target["image"], TARGET_DOMAIN),
                        syn_on_target,
                        w.temperature,
                    )
                )
                distillation += w.lambda_r2s * logs["kd_r2s"]
            if w.lambda_s2r_target:  # the same two forward passes, the other direction
                logs["kd_s2r_target"] = self.average(
                    losses.distillation_loss(
                        self.teacher(self.synthetic_segmentor, syn_on_target, target["image"], TARGET_DOMAIN),
                        real_on_target,
                        w.temperature,
                    )
                )
                distillation += w.lambda_s2r_target * logs["kd_s2r_target"]
            if w.pseudo_labels:  # self-training: both learn the pair's confident average on target images
                ensemble = tf.stop_gradient((tf.nn.softmax(real_on_target) + tf.nn.softmax(syn_on_target)) / 2.0)
                logs["pseudo_target"] = self.average(
                    losses.pseudo_label_loss(ensemble, syn_on_target, w.pseudo_label_threshold)
                    + losses.pseudo_label_loss(ensemble, real_on_target, w.pseudo_label_threshold)
                )
                distillation += w.pseudo_labels * logs["pseudo_target"]
            segmentor_loss = segmentation + distillation

            # 4. Image alignment: adversarial + cycle (+ segmentation keeps anatomy).
            if train_iam:
                generator_loss = self.alignment_losses(assistant["image"], target["image"], aligned, logs)
                generator_loss += w.segmentation_to_generator * logs["seg_syn"]
                if w.real_to_generator:
                    generator_loss += w.real_to_generator * logs["seg_real_aligned_as_target"]

        # 5. Separate optimizers.
        return self.finish_step(tape, segmentor_loss, generator_loss if train_iam else None, logs)

    def pretrain_step(self, batch):
        """Warm start, the first ``pretrain_steps`` steps: both segmentors learn the assistant's labels on
        raw assistant images (no distillation: with ``pretrain_on_target`` 0, exactly the first phase of
        the finetune baseline; above 0 they learn the labelled target slices too, as joint does), while
        the IAM trains on its adversarial and cycle losses alone, so that G already aligns when
        distillation starts."""
        w = self.loss_weights
        assistant, target = batch["assistant"], batch["target"]
        labelled_target = batch.get("target_labelled")
        logs = {}
        with tf.GradientTape(persistent=True) as tape:
            per_example = []
            for part, model in (("syn", self.synthetic_segmentor), ("real", self.real_segmentor)):
                with tf.name_scope(f"segmentor_{part}_on_assistant"):
                    per_example.append(
                        losses.segmentation_loss(
                            assistant["label"], tf.nn.softmax(self.on_assistant(model, assistant["image"]))
                        )
                    )
            logs["seg_syn"], logs["seg_real"] = (self.average(loss) for loss in per_example)
            segmentor_loss = logs["seg_syn"] + logs["seg_real"]
            if labelled_target is not None and w.pretrain_on_target:
                logs["seg_target"] = 0.0
                for part, model in (("syn", self.synthetic_segmentor), ("real", self.real_segmentor)):
                    with tf.name_scope(f"segmentor_{part}_on_labelled_target"):
                        logs["seg_target"] += self.supervised_on_target(model, labelled_target)
                segmentor_loss += w.pretrain_on_target * logs["seg_target"]
            generator_loss = None
            if self.use_iam:
                with tf.name_scope("generator_align"):
                    aligned = self.alignment.assistant_to_target(assistant["image"], training=True)
                generator_loss = self.alignment_losses(assistant["image"], target["image"], aligned, logs)
        return self.finish_step(tape, segmentor_loss, generator_loss, logs)

    def training_phase(self, steps_done):
        """The warm start reports S_syn: there both segmentors learn the assistant's labels only, and S_real's
        target batch-norm set (with ``domain_norm``), hence the ensemble, is set only when the warm start
        ends, so their target Dice stays near 0 until distillation starts."""
        if steps_done <= self.pretrain_steps and self.pretrain_steps > 0:
            return "warm start", ["syn"]
        return "distillation", self.predictor_names()

    def phase_note(self, phase):
        if phase != "warm start":
            return None
        return (
            f"(warm start, steps 1-{self.pretrain_steps}: both segmentors learn the assistant's labels only, so "
            "the target Dice of S_syn shown is expected near 0; S_real and the ensemble follow from distillation)"
        )

    def end_pretraining(self):
        """With ``domain_norm`` a warm start on the assistant alone trained only the assistant's batch-norm
        set: start the target's from it (the kernels were learnt with those scales and statistics), not
        from scratch. With ``pretrain_on_target`` the target's set has learnt from target slices: keep it."""
        if self.loss_weights.pretrain_on_target:
            return
        for segmentor in self.segmentors().values():
            if self.has_domain_sets(segmentor):
                self.copy_variables(segmentor.domain_variable_pairs(ASSISTANT_DOMAIN, TARGET_DOMAIN))

    def alignment_losses(self, assistant_images, target_images, aligned, logs):
        """CycleGAN losses of the IAM (call inside the tape): returns the generators' adversarial +
        cycle (+ ``structure``, when its weight is set) loss and records ``adversarial``, ``cycle``,
        ``discriminator`` (and ``structure``) in ``logs``.

        Each discriminator runs once on the translated images: the generators' adversarial loss and the
        discriminators' loss share those scores (the discriminators' optimizer takes the gradient of its
        loss with respect to the discriminators' weights only, so the translated images need no
        stop-gradient there). Without ``target_cycle`` the target's cycle ``G(F(target))`` is skipped."""
        w, iam = self.loss_weights, self.alignment
        with tf.name_scope("generator_target_to_assistant"):
            target_as_assistant = iam.target_to_assistant(target_images, training=True)
        with tf.name_scope("cycle_assistant"):
            cycle = losses.cycle_loss(assistant_images, iam.target_to_assistant(aligned, training=True))
        if self.target_cycle:
            with tf.name_scope("cycle_target"):
                target_cycle = iam.assistant_to_target(target_as_assistant, training=True)
                cycle += losses.cycle_loss(target_images, target_cycle)
        logs["cycle"] = self.average(cycle)
        with tf.name_scope("discriminators_on_translated"):
            aligned_scores = iam.target_discriminator(aligned, training=True)
            target_as_assistant_scores = iam.assistant_discriminator(target_as_assistant, training=True)
        logs["adversarial"] = self.average(
            losses.lsgan_generator_loss(aligned_scores) + losses.lsgan_generator_loss(target_as_assistant_scores)
        )
        with tf.name_scope("discriminators_on_real"):
            logs["discriminator"] = self.average(
                losses.lsgan_discriminator_loss(iam.target_discriminator(target_images, training=True), aligned_scores)
                + losses.lsgan_discriminator_loss(
                    iam.assistant_discriminator(assistant_images, training=True), target_as_assistant_scores
                )
            )
        generator_loss = w.adversarial * logs["adversarial"] + w.cycle * logs["cycle"]
        if w.structure:
            with tf.name_scope("structure_loss"):
                logs["structure"] = self.average(
                    losses.structure_loss(assistant_images, aligned)
                    + losses.structure_loss(target_images, target_as_assistant)
                )
            generator_loss += w.structure * logs["structure"]
        return generator_loss

    def discriminator_period(self):
        """k: the discriminators learn on every k-th step. ``discriminator_every`` if set; else (auto)
        :data:`AUTO_DISCRIMINATOR_EVERY` on one device and 1 under a distribution strategy, whose gradient
        all-reduce cannot sit inside the ``tf.cond`` that skips an update."""
        if self.discriminator_every is not None:
            return self.discriminator_every
        return 1 if tf.distribute.has_strategy() else AUTO_DISCRIMINATOR_EVERY

    def finish_step(self, tape, segmentor_loss, generator_loss, logs):
        """Apply the segmentor, generator and discriminator updates recorded on ``tape`` (the
        discriminators' only on every ``discriminator_every``-th step)."""
        losses_by_optimizer = {"segmentors": segmentor_loss}
        if generator_loss is None:
            return self.end_step(tape, losses_by_optimizer, logs, segmentor_loss)
        losses_by_optimizer["generators"] = generator_loss
        every = self.discriminator_period()
        if every == 1:
            losses_by_optimizer["discriminators"] = logs["discriminator"]
            return self.end_step(tape, losses_by_optimizer, logs, segmentor_loss)
        if tf.distribute.has_strategy():
            # A replica's apply_gradients all-reduces the gradients (a merge_call), which TensorFlow does not
            # allow inside a tf.cond: skipping updates needs the default strategy (one replica).
            fail(
                "alignment.discriminator_every",
                f"{self.discriminator_every} needs strategy default (or auto without GPUs): a distribution "
                "strategy cannot skip the discriminators' update on some steps",
            )
        # Read the step number before end_step counts this step: the discriminators learn on steps 0, k, 2k, ...
        due = tf.equal(self.step_counter % every, 0)
        logs = self.end_step(tape, losses_by_optimizer, logs, segmentor_loss)

        def update():
            self.step(tape, logs["discriminator"], "discriminators")
            return tf.constant(True)

        with tf.name_scope("discriminators_every_k"):
            tf.cond(due, update, lambda: tf.constant(False))
        return logs

    def image_panels(self, batch):
        assistant, target = batch["assistant"], batch["target"]
        aligned = self.alignment.align(assistant["image"]) if self.use_iam else assistant["image"]
        scale = float(max(self.num_classes - 1, 1))

        def labels(logits):
            return tf.cast(tf.argmax(logits, -1)[..., None], tf.float32) / scale

        return {
            "target_image": _to_unit(target["image"]),
            "assistant_image": _to_unit(assistant["image"]),
            "aligned_assistant": _to_unit(aligned),
            "target_prediction_syn": labels(self.synthetic_segmentor(target["image"])),
            "target_prediction_real": labels(self.real_segmentor(target["image"])),
            "target_ground_truth": tf.cast(target["label"][..., None], tf.float32) / scale,
        }

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "global_batch_size": self.global_batch_size,
            "segmentor": self.segmentor_args,
            "alignment": self.alignment_args,
            "loss_weights": asdict(self.loss_weights),
            "use_iam": self.use_iam,
            "kd_s2r": self.kd_s2r,
            "kd_r2s": self.kd_r2s,
            "pretrain_steps": self.pretrain_steps,
            "domain_norm": self.domain_norm,
            "syn_domain_norm": self.syn_domain_norm,
            "target_cycle": self.target_cycle,
            "discriminator_every": self.discriminator_every,
            "freeze_iam_after_warm_start": self.freeze_iam_after_warm_start,
            "name": self.name,
        }
