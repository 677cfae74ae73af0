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
``kd_r2s=False`` drop one direction of distillation (``kd_s2r=False`` both S_syn -> S_real terms) (without r2s and with ``syn_on_target=0``, S_syn
never sees a target image, so with domain normalisation it predicts target images with its
assistant-domain set, domain 0).

Beyond the paper (measured, see the README's method comparison): by default S_syn is also supervised on
the labelled target slices (``loss_weights.syn_on_target=1``), as S_real is (``0`` is the paper's S_syn),
and S_syn also teaches S_real on every target slice (``lambda_s2r_target=1``: both directions of
distillation on the target, as in deep mutual learning; ``0`` is the paper's step), which on the
abdominal phantom lifted MKD by 7 Dice points and on the cardiac one left it within noise.
"""

from dataclasses import asdict, fields

import tensorflow as tf

from mkd_tf import config, losses
from mkd_tf.errors import fail
from mkd_tf.models.alignment import ImageAlignmentModule
from mkd_tf.models.cross_modality import ASSISTANT_DOMAIN, TARGET_DOMAIN, CrossModalityModel, phase_start_step
from mkd_tf.models.optimizers import ROLES, default_optimizer
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
#: ``discriminator_every``'s "not given": ``mkd train``'s default (``None`` itself means automatic)
AUTO = "mkd train's default"


def network_settings(alignment_settings: dict) -> dict:
    """The ``alignment`` settings that are :class:`ImageAlignmentModule`'s arguments (not
    :data:`TRAINING_SETTINGS`)."""
    return {key: value for key, value in alignment_settings.items() if key not in TRAINING_SETTINGS}


#: MKD's loss weights and distillation temperature: its ``loss`` settings (:class:`mkd_tf.config.MKDLossSettings`,
#: whose fields give each weight's default, range and help; ``MKDLossWeights.from_settings(loss_section)``)
MKDLossWeights = config.MKDLossSettings


def _to_unit(images):
    """Min-max each image to [0, 1] for TensorBoard panels."""
    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
    return (images - low) / tf.maximum(high - low, 1e-6)


class MKDModel(CrossModalityModel):
    """IAM + two segmentors trained with online mutual knowledge distillation.

    A setting left ``None`` (``discriminator_every``: left out) takes ``mkd train``'s default
    (:func:`mkd_tf.config.method_defaults`), so that the model built without settings is the one
    ``mkd train`` builds.

    Args:
        num_classes: int, classes including background.
        global_batch_size: int, slices per stream per step over all replicas.
        segmentor: dict of segmentor settings (``kind`` and its arguments, see
            :func:`~mkd_tf.models.segmentor_factory.build_segmentor`).
        alignment: dict of :class:`ImageAlignmentModule` arguments.
        loss_weights: :class:`MKDLossWeights` or a dict of some of its fields (the others: the defaults).
        use_iam, kd_s2r, kd_r2s: ablation switches (all on = the full method).
        pretrain_steps: int, steps of :meth:`pretrain_step` (warm start on the assistant) before
            :meth:`train_step`; 0 starts with mutual distillation (``None``: the default schedule's,
            0.7 of 20 x 100 steps).
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
        optimizers: dict with keras optimizers under `"segmentors"`, `"generators"`, `"discriminators"`
            (a role left out: :func:`~mkd_tf.models.optimizers.default_optimizer`).

    Call: ``model.predict_probabilities(images, which="ensemble"|"syn"|"real")`` on target slices
    `(batch, height, width, 1)` -> `(batch, height, width, num_classes)`.

    Example:
        >>> model = MKDModel(5, 8, segmentor={"base_filters": 4, "depth": 2},
        ...                  alignment={"base_filters": 4, "num_blocks": 1, "disc_filters": 4})
        >>> model.build_for((32, 32, 1))
    """

    loss_settings = tuple(item.name for item in fields(MKDLossWeights))
    schedule_settings = ("mkd_pretrain",)
    reads_alignment = True

    def __init__(
        self,
        num_classes: int,
        global_batch_size: int,
        segmentor: dict | None = None,
        alignment: dict | None = None,
        loss_weights: "MKDLossWeights | dict | None" = None,
        use_iam: bool = True,
        kd_s2r: bool = True,
        kd_r2s: bool = True,
        optimizers: dict | None = None,
        pretrain_steps: int | None = None,
        domain_norm: bool | None = None,
        syn_domain_norm: bool | None = None,
        target_cycle: bool | None = None,
        discriminator_every: int | None = AUTO,
        freeze_iam_after_warm_start: bool | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, global_batch_size, **kwargs)
        # a setting not given is mkd train's default (one source of truth: mkd_tf.config)
        defaults = config.method_defaults("mkd")
        self.pretrain_steps = int(
            phase_start_step(defaults["schedule"], "mkd_pretrain") if pretrain_steps is None else pretrain_steps
        )
        self.segmentor_args = dict(segmentor if segmentor is not None else defaults["segmentor"])
        self.alignment_args = dict(alignment if alignment is not None else network_settings(defaults["alignment"]))
        if not isinstance(loss_weights, MKDLossWeights):
            loss_weights = MKDLossWeights.from_settings(loss_weights)
        self.loss_weights = loss_weights
        self.use_iam, self.kd_s2r, self.kd_r2s = bool(use_iam), bool(kd_s2r), bool(kd_r2s)
        iam_defaults = defaults["alignment"]
        target_cycle = iam_defaults["target_cycle"] if target_cycle is None else target_cycle
        discriminator_every = (
            iam_defaults["discriminator_every"] if discriminator_every == AUTO else discriminator_every
        )
        if freeze_iam_after_warm_start is None:
            freeze_iam_after_warm_start = iam_defaults["freeze_after_warm_start"]
        self.target_cycle = bool(target_cycle)
        self.discriminator_every = None if discriminator_every is None else int(discriminator_every)
        if self.discriminator_every is not None and self.discriminator_every < 1:
            raise ValueError(f"discriminator_every must be >= 1, got {discriminator_every}")
        # without a warm start there is nothing to freeze after: the IAM then learns throughout
        self.freeze_iam_after_warm_start = bool(freeze_iam_after_warm_start) and self.pretrain_steps > 0
        self.domain_norm = bool(defaults["segmentor"]["domain_norm"] if domain_norm is None else domain_norm)
        if syn_domain_norm is None:
            syn_domain_norm = defaults["segmentor"]["syn_domain_norm"]
        self.syn_domain_norm = self.domain_norm and bool(syn_domain_norm)
        domains = {"num_domains": 2, "default_domain": TARGET_DOMAIN} if self.domain_norm else {}
        syn_domains = {}
        if self.syn_domain_norm:
            syn_domains = domains if self.syn_sees_target() else dict(domains, default_domain=ASSISTANT_DOMAIN)
        self.synthetic_segmentor = build_segmentor(num_classes, self.segmentor_args, name="s_syn", **syn_domains)
        self.real_segmentor = build_segmentor(num_classes, self.segmentor_args, name="s_real", **domains)
        self.alignment = ImageAlignmentModule(name="iam", **self.alignment_args) if self.use_iam else None
        optimizers = optimizers or {}
        roles = ROLES if self.use_iam else ("segmentors",)
        chosen = {role: optimizers.get(role) or default_optimizer(role) for role in roles}
        self.segmentor_optimizer = chosen["segmentors"]
        if self.use_iam:
            self.generator_optimizer, self.discriminator_optimizer = chosen["generators"], chosen["discriminators"]

    def syn_sees_target(self):
        """Whether S_syn reads target images in training. Without S_real -> S_syn distillation, its own target
        supervision and S_syn -> S_real distillation on the target it does not: its target batch-norm set
        would keep the statistics copied at the end of the warm start, so on target images it then uses the
        set it trains on aligned images with (G makes those look like the target)."""
        weights = self.loss_weights
        return self.kd_r2s or weights.syn_on_target > 0 or (self.kd_s2r and weights.lambda_s2r_target > 0)

    @classmethod
    def from_settings(cls, config, num_classes, optimizer):
        loss_weights = MKDLossWeights.from_settings(config["loss"])
        if config["data"]["target_labelled"] == 0:
            loss_weights.syn_on_target = 0.0  # no labelled target slices: S_syn cannot learn from them
        return cls(
            num_classes,
            config["data"]["batch_size"],
            segmentor=config["segmentor"],
            alignment=network_settings(config["alignment"]),
            **{argument: config["alignment"][name] for name, argument in TRAINING_SETTINGS.items()},
            loss_weights=loss_weights,
            use_iam=config["ablation"]["iam"],
            kd_s2r=config["ablation"]["kd_s2r"],
            kd_r2s=config["ablation"]["kd_r2s"],
            pretrain_steps=phase_start_step(config["schedule"], "mkd_pretrain"),
            domain_norm=config["segmentor"]["domain_norm"],
            syn_domain_norm=config["segmentor"]["syn_domain_norm"],
            optimizers={role: optimizer(role) for role in ROLES},
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

    def part(self, segmentor):
        """``"syn"`` or ``"real"``: the segmentor's name in losses, logs and name scopes."""
        return "syn" if segmentor is self.synthetic_segmentor else "real"

    def on_assistant(self, segmentor, images):
        """Training-mode logits of ``segmentor`` on (aligned) assistant-domain images."""
        return segmentor(images, training=True, domain=self.domain_of(segmentor, ASSISTANT_DOMAIN))

    def on_target(self, segmentor, images):
        """Training-mode logits of ``segmentor`` on target-domain images."""
        return segmentor(images, training=True, domain=self.domain_of(segmentor, TARGET_DOMAIN))

    def iam_learns(self):
        """Whether the IAM learns in :meth:`train_step` (it has one, not frozen after the warm start)."""
        return self.use_iam and not self.freeze_iam_after_warm_start

    def align(self, assistant_images, training):
        """``aligned = G(assistant)``, `(batch, height, width, 1)`; the raw images without the IAM."""
        if not self.use_iam:
            return assistant_images
        with tf.name_scope("generator_align"):
            return self.alignment.assistant_to_target(assistant_images, training=training)

    # --- the named loss terms (each returns a scalar averaged over the global batch) ------------------
    def segmentation_term(self, logits, labels):
        """L_seg(labels, softmax(logits)) (:func:`~mkd_tf.losses.segmentation_loss`, cross-entropy + soft
        Dice) of every slice of a labelled stream."""
        return self.average(losses.segmentation_loss(labels, tf.nn.softmax(logits)))

    def syn_on_aligned(self, aligned, assistant_labels):
        """S_syn's logits on the aligned images and its supervised loss on them with the assistant's labels
        (the paper's supervised loss of S_syn)."""
        with tf.name_scope("segmentor_syn_on_aligned"):
            logits = self.on_assistant(self.synthetic_segmentor, aligned)
        return logits, self.segmentation_term(logits, assistant_labels)

    def supervised_on_target(self, segmentor, labelled_target):
        """Segmentation loss of ``segmentor`` on the labelled target slices (with the target's batch-norm
        set), averaged over the global batch; slices without a label count zero (S_real: the paper's
        supervised loss of S_real; S_syn: ``syn_on_target``, beyond the paper)."""
        with tf.name_scope(f"segmentor_{self.part(segmentor)}_on_labelled_target"):
            return self.supervised_loss(self.on_target(segmentor, labelled_target["image"]), labelled_target)

    def syn_teaches_real(self, syn_on_aligned, aligned):
        """S_syn -> S_real distillation on the aligned images (the paper's first KD term,
        :meth:`distillation_term`); the aligned images are stop-gradient too."""
        with tf.name_scope("segmentor_real_on_aligned"):
            student = self.on_assistant(self.real_segmentor, tf.stop_gradient(aligned))
        return self.distillation_term(syn_on_aligned, student)

    def both_on_target(self, target_images):
        """Training-mode logits of S_real, then of S_syn, on every target slice (labelled or not)."""
        with tf.name_scope("segmentor_real_on_target"):
            real_on_target = self.on_target(self.real_segmentor, target_images)
        with tf.name_scope("segmentor_syn_on_target"):
            syn_on_target = self.on_target(self.synthetic_segmentor, target_images)
        return real_on_target, syn_on_target

    def distillation_term(self, teacher_logits, student_logits):
        """KL(teacher_T || student_T) T^2 (:func:`~mkd_tf.losses.distillation_loss`), the teacher stop-gradient:
        every KD term (S_syn -> S_real on aligned images; on the target S_real -> S_syn, the paper's second,
        and S_syn -> S_real, ``lambda_s2r_target``: both directions there, as in deep mutual learning)."""
        teacher = tf.stop_gradient(teacher_logits)
        return self.average(losses.distillation_loss(teacher, student_logits, self.loss_weights.temperature))

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
        """One step of mutual distillation after the warm start: the paper's method section, top to bottom.
        ``batch``: the streams of :mod:`mkd_tf.models.cross_modality`; returns the logged scalar losses,
        ``total`` (the segmentors' objective) included."""
        assistant, target = batch["assistant"], batch["target"]
        labelled_target = batch.get("target_labelled")
        w, logs = self.loss_weights, {}
        if not self.iam_learns():  # frozen (or no) IAM: G runs outside the tape, so no gradient reaches it
            aligned = self.align(assistant["image"], training=False)
        with tf.GradientTape(persistent=True) as tape:
            # 1. Align the assistant images to the target's appearance: aligned = G(assistant).
            if self.iam_learns():
                aligned = self.align(assistant["image"], training=True)

            # 2. Supervised segmentation: S_syn on the aligned images, S_real (and S_syn) on labelled target.
            syn_on_aligned, logs["seg_syn"] = self.syn_on_aligned(aligned, assistant["label"])
            segmentation = logs["seg_syn"]
            if labelled_target is not None:
                logs["seg_real"] = self.supervised_on_target(self.real_segmentor, labelled_target)
                segmentation += logs["seg_real"]
                if w.syn_on_target:
                    logs["seg_syn_target"] = self.supervised_on_target(self.synthetic_segmentor, labelled_target)
                    segmentation += w.syn_on_target * logs["seg_syn_target"]

            # 3. Mutual distillation; each teacher (and the aligned images) stop-gradient.
            distillation = 0.0
            if self.kd_s2r:
                logs["kd_s2r"] = self.syn_teaches_real(syn_on_aligned, aligned)
                distillation += w.lambda_s2r * logs["kd_s2r"]
            s2r_on_target = self.kd_s2r and w.lambda_s2r_target > 0
            if self.kd_r2s or s2r_on_target:
                real_on_target, syn_on_target = self.both_on_target(target["image"])
            if self.kd_r2s:
                logs["kd_r2s"] = self.distillation_term(real_on_target, syn_on_target)
                distillation += w.lambda_r2s * logs["kd_r2s"]
            if s2r_on_target:
                logs["kd_s2r_target"] = self.distillation_term(syn_on_target, real_on_target)
                distillation += w.lambda_s2r_target * logs["kd_s2r_target"]
            segmentor_loss = segmentation + distillation

            # 4. Image alignment: adversarial + cycle (+ structure); S_syn's segmentation loss keeps anatomy.
            generator_loss = None
            if self.iam_learns():
                generator_loss = self.alignment_losses(assistant["image"], target["image"], aligned, logs)
                generator_loss += w.segmentation_to_generator * logs["seg_syn"]

        # 5. Separate optimizers: segmentors, generators, discriminators.
        return self.finish_step(tape, segmentor_loss, generator_loss, logs)

    def pretrain_step(self, batch):
        """Warm start, the first ``pretrain_steps`` steps: both segmentors learn the assistant's labels on
        raw assistant images (no distillation: exactly the first phase of the finetune baseline), while
        the IAM trains on its adversarial and cycle losses alone, so that G already aligns when
        distillation starts."""
        assistant, target = batch["assistant"], batch["target"]
        logs = {}
        with tf.GradientTape(persistent=True) as tape:
            for part, segmentor in self.segmentors().items():
                with tf.name_scope(f"segmentor_{part}_on_assistant"):
                    logits = self.on_assistant(segmentor, assistant["image"])
                logs[f"seg_{part}"] = self.segmentation_term(logits, assistant["label"])
            segmentor_loss = logs["seg_syn"] + logs["seg_real"]
            generator_loss = None
            if self.use_iam:
                aligned = self.align(assistant["image"], training=True)
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
        from scratch."""
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
