"""Training configuration: defaults, YAML files, command-line overrides, the resolved record.

Every hyper-parameter lives here once (a segmentor architecture's own settings live with its
registration in :mod:`mkd_tf.registry`). `mkd train --config cfg.yaml` merges the file over the
defaults, then command-line flags over that; the result is written to `RUN/config.yaml`.
Only `yaml.safe_load` is used.
"""

import copy
from pathlib import Path

import yaml

from mkd_tf import registry
from mkd_tf.errors import fail
from mkd_tf.files import write_text_atomic
from mkd_tf.rules import BOOL, NON_NEGATIVE, POSITIVE, Rule, fraction, integer

#: the registered methods (:mod:`mkd_tf.registry`)
METHODS = tuple(registry.METHODS)
#: every registered method's predictor names (``schedule.select_by`` must be one of the chosen method's)
PREDICTORS = tuple(dict.fromkeys(name for method in registry.METHODS.values() for name in method.predictors))
STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
NORMS = ("batch", "instance", "none")  # mkd_tf.models.segmentor.NORMS (config does not import models)
LR_SCHEDULES = ("constant", "cosine")  # optimizer.lr_schedule (mkd_tf.phased_cosine_decay)
#: settings renamed since runs were first written: an old config file or run folder still loads
RENAMED = {("data", "target_labeled"): "target_labelled"}
#: settings added since runs were first written, with the value every run written before had
ADDED_SINCE = {
    ("segmentor", "kind"): "unet",
    ("segmentor", "domain_norm"): False,
    ("segmentor", "syn_domain_norm"): True,
    ("loss", "syn_on_target"): 0.0,  # before it existed S_syn learnt the target only by distillation
    ("alignment", "skip_kernel"): 1,
    ("loss", "structure"): 0.0,
    ("loss", "pretrain_on_target"): 0.0,
    ("loss", "average_teachers"): False,
    ("loss", "student_perturbation"): 0.0,
    ("loss", "aligned_as_target"): 0.0,
    ("loss", "real_to_generator"): 0.0,
    ("loss", "pseudo_labels"): 0.0,
    ("loss", "pseudo_label_threshold"): 0.9,
    ("optimizer", "lr_schedule"): "constant",
    ("alignment", "target_cycle"): True,
    ("alignment", "discriminator_every"): 1,
    ("alignment", "freeze_after_warm_start"): False,
}
#: settings added since runs were first written that an older run's config.yaml lacks and that take today's
#: default; a run's config.yaml must hold every other setting (and those of :data:`ADDED_SINCE` may be missing)
DEFAULTED_SINCE = {
    (None, "precision"),
    (None, "jit_compile"),
    (None, "deterministic"),
    (None, "checkpoint_every"),
    (None, "worker_timeout"),
    ("schedule", "mkd_pretrain"),
    ("schedule", "select_by"),
    ("alignment", "residual"),
    ("loss", "real_on_aligned"),
    ("loss", "lambda_s2r_target"),
    ("optimizer", "ema"),
    ("optimizer", "ema_momentum"),
}
#: settings of how a run executes, not of what it learns: a resumed run may change them.
#: ``precision`` is *not* one of them: float16 changes the numbers learnt and adds loss-scale state to
#: the checkpoints, so a run resumes only in the precision it started with.
RUNTIME_SETTINGS = ("strategy", "jit_compile", "deterministic", "checkpoint_every", "worker_timeout")

