"""Training configuration: typed settings, YAML files, command-line overrides, the resolved record.

Every hyper-parameter lives here once, as a field of a typed settings section: :class:`TrainingSettings`
and its sections (:class:`DataSettings`, :class:`ScheduleSettings`, ..., and each method's own loss
settings, :class:`MKDLossSettings`, :class:`UMMKDLossSettings`), each field with its default, its type and
range (a :class:`~mkd_tf.rules.Rule`) and one line of help. :data:`DEFAULTS`, :data:`RULES` and
:data:`HELP` are derived from them; docs/configuration.md is generated from those
(:mod:`mkd_tf.config_reference`). A segmentor architecture's own settings live with its registration in
:mod:`mkd_tf.registry`; how settings changed since runs were first written is
:mod:`mkd_tf.config_migrations`.

`mkd train --config cfg.yaml` merges the file over the defaults, then command-line flags over that; the
result (a plain nested dict, the YAML's shape) is written to `RUN/config.yaml`. Files are read with
PyYAML's safe loader, which also reads ``4e-3`` as a number (:class:`ConfigLoader`).
"""

import copy
import functools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mkd_tf import registry
from mkd_tf.config_migrations import ADDED_SINCE, DEFAULTED_SINCE, RENAMED, migrate
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
#: settings of how a run executes, not of what it learns: a resumed run may change them.
#: ``precision`` is *not* one of them: float16 changes the numbers learnt and adds loss-scale state to
#: the checkpoints, so a run resumes only in the precision it started with.
RUNTIME_SETTINGS = ("strategy", "jit_compile", "deterministic", "checkpoint_every", "worker_timeout")


def setting(default: Any, rule: Rule, help: str) -> Any:
    """A field of a settings section: its default, type and range (a :class:`~mkd_tf.rules.Rule`) and one line
    of help (docs/configuration.md and ``--help`` come from these)."""
    return field(default=default, metadata={"rule": rule, "help": help})


def section(cls: type) -> Any:
    """A field holding a whole settings section (a dataclass of :func:`setting` fields)."""
    return field(default_factory=cls, metadata={"section": cls})


class Settings:
    """What every settings section can do (each is a dataclass of :func:`setting` fields)."""

    @classmethod
    def from_settings(cls, values: dict | None = None) -> "Settings":
        """The section from a settings mapping: its own keys (the others are ignored), the defaults for those
        it lacks.

        Example:
            >>> MKDLossSettings.from_settings({"temperature": 4.0, "ummkd_weight": 1.0}).temperature
            4.0
        """
        values = values or {}
        return cls(**{item.name: values[item.name] for item in fields(cls) if item.name in values})


@dataclass
class DataSettings(Settings):
    """``data``: what each training step reads."""

    batch_size: int = setting(8, integer(1), "slices per stream per step, over all replicas (the global batch)")
    augment: bool = setting(True, BOOL, "random rotation, scale, flip, gamma, contrast and noise on training slices")
    target_labelled: int | None = setting(
        None,
        integer(0, optional=True),
        "keep the labels of only N of the cache's labelled target training volumes (null: all)",
    )


@dataclass
class ScheduleSettings(Settings):
    """``schedule``: the budget, the methods' phases and the checkpoint selection."""

    epochs: int = setting(
        20, integer(1), "number of epochs; validation, the best checkpoint and resumption happen at epoch ends"
    )
    steps_per_epoch: int = setting(100, integer(1), "training steps per epoch")
    finetune_switch: float = setting(
        0.7, fraction(), "finetune: fraction of the steps on the assistant before switching to the target"
    )
    mkd_pretrain: float = setting(
        0.7,
        fraction(high_open=True),
        "mkd: fraction of the steps of warm start on raw assistant slices before distillation (0: none)",
    )
    validation_batch: int = setting(32, integer(1), "slices per batch when predicting the validation volumes")
    select_by: str | None = setting(
        None,
        Rule("choice", choices=PREDICTORS, optional=True),
        "predictor whose validation Dice selects best/ (null: the method's reported one)",
    )


