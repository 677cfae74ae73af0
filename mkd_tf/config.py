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

DEFAULTS = {
    "method": "mkd",
    "seed": 0,
    "strategy": "auto",
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
    return config


def _drop_none(values):
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


def save_config(config, path):
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
