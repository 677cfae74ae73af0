"""The registries: every training method, every named variant of one, every segmentor architecture.

Each is registered once, here, and everything that lists or builds them reads this module: the
``method`` and ``segmentor.kind`` settings (:mod:`mkd_tf.config`), building a method's model and
knowing whether it needs labelled target volumes (:mod:`mkd_tf.training`), the variants of
``mkd compare`` (:mod:`mkd_tf.compare`), and the CLI's choices and ``--help``.

A registration names its class as ``"module:Class"``, imported only when a model is built: this module
(and so the config checks and ``mkd --help``) imports no TensorFlow. That keeps ``mkd --help`` at
about 0.2 s instead of the 3-13 s a TensorFlow import takes here (README, "Architecture").

To add
    a method: a module in ``mkd_tf/models/`` with a
        :class:`~mkd_tf.models.cross_modality.CrossModalityModel` subclass whose classmethod
        ``from_settings(config, num_classes, optimizer)`` builds it, plus one :func:`register_method`;
    a variant of a method (other settings, e.g. an ablation): one :func:`register_variant`;
    a segmentor architecture: a module with a Keras model class honouring :data:`SEGMENTOR_CONTRACT`
        (see :class:`~mkd_tf.models.segmentor.Segmentor`), plus one :func:`register_segmentor`.

Example:
    >>> method_of("mkd-no-iam").name, variant_overrides("mkd-no-iam")
    ('mkd', {'ablation': {'iam': False}})
    >>> METHODS["finetune"].needs_labelled_target
    True
"""

import importlib
from dataclasses import dataclass, field

from mkd_tf.rules import fraction, integer


@dataclass(frozen=True)
class Method:
    """A training method.

    Args:
        name: its name in configs, ``--method`` and ``mkd compare --methods``.
        model: ``"module:Class"`` of its model; built by ``Class.from_settings(config, num_classes,
            optimizer)``.
        predictors: names of its predictors on target slices, the reported (main) one last.
        needs_labelled_target: it cannot train without labelled target training volumes.
        domain_norm: ``None`` if its segmentors ignore the ``segmentor.domain_norm`` setting (one batch-norm
            set per modality), else the method's default for it (the setting left at null).
        summary: one line for ``--help`` and the README.
    """

    name: str
    model: str
    predictors: tuple
    needs_labelled_target: bool
    domain_norm: bool | None
    summary: str


@dataclass(frozen=True)
class Variant:
    """A registered method trained with other settings (an ablation, a switch turned on or off).

    Args:
        name: its name in ``mkd compare --methods``.
        method: the registered method it changes.
        overrides: nested dict of settings merged over the shared config.
        summary: one line for ``--help``.
    """

    name: str
    method: str
    overrides: dict
    summary: str


@dataclass(frozen=True)
class SegmentorKind:
    """A segmentor architecture (``segmentor.kind``); its model honours :data:`SEGMENTOR_CONTRACT`.

    Args:
        name: the value of ``segmentor.kind``.
        model: ``"module:Class"`` of its Keras model.
        defaults: its own settings and their defaults (the shared ``kind``, ``norm``, ``domain_norm``
            and ``syn_domain_norm`` are not among them).
        rules: a :class:`mkd_tf.rules.Rule` for each of its settings.
        summary: one line for the README.
        help: one line of help per setting (docs/configuration.md).
    """

    name: str
    model: str
    defaults: dict
    rules: dict
    summary: str = ""
    help: dict = field(default_factory=dict)


#: everything the methods, the training loop and export call on a segmentor model (a ``keras.Model``):
#: member -> what it must do. ``tests/test_registry.py`` trains a toy kind that has only these through a
#: default MKD run, past the end of its warm start.
SEGMENTOR_CONTRACT = {
    "__init__(num_classes, *, norm, num_domains, default_domain, name, **its settings)": (
        "num_domains > 1: one set of normalisation weights per input domain (0: assistant, 1: target), "
        "default_domain the one used when call() is given none (inference, export)"
    ),
    "build(input_shape)": "creates every weight (the optimizers are built right after)",
    "call(images, training=False, domain=None)": "logits (batch, height, width, num_classes) of (batch, height, width, 1)",
    "domain_variable_pairs(source, destination)": (
        "[(weight of domain source, the same weight of domain destination)] over every per-domain weight and "
        "statistic: MKD starts the target's set from the assistant's at the end of its warm start"
    ),
    "output_layer_name (class attribute, optional)": "its last layer, kept float32 under mixed precision",
}
METHODS = {}
VARIANTS = {}
SEGMENTORS = {}