@dataclass
class SegmentorSettings(Settings):
    """``segmentor``: the architecture (``kind``; its own settings, :mod:`mkd_tf.registry`, follow it) and how
    its normalisation is shared between the modalities."""

    kind: str = setting(
        "unet",
        Rule("choice", choices=tuple(registry.SEGMENTORS)),
        "segmentor architecture (a registered kind; its own settings follow)",
    )
    norm: str = setting("batch", Rule("choice", choices=NORMS), "normalisation layers of the segmentors")
    domain_norm: bool | None = setting(
        None,
        Rule("bool", optional=True),
        "one batch-norm set per modality with shared convolutions (null: the method's default)",
    )
    syn_domain_norm: bool = setting(
        False, BOOL, "mkd, with domain_norm: per-domain batch-norm sets in S_syn too (false: one set, the paper's)"
    )


@dataclass
class AlignmentSettings(Settings):
    """``alignment``: the image alignment module's networks, and how MKD trains it."""

    base_filters: int = setting(16, integer(1), "IAM generators' channels of the first level")
    num_blocks: int = setting(3, integer(0), "IAM generators' residual blocks")
    disc_filters: int = setting(64, integer(1), "PatchGAN discriminators' channels of the first layer")
    disc_layers: int = setting(3, integer(1, 8), "PatchGAN discriminators' strided layers")
    norm: str = setting("instance", Rule("choice", choices=NORMS), "normalisation layers of the IAM")
    residual: bool = setting(True, BOOL, "generators compute G(x) = x + r(x) and start as the identity")
    skip_kernel: int = setting(
        7, integer(1, 15), "odd; > 1: the identity path is a learnable identity-initialised k x k convolution"
    )
    target_cycle: bool = setting(
        False, BOOL, "mkd: false skips the target cycle G(F(target)); the assistant's cycle stays"
    )
    discriminator_every: int | None = setting(
        None,
        integer(1, optional=True),
        "mkd: update the discriminators on every k-th step only (1: every step; > 1 on one device only; "
        "null: 2 on one device, 1 under a distribution strategy)",
    )
    freeze_after_warm_start: bool = setting(
        True,
        BOOL,
        "mkd: after the warm start the IAM stops training and only G's forward pass runs (no warm start: it "
        "trains throughout)",
    )


@dataclass
class MKDLossSettings(Settings):
    """MKD's ``loss`` settings: the weights of its loss terms and the distillation temperature."""

    temperature: float = setting(2.0, POSITIVE, "distillation temperature T of the KD terms")
    lambda_s2r: float = setting(
        1.0, NON_NEGATIVE, "weight of S_syn -> S_real distillation (on aligned assistant images)"
    )
    lambda_r2s: float = setting(1.0, NON_NEGATIVE, "weight of S_real -> S_syn distillation (on all target slices)")
    lambda_s2r_target: float = setting(
        1.0,
        NON_NEGATIVE,
        "mkd: weight of S_syn -> S_real distillation on all target slices too, both directions there (0: the paper)",
    )
    adversarial: float = setting(1.0, NON_NEGATIVE, "weight of the IAM's least-squares adversarial loss")
    cycle: float = setting(0.3, NON_NEGATIVE, "weight of the IAM's L1 cycle loss (CycleGAN: 10)")
    segmentation_to_generator: float = setting(
        1.0, NON_NEGATIVE, "weight of S_syn's segmentation loss flowing into G (keeps anatomy)"
    )
    syn_on_target: float = setting(
        1.0, NON_NEGATIVE, "mkd: S_syn also supervised on the labelled target images (0: the paper)"
    )
    structure: float = setting(
        3.0, NON_NEGATIVE, "mkd: contrast-free structure loss between each image and its translation (0: the paper)"
    )


@dataclass
class UMMKDLossSettings(Settings):
    """UMMKD's ``loss`` settings."""

    ummkd_temperature: float = setting(2.0, POSITIVE, "ummkd: temperature of the class-wise KL term")
    ummkd_weight: float = setting(1.0, NON_NEGATIVE, "ummkd: weight of the class-wise KL term")


@dataclass
class LossSettings(UMMKDLossSettings, MKDLossSettings):
    """``loss``: every method's own loss settings (MKD's, then UMMKD's), one section."""


