"""Training configuration: defaults, YAML files, command-line overrides, the resolved record.

Every hyper-parameter lives here once. `mkd train --config cfg.yaml` merges the file over the
defaults, then command-line flags over that; the result is written to `RUN/config.yaml`.
Only `yaml.safe_load` is used.
"""

import copy
from pathlib import Path

import yaml

from mkd_tf.errors import fail
from mkd_tf.files import write_text_atomic

METHODS = ("mkd", "target-only", "assistant-only", "joint", "finetune", "ummkd")
STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
NORMS = ("batch", "instance", "none")  # mkd_tf.models.segmentor.NORMS (config does not import models)
#: settings of how a run executes, not of what it learns: a resumed run may change them.
#: ``precision`` is *not* one of them: float16 changes the numbers learnt and adds loss-scale state to
#: the checkpoints, so a run resumes only in the precision it started with.
RUNTIME_SETTINGS = ("strategy", "jit_compile", "checkpoint_every", "worker_timeout")

DEFAULTS = {
    "method": "mkd",
    "seed": 0,
    "strategy": "auto",
    # Keras mixed-precision policy; networks' outputs and every loss stay float32
    "precision": "float32",
    "jit_compile": False,  # XLA-compile the distributed training step
    "checkpoint_every": 10.0,  # minutes between step-level checkpoints inside an epoch (0: epoch ends only)
    # multi-worker: seconds a worker waits for the cluster at start and for one collective operation
    # (a step's all-reduce) before stopping with an error; must exceed the chief's validation time
    "worker_timeout": 600.0,
    "data": {
        "batch_size": 8,  # slices per stream per step, over all replicas
        "augment": True,
        "target_labeled": None,  # keep labels of only N of the cache's labelled target training volumes
    },
    "schedule": {
        "epochs": 20,
        "steps_per_epoch": 100,
        "finetune_switch": 0.5,  # finetune: fraction of steps on the assistant before switching to target
        # mkd: fraction of steps of warm start (both segmentors on raw assistant slices, as finetune's
        # first phase; the IAM trains alone) before mutual distillation; 0 = none
        "mkd_pretrain": 0.5,
        "validation_batch": 32,
    },
    "segmentor": {"base_filters": 32, "depth": 4, "norm": "batch", "dropout": 0.0},
    "alignment": {"base_filters": 32, "num_blocks": 6, "disc_filters": 64, "disc_layers": 3, "norm": "instance",
                  "residual": True},  # G(x) = x + r(x), starts as the identity
    "loss": {
        "temperature": 2.0,
        "lambda_s2r": 1.0,
        "lambda_r2s": 1.0,
        "adversarial": 1.0,
        "cycle": 10.0,
        "segmentation_to_generator": 1.0,
        "real_on_aligned": 0.0,  # mkd: S_real also supervised on aligned assistant images
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
    },
    "ablation": {"iam": True, "kd_s2r": True, "kd_r2s": True},
}


class Rule:
    """The type and range of one setting: ``kind`` is "int", "number", "bool" or "choice"."""

    def __init__(self, kind, low=None, high=None, choices=(), optional=False, high_open=False, low_open=False):
        self.kind, self.low, self.high, self.choices = kind, low, high, choices
        self.optional, self.high_open, self.low_open = optional, high_open, low_open

    def problem(self, value):
        """Why ``value`` is not allowed, or None."""
        if value is None:
            return None if self.optional else "must be set"
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind == "choice":
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}, got {value!r}"
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == "int" and not (is_number and float(value).is_integer()):
            return f"must be a whole number, got {value!r}"
        if not is_number or value != value or value in (float("inf"), float("-inf")):
            return f"must be a finite number, got {value!r}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            low = "-inf" if self.low is None else self.low
            high = "inf" if self.high is None else self.high
            return f"must be in {left}{low}, {high}{right}, got {value!r}"
        return None


def _int(low=None, high=None, optional=False):
    return Rule("int", low, high, optional=optional)