def register_method(name, model, predictors, needs_labelled_target, summary, domain_norm=None):
    """Register a method (see :class:`Method`); returns it."""
    if name in METHODS or name in VARIANTS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = Method(name, model, tuple(predictors), bool(needs_labelled_target), domain_norm, summary)
    return METHODS[name]


def register_variant(name, method, overrides, summary):
    """Register a variant of a registered method (see :class:`Variant`); returns it."""
    if name in METHODS or name in VARIANTS:
        raise ValueError(f"method {name!r} is already registered")
    if method not in METHODS:
        raise ValueError(f"variant {name!r} changes unknown method {method!r}")
    VARIANTS[name] = Variant(name, method, overrides, summary)
    return VARIANTS[name]


def register_segmentor(name, model, defaults, rules, summary="", help=None):
    """Register a segmentor architecture (see :class:`SegmentorKind`); returns it."""
    if name in SEGMENTORS:
        raise ValueError(f"segmentor kind {name!r} is already registered")
    if set(defaults) != set(rules):
        raise ValueError(f"segmentor kind {name!r}: defaults and rules must name the same settings")
    SEGMENTORS[name] = SegmentorKind(name, model, dict(defaults), dict(rules), summary, dict(help or {}))
    return SEGMENTORS[name]


def method_of(name):
    """The :class:`Method` of a method or variant ``name``; ``KeyError`` if neither is registered."""
    if name in VARIANTS:
        return METHODS[VARIANTS[name].method]
    return METHODS[name]


def variant_overrides(name):
    """The settings a variant changes (``{}`` for a plain method)."""
    return VARIANTS[name].overrides if name in VARIANTS else {}


def names():
    """Every registered method, then every variant."""
    return list(METHODS) + list(VARIANTS)