@dataclass
class OptimizerSettings(Settings):
    """``optimizer``: the rates, the IAM's Adam and the segmentors' weight averaging."""

    segmentor_lr: float = setting(
        1.0e-3, POSITIVE, "Adam learning rate of the segmentors (tune it with mkd compare --tune)"
    )
    generator_lr: float = setting(2.0e-4, POSITIVE, "Adam learning rate of the IAM's generators")
    discriminator_lr: float = setting(2.0e-4, POSITIVE, "Adam learning rate of the IAM's discriminators")
    gan_beta_1: float = setting(0.5, fraction(high_open=True), "Adam beta_1 of the generators and discriminators")
    ema: bool = setting(
        True, BOOL, "evaluate, select and export an exponential moving average of the segmentor weights"
    )
    ema_momentum: float = setting(0.99, fraction(high_open=True), "momentum of that moving average")
    lr_schedule: str = setting(
        "constant",
        Rule("choice", choices=LR_SCHEDULES),
        "cosine: the segmentors' rate decays to 0 within each phase of the method's schedule",
    )


@dataclass
class AblationSettings(Settings):
    """``ablation``: MKD's parts, each on in the full method (``--no-iam``, ``--no-kd-s2r``, ``--no-kd-r2s``)."""

    iam: bool = setting(
        True, BOOL, "mkd: train and use the image alignment module (false: S_syn reads raw assistant images)"
    )
    kd_s2r: bool = setting(True, BOOL, "mkd: S_syn -> S_real distillation")
    kd_r2s: bool = setting(True, BOOL, "mkd: S_real -> S_syn distillation")


@dataclass
class TrainingSettings(Settings):
    """Every setting of ``mkd train`` and ``mkd compare``: how the run executes, then one section each."""

    method: str = setting(
        "mkd",
        Rule("choice", choices=METHODS),
        "the method to train (a registered method; variants are chosen with mkd compare --methods)",
    )
    seed: int = setting(0, integer(0), "seed of the networks' initial weights, the batch order and the augmentation")
    strategy: str = setting(
        "auto",
        Rule("choice", choices=STRATEGIES),
        "auto: multi-worker if TF_CONFIG names several workers, else every visible GPU, else the CPU",
    )
    precision: str = setting(
        "float32",
        Rule("choice", choices=PRECISIONS),
        "Keras mixed-precision policy; networks' outputs and every loss stay float32; a run resumes only in its own",
    )
    jit_compile: bool = setting(False, BOOL, "XLA-compile the distributed training step")
    deterministic: bool = setting(
        False, BOOL, "bit-reproducible training: deterministic kernels and no Grappler graph rewrites"
    )
    checkpoint_every: float = setting(
        10.0, NON_NEGATIVE, "minutes between step checkpoints inside an epoch (0: at epoch ends only)"
    )
    worker_timeout: float = setting(
        600.0,
        POSITIVE,
        "multi-worker: seconds to wait for the cluster at start and for one collective operation (must exceed "
        "the chief's validation time)",
    )
    data: DataSettings = section(DataSettings)
    schedule: ScheduleSettings = section(ScheduleSettings)
    segmentor: SegmentorSettings = section(SegmentorSettings)
    alignment: AlignmentSettings = section(AlignmentSettings)
    loss: LossSettings = section(LossSettings)
    optimizer: OptimizerSettings = section(OptimizerSettings)
    ablation: AblationSettings = section(AblationSettings)