DEFAULTS = {
    "method": "mkd",
    "seed": 0,
    "strategy": "auto",
    # Keras mixed-precision policy; networks' outputs and every loss stay float32
    "precision": "float32",
    "jit_compile": False,  # XLA-compile the distributed training step
    # bit-reproducible training: deterministic kernels, no Grappler graph rewrites (README, multi-worker training)
    "deterministic": False,
    "checkpoint_every": 10.0,  # minutes between step-level checkpoints inside an epoch (0: epoch ends only)
    # multi-worker: seconds a worker waits for the cluster at start and for one collective operation
    # (a step's all-reduce) before stopping with an error; must exceed the chief's validation time
    "worker_timeout": 600.0,
    "data": {
        "batch_size": 8,  # slices per stream per step, over all replicas
        "augment": True,
        "target_labelled": None,  # keep labels of only N of the cache's labelled target training volumes
    },
    "schedule": {
        "epochs": 20,
        "steps_per_epoch": 100,
        # finetune: fraction of steps on the assistant before switching to the target; 0.7 (MKD's warm-start
        # share) measured +2.6 +- 0.9 Dice over 0.5 on the phantom benchmark (3 seeds, every seed)
        "finetune_switch": 0.7,
        # mkd: fraction of steps of warm start (both segmentors on raw assistant slices, as finetune's
        # first phase; the IAM trains alone) before mutual distillation; 0 = none. 0.7 measured +0.9 +- 0.2
        # Dice over 0.5 on the phantom benchmark (3 seeds, every seed; README, method comparison)
        "mkd_pretrain": 0.7,
        "validation_batch": 32,
        # the predictor whose validation Dice selects the best checkpoint (null: the method's reported one,
        # e.g. mkd's ensemble); the IAM-only pipeline selects by "syn", as its S_real may learn nothing
        "select_by": None,
    },
    # kind: a registered architecture (its own settings follow, with its defaults); domain_norm (mkd, joint,
    # finetune): one batch-norm set per modality, shared convolutions (needs norm: batch)
    # domain_norm null: the method's registered default (mkd, joint: true; finetune: false; others ignore it);
    # syn_domain_norm (mkd, with domain_norm): false gives S_syn one batch-norm set for aligned and target images
    # (S_real keeps one per domain), the paper's S_syn. Measured against true: +0.2 +- 0.6 Dice over 6 seeds
    # at 1000 steps, -0.6 +- 0.2 at 2000; without the IAM it loses 3.6 +- 1.0, but that is S_syn's moving
    # statistics mixing raw MRI and CT (benchmarks/target_statistics.py); README, method comparison
    "segmentor": {
        "kind": "unet",
        **registry.SEGMENTORS["unet"].defaults,
        "norm": "batch",
        "domain_norm": None,
        "syn_domain_norm": False,
    },
    "alignment": {
        "base_filters": 16,
        "num_blocks": 3,
        "disc_filters": 64,
        "disc_layers": 3,
        "norm": "instance",
        "residual": True,  # G(x) = x + r(x), starts as the identity
        # odd; > 1: G(x) = s(x) + r(x), s a learnable identity-initialised k x k convolution (1: G(x) = x + r(x));
        # 7, with the cycle and structure weights below, closes more of the assistant-target intensity gap
        "skip_kernel": 7,
        # mkd, how the IAM trains (benchmarks/README.md, "Where MKD's FLOPs go"): false skips the target's cycle
        # |target - G(F(target))| (the assistant's cycle stays); k > 1 updates the discriminators on every k-th
        # step only (null: 2 on one device, 1 under a distribution strategy); freeze_after_warm_start stops the
        # IAM learning when distillation starts (then only G's forward pass runs; no warm start: no freeze).
        # These defaults and the generators' size (base_filters 16, num_blocks 3) halve the IAM's cost against
        # the paper's IAM (variant mkd-full-iam, generators 32 / 6) at the same Dice on both phantoms.
        "target_cycle": False,
        "discriminator_every": None,
        "freeze_after_warm_start": True,
    },
    "loss": {
        "temperature": 2.0,
        "lambda_s2r": 1.0,
        "lambda_r2s": 1.0,
        "adversarial": 1.0,
        "cycle": 0.3,  # CycleGAN's 10 holds G to the assistant's contrast; measured with syn_domain_norm false (README)
        "segmentation_to_generator": 1.0,
        "real_on_aligned": 0.0,  # mkd: S_real also supervised on aligned assistant images
        "syn_on_target": 1.0,  # mkd: S_syn also supervised on the labelled target images (0: the paper)
        "lambda_s2r_target": 0.0,  # mkd: S_syn -> S_real distillation also on target images (0: the paper)
        "structure": 3.0,  # mkd: contrast-free structure loss between each image and its translation (0: the paper)
        "pretrain_on_target": 0.0,  # mkd: both segmentors also learn the labelled target in the warm start
        "average_teachers": False,  # mkd: distil from the teachers' moving-average weights (needs optimizer.ema)
        "student_perturbation": 0.0,  # mkd: KD students see a re-contrasted, noisy view (strength s; 0: the paper)
        "aligned_as_target": 0.0,  # mkd: S_real also learns aligned assistant images through its target set
        "real_to_generator": 0.0,  # mkd: G also minimises that loss (S_real must read G(assistant) correctly)
        "pseudo_labels": 0.0,  # mkd: both segmentors learn the pair's confident average on target images
        "pseudo_label_threshold": 0.9,  # mkd: the confidence a pseudo-label needs
        "ummkd_temperature": 2.0,
        "ummkd_weight": 1.0,
    },
    "optimizer": {
        "segmentor_lr": 1.0e-3,
        "generator_lr": 2.0e-4,
        "discriminator_lr": 2.0e-4,
        "gan_beta_1": 0.5,
        # every method: evaluate, select and export an exponential moving average of the segmentor weights
        "ema": True,
        "ema_momentum": 0.99,
        # every method: "cosine" decays the segmentors' learning rate within each phase of the method's
        # schedule (mkd: warm start, distillation; finetune: assistant, target), restarting at each phase
        "lr_schedule": "constant",
    },
    "ablation": {"iam": True, "kd_s2r": True, "kd_r2s": True},
}