def _fraction(high_open=False):
    return Rule("number", 0.0, 1.0, high_open=high_open)


_POSITIVE = Rule("number", 0.0, low_open=True)
_NON_NEGATIVE = Rule("number", 0.0)
_BOOL = Rule("bool")

#: every setting's type and range, checked before anything is written
RULES = {
    "method": Rule("choice", choices=METHODS),
    "seed": _int(0),
    "strategy": Rule("choice", choices=STRATEGIES),
    "precision": Rule("choice", choices=PRECISIONS),
    "jit_compile": _BOOL,
    "checkpoint_every": _NON_NEGATIVE,
    "worker_timeout": _POSITIVE,
    "data": {"batch_size": _int(1), "augment": _BOOL, "target_labeled": _int(0, optional=True)},
    "schedule": {"epochs": _int(1), "steps_per_epoch": _int(1), "finetune_switch": _fraction(),
                 "mkd_pretrain": _fraction(high_open=True), "validation_batch": _int(1)},
    "segmentor": {"base_filters": _int(1), "depth": _int(1, 8), "norm": Rule("choice", choices=NORMS),
                  "dropout": _fraction(high_open=True)},
    "alignment": {"base_filters": _int(1), "num_blocks": _int(0), "disc_filters": _int(1), "disc_layers": _int(1, 8),
                  "norm": Rule("choice", choices=NORMS), "residual": _BOOL},
    "loss": {"temperature": _POSITIVE, "lambda_s2r": _NON_NEGATIVE, "lambda_r2s": _NON_NEGATIVE,
             "adversarial": _NON_NEGATIVE, "cycle": _NON_NEGATIVE, "segmentation_to_generator": _NON_NEGATIVE,
             "real_on_aligned": _NON_NEGATIVE,
             "ummkd_temperature": _POSITIVE, "ummkd_weight": _NON_NEGATIVE},
    "optimizer": {"segmentor_lr": _POSITIVE, "generator_lr": _POSITIVE, "discriminator_lr": _POSITIVE,
                  "gan_beta_1": _fraction(high_open=True), "ema": _BOOL, "ema_momentum": _fraction(high_open=True)},
    "ablation": {"iam": _BOOL, "kd_s2r": _BOOL, "kd_r2s": _BOOL},
}


def check_config(config, where, rules=RULES, prefix=""):
    """Fail with one line naming ``where`` and the first setting whose type or range is wrong."""
    for key, rule in rules.items():
        if isinstance(rule, dict):
            check_config(config[key], where, rule, f"{prefix}{key}.")
            continue
        problem = rule.problem(config[key])
        if problem:
            fail(where, f"setting '{prefix}{key}' {problem}")


def _merge(base, update, where):
    for key, value in update.items():
        if key not in base:
            fail(where, f"unknown setting '{key}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                fail(where, f"setting '{key}' must be a mapping")
            _merge(base[key], value, where)
        else:
            base[key] = value
    return base


def load_config(path=None, overrides=None):
    """Defaults <- YAML file <- overrides (a nested dict of the same shape; `None` values are skipped).

    Returns:
        The resolved config dict.
    """
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.exists():
            fail(path, "config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            fail(path, f"invalid YAML ({str(exc).splitlines()[0]})")
        if not isinstance(values, dict):
            fail(path, "config must be a mapping")
        _merge(config, values, path)
    if overrides:
        _merge(config, _drop_none(overrides), "command line")
    if config["method"] not in METHODS:
        fail("config", f"unknown method '{config['method']}' (choose from {', '.join(METHODS)})")
    check_config(config, path if path is not None else "config")
    return config


def learning_settings(config):
    """``config`` without :data:`RUNTIME_SETTINGS`: what a resumed run must share with the first."""
    return {key: value for key, value in config.items() if key not in RUNTIME_SETTINGS}


def _drop_none(values):
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


def save_config(config, path):
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
