"""The single-segmentor baselines: finetune's and joint's per-modality batch norm (``domain_norm``)."""

import keras
import numpy as np

from mkd_tf.config import load_config
from mkd_tf.training import build_method
from tests.models.test_mkd import _norm_stats, make_batch

TINY = {
    "segmentor": {"base_filters": 4, "depth": 2, "domain_norm": True},
    "data": {"batch_size": 2},
    "schedule": {"epochs": 1, "steps_per_epoch": 2, "finetune_switch": 0.5},
}


def _moved(before, after):
    return [not np.array_equal(a, b) for a, b in zip(before, after)]


def test_finetune_with_domain_norm_uses_the_assistant_set_then_the_targets():
    keras.utils.set_random_seed(0)
    model = build_method(load_config(overrides={**TINY, "method": "finetune"}), 4)
    model.build_for((32, 32, 1))
    model.build_optimizers()
    assert model.switch_step == 1 and model.segmentor.num_domains == 2
    assistant, target = _norm_stats(model.segmentor, 0), _norm_stats(model.segmentor, 1)
    model.train_step(make_batch(0))  # on the assistant
    assert all(_moved(assistant, _norm_stats(model.segmentor, 0))) and not any(
        _moved(target, _norm_stats(model.segmentor, 1))
    )
    assistant = _norm_stats(model.segmentor, 0)
    model.train_step(make_batch(1))  # on the target
    assert not any(_moved(assistant, _norm_stats(model.segmentor, 0))) and all(
        _moved(target, _norm_stats(model.segmentor, 1))
    )


def test_joint_with_domain_norm_moves_both_sets_in_one_step():
    keras.utils.set_random_seed(0)
    model = build_method(load_config(overrides={**TINY, "method": "joint"}), 4)
    model.build_for((32, 32, 1))
    model.build_optimizers()
    assistant, target = _norm_stats(model.segmentor, 0), _norm_stats(model.segmentor, 1)
    model.train_step(make_batch(0))
    assert all(_moved(assistant, _norm_stats(model.segmentor, 0))) and all(
        _moved(target, _norm_stats(model.segmentor, 1))
    )