#: every setting's type and range, checked before anything is written
RULES = {
    "method": Rule("choice", choices=METHODS),
    "seed": integer(0),
    "strategy": Rule("choice", choices=STRATEGIES),
    "precision": Rule("choice", choices=PRECISIONS),
    "jit_compile": BOOL,
    "deterministic": BOOL,
    "checkpoint_every": NON_NEGATIVE,
    "worker_timeout": POSITIVE,
    "data": {"batch_size": integer(1), "augment": BOOL, "target_labelled": integer(0, optional=True)},
    "schedule": {
        "epochs": integer(1),
        "steps_per_epoch": integer(1),
        "finetune_switch": fraction(),
        "mkd_pretrain": fraction(high_open=True),
        "validation_batch": integer(1),
        "select_by": Rule("choice", choices=PREDICTORS, optional=True),
    },
    # plus the rules of the chosen kind's own settings (registry.SEGMENTORS[kind].rules)
    "segmentor": {
        "kind": Rule("choice", choices=tuple(registry.SEGMENTORS)),
        "norm": Rule("choice", choices=NORMS),
        "domain_norm": Rule("bool", optional=True),
        "syn_domain_norm": BOOL,
    },
    "alignment": {
        "base_filters": integer(1),
        "num_blocks": integer(0),
        "disc_filters": integer(1),
        "disc_layers": integer(1, 8),
        "norm": Rule("choice", choices=NORMS),
        "residual": BOOL,
        "skip_kernel": integer(1, 15),
        "target_cycle": BOOL,
        "discriminator_every": integer(1, optional=True),
        "freeze_after_warm_start": BOOL,
    },
    "loss": {
        "temperature": POSITIVE,
        "lambda_s2r": NON_NEGATIVE,
        "lambda_r2s": NON_NEGATIVE,
        "adversarial": NON_NEGATIVE,
        "cycle": NON_NEGATIVE,
        "segmentation_to_generator": NON_NEGATIVE,
        "real_on_aligned": NON_NEGATIVE,
        "syn_on_target": NON_NEGATIVE,
        "lambda_s2r_target": NON_NEGATIVE,
        "structure": NON_NEGATIVE,
        "pretrain_on_target": NON_NEGATIVE,
        "average_teachers": BOOL,
        "student_perturbation": fraction(high_open=True),
        "aligned_as_target": NON_NEGATIVE,
        "real_to_generator": NON_NEGATIVE,
        "pseudo_labels": NON_NEGATIVE,
        "pseudo_label_threshold": fraction(high_open=True),
        "ummkd_temperature": POSITIVE,
        "ummkd_weight": NON_NEGATIVE,
    },
    "optimizer": {
        "segmentor_lr": POSITIVE,
        "generator_lr": POSITIVE,
        "discriminator_lr": POSITIVE,
        "gan_beta_1": fraction(high_open=True),
        "ema": BOOL,
        "ema_momentum": fraction(high_open=True),
        "lr_schedule": Rule("choice", choices=LR_SCHEDULES),
    },
    "ablation": {"iam": BOOL, "kd_s2r": BOOL, "kd_r2s": BOOL},
}