def _walk(cls, prefix=""):
    """``(dotted name, field)`` of every setting of a settings dataclass, sections' settings included."""
    for item in fields(cls):
        if "section" in item.metadata:
            yield from _walk(item.metadata["section"], f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", item


def _tree(cls, value_of):
    """The nested dict of ``value_of(field)`` over ``cls``'s settings (sections as nested dicts)."""
    return {
        item.name: _tree(item.metadata["section"], value_of) if "section" in item.metadata else value_of(item)
        for item in fields(cls)
    }


def _with_kind_settings(tree, kind_values):
    """``tree`` with the default segmentor kind's own settings right after ``segmentor.kind``."""
    segmentor = tree["segmentor"]
    tree["segmentor"] = {"kind": segmentor["kind"], **kind_values, **segmentor}
    return tree


#: every setting's default (the segmentor kind's own settings are its registration's, :mod:`mkd_tf.registry`)
DEFAULTS = _with_kind_settings(_tree(TrainingSettings, lambda item: item.default), registry.SEGMENTORS["unet"].defaults)
#: every setting's type and range, checked before anything is written (the chosen kind's are added by
#: :func:`rules_of`)
RULES = _tree(TrainingSettings, lambda item: item.metadata["rule"])
#: one line of help per setting, by dotted name (docs/configuration.md is generated from this,
#: :data:`DEFAULTS` and :data:`RULES` by ``python -m mkd_tf.config_reference``)
HELP = {name: item.metadata["help"] for name, item in _walk(TrainingSettings)}
HELP.update({f"segmentor.{name}": text for name, text in registry.SEGMENTORS["unet"].help.items()})


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
    """Fail with one line naming where the first setting whose type or range is wrong came from; a whole
    number written as a float (``2.0``, ``1e3``) becomes an int in place.

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
        if rule.kind == "int" and config[key] is not None:
            config[key] = int(config[key])  # `epochs: 2.0` or `1e3` is a whole number: ranges and shapes need an int


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


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3`` / ``4E-3`` as numbers.

    PyYAML follows YAML 1.1, where a float needs a dot (``4.0e-3``): ``segmentor_lr: 4e-3`` would be the
    text ``'4e-3'`` and be refused, though YAML 1.2, Python and the command line read it as 0.004.

    Example:
        >>> yaml.load("lr: 4e-3", Loader=ConfigLoader)
        {'lr': 0.004}
    """


ConfigLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: yaml.safe_load is unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml_mapping(path: Path) -> dict:
    """The mapping a YAML config file holds (:class:`ConfigLoader`, safe); one line naming ``path`` when it is
    missing, not UTF-8, not YAML or not a mapping."""
    path = Path(path)
    if not path.exists():
        fail(path, "config file not found")
    if not path.is_file():
        fail(path, "config is not a file")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=ConfigLoader) or {}
    except UnicodeDecodeError as exc:
        fail(path, f"config is not UTF-8 text (byte {exc.start}: {exc.reason})")
    except yaml.YAMLError as exc:
        fail(path, f"invalid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(values, dict):
        fail(path, "config must be a mapping")
    return values


def load_config(path=None, overrides=None, recorded=False):
    """Defaults <- YAML file <- overrides (a nested dict of the same shape; `None` values are skipped).

    What the file and the overrides say is first brought to today's settings
    (:func:`mkd_tf.config_migrations.migrate`: renamed and removed settings). ``recorded``: the file is a
    run's ``config.yaml``; a setting it lacks because it was added later (:data:`ADDED_SINCE`) takes the
    value the run was trained with, not today's default.

    Returns:
        The resolved config dict.
    """
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        values = read_yaml_mapping(path)
        if values.get("method", METHODS[0]) not in METHODS:  # named in the file: the file is to blame
            fail(path, f"setting 'method' must be one of {', '.join(METHODS)}, got {values['method']!r}")
        if recorded:
            check_recorded(values, path)
        _merge(config, _kind_first(migrate(values, path, recorded)), path)
    sources = {}  # an invalid value an override gave names its flag, not the config file
    if overrides:
        overrides = migrate(_drop_none(overrides), "command line", recorded=False)
        _merge(config, _kind_first(overrides), "command line")
        sources = {key: FLAGS.get(key, "command line") for key in _dotted_keys(overrides)}
    if config["method"] not in METHODS:
        fail(sources.get("method", "config"), f"unknown method '{config['method']}' (choose from {', '.join(METHODS)})")
    where = path if path is not None else "config"
    check_config(config, where, sources=sources)
    resolve_for_method(config, where)
    return config


def resolve_for_method(config: dict, where) -> None:
    """What depends on the chosen method, in place: ``segmentor.domain_norm`` null takes the method's
    registered default (and is recorded as what the run does), ``syn_domain_norm`` follows ``domain_norm``
    for every method but MKD; then the checks that span settings (one line naming ``where``)."""
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
    if segmentor["domain_norm"] and segmentor["norm"] != "batch":
        fail(where, f"setting 'segmentor.domain_norm' needs segmentor.norm: batch, got {segmentor['norm']!r}")


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


def method_defaults(method: str) -> dict:
    """The resolved settings ``mkd train --method METHOD`` uses without a config file (a fresh copy): where
    a model or network constructor is called without a setting, it takes the value from here, so that
    ``MKDModel(5, 8)`` in a notebook is the model ``mkd train`` builds.

    Example:
        >>> method_defaults("mkd")["segmentor"]["domain_norm"]
        True
    """
    return copy.deepcopy(_method_defaults(method))


@functools.cache
def _method_defaults(method):
    return load_config(overrides={"method": method})