def load(reference):
    """Import ``"module:attribute"`` and return the attribute."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


# --- methods --------------------------------------------------------------------------------------
register_method(
    "mkd",
    "mkd_tf.models.mkd:MKDModel",
    ("syn", "real", "ensemble"),
    False,
    domain_norm=True,
    summary="online mutual knowledge distillation with image alignment (the paper)",
)
register_method(
    "target-only",
    "mkd_tf.models.baselines:TargetOnlyModel",
    ("real",),
    True,
    summary="one segmentor on labelled target slices",
)
register_method(
    "assistant-only",
    "mkd_tf.models.baselines:AssistantOnlyModel",
    ("syn",),
    False,
    summary="one segmentor on raw assistant slices, applied to the target",
)
register_method(
    "joint",
    "mkd_tf.models.baselines:JointModel",
    ("joint",),
    True,
    domain_norm=True,
    summary="one segmentor on both modalities' labelled slices at once",
)
register_method(
    "finetune",
    "mkd_tf.models.baselines:FinetuneModel",
    ("finetune",),
    True,
    domain_norm=False,
    summary="one segmentor on the assistant first, then on the target",
)
register_method(
    "ummkd",
    "mkd_tf.models.ummkd:UMMKDModel",
    ("ummkd",),
    True,
    summary="shared kernels, modality-specific batch norm, class-wise KD (Dou et al. 2020)",
)

# --- variants: ablations of MKD's parts and switches, and the baselines' counterparts --------------
register_variant("mkd-no-iam", "mkd", {"ablation": {"iam": False}}, "MKD without image alignment")
register_variant("mkd-no-kd-s2r", "mkd", {"ablation": {"kd_s2r": False}}, "MKD without S_syn -> S_real distillation")
register_variant("mkd-no-kd-r2s", "mkd", {"ablation": {"kd_r2s": False}}, "MKD without S_real -> S_syn distillation")
register_variant(
    "iam-only",
    "mkd",
    # One batch-norm set: S_syn is applied to CT with the statistics of the aligned MRI it was trained on
    # (with one set per domain and no distillation its CT set would never see a CT image).
    # Its checkpoint is selected by S_syn: with no labelled target S_real learns nothing, and the ensemble
    # would average S_syn with an untrained segmentor.
    {
        "ablation": {"kd_s2r": False, "kd_r2s": False},
        "segmentor": {"domain_norm": False},
        "schedule": {"select_by": "syn"},
    },
    "the IAM-only pipeline: its [syn] row is a segmentor trained on aligned assistant images (no distillation)",
)
register_variant("mkd-no-pretrain", "mkd", {"schedule": {"mkd_pretrain": 0.0}}, "MKD without the warm start")
register_variant(
    "mkd-warm-start-0.5",
    "mkd",
    {"schedule": {"mkd_pretrain": 0.5}},
    "MKD with the warm start over half the steps (an earlier default; 0.7 now)",
)
register_variant(
    "mkd-plain-iam",
    "mkd",
    {"alignment": {"residual": False}},
    "MKD with the plain (not identity-initialised) generators",
)
register_variant("mkd-no-ema", "mkd", {"optimizer": {"ema": False}}, "MKD with raw instead of averaged weights")
register_variant(
    "mkd-no-domain-norm",
    "mkd",
    {"segmentor": {"domain_norm": False}},
    "MKD with one batch-norm set shared by both domains in each segmentor",
)
register_variant(
    "mkd-syn-domain-norm",
    "mkd",
    {"segmentor": {"syn_domain_norm": True}},
    "MKD with one batch-norm set per domain in S_syn too (an earlier default)",
)
register_variant(
    "mkd-cyclegan-iam",
    "mkd",
    {"alignment": {"skip_kernel": 1}, "loss": {"cycle": 10.0, "structure": 0.0}},
    "MKD with CycleGAN's IAM losses (cycle 10, no structure loss) and G(x) = x + r(x) (the earlier IAM)",
)
register_variant(
    "mkd-no-syn-on-target",
    "mkd",
    {"loss": {"syn_on_target": 0.0}},
    "MKD without S_syn's supervision on the labelled target images (the paper's S_syn)",
)
register_variant(
    "mkd-no-s2r-on-target",
    "mkd",
    {"loss": {"lambda_s2r_target": 0.0}},
    "MKD with S_syn -> S_real distillation on aligned images only, as the paper (an earlier default)",
)
register_variant(
    "mkd-full-iam",
    "mkd",
    {"alignment": {"target_cycle": True, "discriminator_every": 1, "freeze_after_warm_start": False}},
    "MKD training the IAM as the paper does: both cycles, discriminators every step, through distillation "
    "(the default before the cheaper IAM; its generators were also twice as large: alignment base_filters "
    "32, num_blocks 6)",
)
register_variant(
    "finetune-domain-norm",
    "finetune",
    {"segmentor": {"domain_norm": True}},
    "finetune with one batch-norm set per modality",
)
register_variant(
    "joint-no-domain-norm",
    "joint",
    {"segmentor": {"domain_norm": False}},
    "joint with one batch-norm set shared by both modalities",
)
register_variant("finetune-no-ema", "finetune", {"optimizer": {"ema": False}}, "finetune with raw weights")
register_variant(
    "finetune-switch-0.5",
    "finetune",
    {"schedule": {"finetune_switch": 0.5}},
    "finetune switching to the target half-way (an earlier default; 0.7 now)",
)
register_variant("target-only-no-ema", "target-only", {"optimizer": {"ema": False}}, "target-only with raw weights")

# --- segmentor architectures ----------------------------------------------------------------------
register_segmentor(
    "unet",
    "mkd_tf.models.segmentor:Segmentor",
    defaults={"base_filters": 32, "depth": 4, "dropout": 0.0},
    rules={"base_filters": integer(1), "depth": integer(1, 8), "dropout": fraction(high_open=True)},
    summary="2-D U-Net (Ronneberger et al. 2015): base_filters * 2**level channels, depth downsamplings",
    help={
        "base_filters": "unet: channels of the first level, doubled at every downsampling",
        "depth": "unet: number of downsamplings",
        "dropout": "unet: dropout rate on the bottleneck features during training (0: none)",
    },
)