#: one line of help per setting, by dotted name (docs/configuration.md is generated from this,
#: :data:`DEFAULTS` and :data:`RULES` by ``python -m mkd_tf.config_reference``)
HELP = {
    "method": "the method to train (a registered method; variants are chosen with mkd compare --methods)",
    "seed": "seed of the networks' initial weights, the batch order and the augmentation",
    "strategy": "auto: multi-worker if TF_CONFIG names several workers, else every visible GPU, else the CPU",
    "precision": "Keras mixed-precision policy; networks' outputs and every loss stay float32; a run resumes only in its own",
    "jit_compile": "XLA-compile the distributed training step",
    "deterministic": "bit-reproducible training: deterministic kernels and no Grappler graph rewrites",
    "checkpoint_every": "minutes between step checkpoints inside an epoch (0: at epoch ends only)",
    "worker_timeout": "multi-worker: seconds to wait for the cluster at start and for one collective operation",
    "data.batch_size": "slices per stream per step, over all replicas (the global batch)",
    "data.augment": "random rotation, scale, flip, gamma, contrast and noise on training slices",
    "data.target_labelled": "keep the labels of only N of the cache's labelled target training volumes (null: all)",
    "schedule.epochs": "number of epochs; validation, the best checkpoint and resumption happen at epoch ends",
    "schedule.steps_per_epoch": "training steps per epoch",
    "schedule.finetune_switch": "finetune: fraction of the steps on the assistant before switching to the target",
    "schedule.mkd_pretrain": "mkd: fraction of the steps of warm start on raw assistant slices before distillation (0: none)",
    "schedule.validation_batch": "slices per batch when predicting the validation volumes",
    "schedule.select_by": "predictor whose validation Dice selects best/ (null: the method's reported one)",
    "segmentor.kind": "segmentor architecture (a registered kind; its own settings follow)",
    "segmentor.base_filters": "unet: channels of the first level, doubled at every downsampling",
    "segmentor.depth": "unet: number of downsamplings",
    "segmentor.dropout": "unet: dropout rate on the bottleneck features during training (0: none)",
    "segmentor.norm": "normalisation layers of the segmentors",
    "segmentor.domain_norm": "one batch-norm set per modality with shared convolutions (null: the method's default)",
    "segmentor.syn_domain_norm": "mkd, with domain_norm: per-domain batch-norm sets in S_syn too (false: one set, the paper's)",
    "alignment.base_filters": "IAM generators' channels of the first level",
    "alignment.num_blocks": "IAM generators' residual blocks",
    "alignment.disc_filters": "PatchGAN discriminators' channels of the first layer",
    "alignment.disc_layers": "PatchGAN discriminators' strided layers",
    "alignment.norm": "normalisation layers of the IAM",
    "alignment.residual": "generators compute G(x) = x + r(x) and start as the identity",
    "alignment.skip_kernel": "odd; > 1: the identity path is a learnable identity-initialised k x k convolution",
    "alignment.target_cycle": "mkd: false skips the target cycle G(F(target)); the assistant's cycle stays",
    "alignment.discriminator_every": (
        "mkd: update the discriminators on every k-th step only (1: every step; > 1 on one device only; "
        "null: 2 on one device, 1 under a distribution strategy)"
    ),
    "alignment.freeze_after_warm_start": (
        "mkd: after the warm start the IAM stops training and only G's forward pass runs (no warm start: it "
        "trains throughout)"
    ),
    "loss.temperature": "distillation temperature T of the KD terms",
    "loss.lambda_s2r": "weight of S_syn -> S_real distillation (on aligned assistant images)",
    "loss.lambda_r2s": "weight of S_real -> S_syn distillation (on all target slices)",
    "loss.adversarial": "weight of the IAM's least-squares adversarial loss",
    "loss.cycle": "weight of the IAM's L1 cycle loss (CycleGAN: 10)",
    "loss.segmentation_to_generator": "weight of S_syn's segmentation loss flowing into G (keeps anatomy)",
    "loss.real_on_aligned": "mkd: S_real also supervised on aligned assistant images",
    "loss.syn_on_target": "mkd: S_syn also supervised on the labelled target images (0: the paper)",
    "loss.lambda_s2r_target": "mkd: S_syn -> S_real distillation also on target images (0: the paper)",
    "loss.structure": "mkd: contrast-free structure loss between each image and its translation (0: the paper)",
    "loss.pretrain_on_target": "mkd: both segmentors also learn the labelled target during the warm start",
    "loss.average_teachers": "mkd: distil from the teachers' moving-average weights (needs optimizer.ema)",
    "loss.student_perturbation": "mkd: KD students see a re-contrasted, noisy view of strength s (0: the paper)",
    "loss.aligned_as_target": "mkd: S_real also learns aligned assistant images through its target batch-norm set",
    "loss.real_to_generator": "mkd: G also minimises S_real's segmentation loss on aligned assistant images",
    "loss.pseudo_labels": "mkd: weight of both segmentors learning their confident average on target slices",
    "loss.pseudo_label_threshold": "mkd: the confidence a pseudo-label needs",
    "loss.ummkd_temperature": "ummkd: temperature of the class-wise KL term",
    "loss.ummkd_weight": "ummkd: weight of the class-wise KL term",
    "optimizer.segmentor_lr": "Adam learning rate of the segmentors (tune it with mkd compare --tune)",
    "optimizer.generator_lr": "Adam learning rate of the IAM's generators",
    "optimizer.discriminator_lr": "Adam learning rate of the IAM's discriminators",
    "optimizer.gan_beta_1": "Adam beta_1 of the generators and discriminators",
    "optimizer.ema": "evaluate, select and export an exponential moving average of the segmentor weights",
    "optimizer.ema_momentum": "momentum of that moving average",
    "optimizer.lr_schedule": "cosine: the segmentors' rate decays to 0 within each phase of the method's schedule",
    "ablation.iam": "mkd: train and use the image alignment module (false: S_syn reads raw assistant images)",
    "ablation.kd_s2r": "mkd: S_syn -> S_real distillation",
    "ablation.kd_r2s": "mkd: S_real -> S_syn distillation",
}


def rules_of(config):
    """:data:`RULES` with the settings of ``config``'s segmentor kind added."""
    rules = dict(RULES)
    kind = registry.SEGMENTORS.get(config["segmentor"].get("kind"))
    rules["segmentor"] = {
        **RULES["segmentor"],
        "kind": Rule("choice", choices=tuple(registry.SEGMENTORS)),
        **(kind.rules if kind else {}),
    }
    return rules


#: the `mkd train` / `mkd compare` flag that sets a setting: a bad value an override gave is blamed on it
FLAGS = {
    "method": "--method",
    "seed": "--seed",
    "strategy": "--strategy",
    "precision": "--precision",
    "checkpoint_every": "--checkpoint-every",
    "worker_timeout": "--worker-timeout",
    "data.batch_size": "--batch-size",
    "data.target_labelled": "--target-labelled",
    "schedule.epochs": "--epochs",
    "schedule.steps_per_epoch": "--steps-per-epoch",
    "segmentor.base_filters": "--base-filters",
    "segmentor.depth": "--depth",
}


def check_config(config, where, rules=None, prefix="", sources=None):
    """Fail with one line naming where the first setting whose type or range is wrong came from.

    Args:
        config: the resolved settings.
        where: the source named by default (the config file).
        rules: the rules to check against (default: :func:`rules_of` ``config``).
        prefix: the dotted path of ``config`` within the whole config (for recursion).
        sources: ``{"section.key": source}`` for the settings that came from elsewhere (an override's flag).
    """
    if rules is None:
        rules = rules_of(config)
    for key, rule in rules.items():
        if isinstance(rule, dict):
            check_config(config[key], where, rule, f"{prefix}{key}.", sources)
            continue
        problem = rule.problem(config[key])
        if problem:
            fail((sources or {}).get(f"{prefix}{key}", where), f"setting '{prefix}{key}' {problem}")


def check_recorded(values, where):
    """Fail with one line naming ``where`` and the first setting a run's ``config.yaml`` lacks.

    A run's file is the resolved config, written whole: a missing setting is a damaged file, not a
    default, except the settings added since (:data:`ADDED_SINCE`, :data:`DEFAULTED_SINCE`), which an
    older run's file does not hold. A setting under its old name (:data:`RENAMED`) counts.
    """
    for key, rule in RULES.items():
        if isinstance(rule, dict):
            section = values.get(key)
            if section is None:
                fail(where, f"setting '{key}' is missing")
            if not isinstance(section, dict):
                continue  # _merge names it: "setting 'KEY' must be a mapping"
            present = {RENAMED.get((key, name), name) for name in section}
            names = list(rule)
            if key == "segmentor":  # the architecture's own settings too (a run records them all)
                kind = registry.SEGMENTORS.get(section.get("kind", ADDED_SINCE[("segmentor", "kind")]))
                names += list(kind.defaults) if kind else []
            for name in names:
                if name not in present and (key, name) not in ADDED_SINCE and (key, name) not in DEFAULTED_SINCE:
                    fail(where, f"setting '{key}.{name}' is missing")
        elif key not in values and (None, key) not in DEFAULTED_SINCE:
            fail(where, f"setting '{key}' is missing")


def _merge(base, update, where, section=None):
    for key, value in update.items():
        key = RENAMED.get((section, key), key)
        if section == "segmentor" and key == "kind" and value != base.get("kind"):
            if value not in registry.SEGMENTORS:
                fail(where, f"setting 'segmentor.kind' must be one of {', '.join(registry.SEGMENTORS)}, got {value!r}")
            # another architecture: its own settings replace the previous kind's
            shared = {k: v for k, v in base.items() if k in RULES["segmentor"]}
            base.clear()
            base.update({**shared, **registry.SEGMENTORS[value].defaults, "kind": value})
            continue
        if key not in base:
            fail(where, f"unknown setting '{key}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                fail(where, f"setting '{key}' must be a mapping")
            _merge(base[key], value, where, key)
        else:
            base[key] = value
    return base


def load_config(path=None, overrides=None, recorded=False):
    """Defaults <- YAML file <- overrides (a nested dict of the same shape; `None` values are skipped).

    ``recorded``: the file is a run's ``config.yaml``; a setting it lacks because it was added later
    (:data:`ADDED_SINCE`) takes the value the run was trained with, not today's default.

    Returns:
        The resolved config dict.
    """
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.exists():
            fail(path, "config file not found")
        if not path.is_file():
            fail(path, "config is not a file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            fail(path, f"config is not UTF-8 text (byte {exc.start}: {exc.reason})")
        except yaml.YAMLError as exc:
            fail(path, f"invalid YAML ({str(exc).splitlines()[0]})")
        if not isinstance(values, dict):
            fail(path, "config must be a mapping")
        if values.get("method", METHODS[0]) not in METHODS:  # named in the file: the file is to blame
            fail(path, f"setting 'method' must be one of {', '.join(METHODS)}, got {values['method']!r}")
        if recorded:
            check_recorded(values, path)
            for (section, key), before in ADDED_SINCE.items():
                if isinstance(values.get(section), dict) and key not in values[section]:
                    values[section] = {**values[section], key: before}
        _merge(config, _kind_first(values), path)
    sources = {}  # an invalid value an override gave names its flag, not the config file
    if overrides:
        overrides = _drop_none(overrides)
        _merge(config, _kind_first(overrides), "command line")
        sources = {key: FLAGS.get(key, "command line") for key in _dotted_keys(overrides)}
    if config["method"] not in METHODS:
        fail(sources.get("method", "config"), f"unknown method '{config['method']}' (choose from {', '.join(METHODS)})")
    where = path if path is not None else "config"
    check_config(config, where, sources=sources)
    segmentor, method = config["segmentor"], registry.METHODS[config["method"]]
    if segmentor["domain_norm"] is None or method.domain_norm is None:  # recorded as what the run does
        segmentor["domain_norm"] = bool(method.domain_norm)
    if config["method"] != "mkd" or not segmentor["domain_norm"]:  # only mkd's S_syn can differ from domain_norm
        segmentor["syn_domain_norm"] = segmentor["domain_norm"]
    skip_kernel, select_by = config["alignment"]["skip_kernel"], config["schedule"]["select_by"]
    if skip_kernel % 2 == 0:
        fail(where, f"setting 'alignment.skip_kernel' must be odd, got {skip_kernel}")
    if select_by is not None and select_by not in method.predictors:
        fail(
            where,
            f"setting 'schedule.select_by' must be one of {', '.join(method.predictors)} for method "
            f"{config['method']}, got {select_by!r}",
        )
    if (config["alignment"]["discriminator_every"] or 1) > 1 and config["strategy"] in ("mirrored", "multi-worker"):
        fail(
            where,
            f"setting 'alignment.discriminator_every' > 1 needs strategy default or auto, got {config['strategy']!r} "
            "(a distribution strategy cannot skip the discriminators' update on some steps)",
        )
    if config["loss"]["average_teachers"] and not config["optimizer"]["ema"]:
        fail(where, "setting 'loss.average_teachers' needs optimizer.ema: true (the averages it distils from)")
    if segmentor["domain_norm"] and segmentor["norm"] != "batch":
        fail(where, f"setting 'segmentor.domain_norm' needs segmentor.norm: batch, got {segmentor['norm']!r}")
    return config


def learning_settings(config):
    """``config`` without :data:`RUNTIME_SETTINGS`: what a resumed run must share with the first."""
    return {key: value for key, value in config.items() if key not in RUNTIME_SETTINGS}


def _kind_first(values):
    """``values`` with ``segmentor.kind`` merged before the kind's own settings."""
    segmentor = values.get("segmentor")
    if isinstance(segmentor, dict) and "kind" in segmentor:
        values = {**values, "segmentor": {"kind": segmentor["kind"], **segmentor}}
    return values


def _dotted_keys(values, prefix=""):
    """``{"a": {"b": 1}, "c": 2}`` -> ``["a.b", "c"]``."""
    keys = []
    for key, value in values.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def _drop_none(values):
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


def save_config(config, path):
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
