"""The method and segmentor registries (mkd_tf/registry.py) and the segmentor factory behind them."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mkd_tf import compare, registry
from mkd_tf.config import load_config
from mkd_tf.errors import MkdError
from mkd_tf.models.segmentor_factory import build_segmentor
from mkd_tf.training import build_method, train
from tests.scripts import tiny_runs

TINY = {
    "segmentor": {"base_filters": 2, "depth": 1},
    "data": {"batch_size": 2},
    "alignment": {"base_filters": 2, "num_blocks": 0, "disc_filters": 2, "disc_layers": 1},
}


class TinySegmentor(keras.Model):
    """A registered-kind stand-in: a 3x3 convolution, a per-domain scale and shift (its "batch-norm sets"),
    then a 1x1 convolution to the class logits (``width`` is its own setting). It implements the whole
    segmentor contract (mkd_tf.registry.SegmentorKind), ``domain_variable_pairs`` included."""

    output_layer_name = "logits"

    def __init__(self, num_classes, width=3, norm="batch", num_domains=1, default_domain=0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.num_domains, self.default_domain = width, num_domains, default_domain
        self.hidden = keras.layers.Conv2D(width, 3, padding="same")
        self.logits = keras.layers.Conv2D(num_classes, 1)
        self.domain_pairs_asked = []

    def build(self, input_shape):  # the contract: every weight exists after build (optimizers are built next)
        self.hidden.build(input_shape)
        self.logits.build(tuple(input_shape[:-1]) + (self.width,))
        self.scales = [self.add_weight((self.width,), "ones", name=f"scale{d}") for d in range(self.num_domains)]
        self.shifts = [self.add_weight((self.width,), "zeros", name=f"shift{d}") for d in range(self.num_domains)]
        self.built = True

    def domain_variable_pairs(self, source, destination):
        self.domain_pairs_asked.append((source, destination))
        return [(self.scales[source], self.scales[destination]), (self.shifts[source], self.shifts[destination])]

    def call(self, images, training=False, domain=None):
        domain = self.default_domain if domain is None else domain
        return self.logits(keras.ops.relu(self.hidden(images) * self.scales[domain] + self.shifts[domain]))


def _batch(size=16, classes=4):
    stream = {
        "image": tf.random.stateless_normal((2, size, size, 1), seed=(1, 2)),
        "label": tf.zeros((2, size, size), tf.int32),
        "has_label": tf.ones((2,)),
    }
    return {"assistant": stream, "target": stream, "target_labelled": stream}


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_every_registered_method_builds_with_its_registered_predictors(name):
    model = build_method(load_config(overrides={**TINY, "method": name}), 4)
    assert model.predictor_names() == list(registry.METHODS[name].predictors)
    assert isinstance(model, registry.load(registry.METHODS[name].model))
    # what the run reports, exports and selects its checkpoint by: the ensemble, or the one segmentor
    predictors = registry.METHODS[name].predictors
    assert model.main_predictor() == ("ensemble" if "ensemble" in predictors else predictors[0])


def test_a_new_segmentor_kind_is_one_class_plus_one_registration(monkeypatch):
    monkeypatch.setattr(registry, "SEGMENTORS", dict(registry.SEGMENTORS))
    registry.register_segmentor(
        "tiny", "tests.test_registry:TinySegmentor", defaults={"width": 3}, rules={"width": registry.integer(1)}
    )
    config = load_config(overrides={**TINY, "method": "mkd", "segmentor": {"kind": "tiny", "width": 5}})
    # the U-Net's own settings are gone, the shared ones stay
    assert config["segmentor"] == {
        "kind": "tiny",
        "norm": "batch",
        "domain_norm": True,
        "syn_domain_norm": False,
        "width": 5,
    }
    model = build_method(config, 4)
    model.build_for((16, 16, 1))
    model.build_optimizers()
    assert isinstance(model.real_segmentor, TinySegmentor) and model.real_segmentor.width == 5
    before = [v.numpy().copy() for v in model.real_segmentor.trainable_variables]
    logs = model.train_step(_batch())
    assert np.isfinite(float(logs["total"]))
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.real_segmentor.trainable_variables))
    with pytest.raises(MkdError, match="setting 'segmentor.width' must be in \\[1, inf\\], got 0"):
        load_config(overrides={"segmentor": {"kind": "tiny", "width": 0}})
    with pytest.raises(MkdError, match="unknown setting 'depth'"):
        load_config(overrides={"segmentor": {"kind": "tiny", "depth": 3}})


def test_a_toy_segmentor_kind_trains_through_a_default_mkd_run_past_the_warm_start(monkeypatch, tmp_path_factory):
    """The default MKD (per-domain sets in S_real) with a toy kind, through the training loop: the warm
    start's end starts S_real's target set from its assistant set (domain_variable_pairs), distillation
    follows, and the run is scored and saved."""
    monkeypatch.setattr(registry, "SEGMENTORS", dict(registry.SEGMENTORS))
    registry.register_segmentor(
        "tiny", "tests.test_registry:TinySegmentor", defaults={"width": 3}, rules={"width": registry.integer(1)}
    )
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)
    run = tmp_path_factory.mktemp("toy_kind") / "run"
    overrides = {
        "method": "mkd",
        "segmentor": {"kind": "tiny"},
        "alignment": TINY["alignment"],
        "data": {"batch_size": 2},
        "schedule": {"epochs": 2, "steps_per_epoch": 2, "mkd_pretrain": 0.5},
    }
    with tiny_runs.capture_models() as built, tiny_runs.eager():
        train(cache, run, overrides=overrides, verbose=0)
    model = built[-1]
    assert isinstance(model.real_segmentor, TinySegmentor) and model.real_segmentor.num_domains == 2
    assert model.real_segmentor.domain_pairs_asked == [(0, 1)]  # once, at the warm start's end
    epochs = json.loads((run / "history.json").read_text())["epochs"]
    assert [e["phase"] for e in epochs] == ["warm start", "distillation"]
    assert "kd_r2s" in epochs[1]["losses"] and np.isfinite(epochs[1]["losses"]["total"])
    assert (run / "best" / "weights.index").exists()


def test_an_unknown_segmentor_kind_is_one_line():
    with pytest.raises(MkdError, match="setting 'segmentor.kind' must be one of unet, got 'vnet'"):
        load_config(overrides={"segmentor": {"kind": "vnet"}})
    with pytest.raises(ValueError, match="unknown segmentor kind 'vnet'"):
        build_segmentor(4, {"kind": "vnet"})


def test_a_new_variant_is_one_registration(monkeypatch):
    monkeypatch.setattr(registry, "VARIANTS", dict(registry.VARIANTS))
    registry.register_variant(
        "finetune-late-switch",
        "finetune",
        {"schedule": {"finetune_switch": 0.8}},
        "finetune switching to the target after 80 % of the steps",
    )
    overrides = compare.run_overrides("finetune-late-switch", 2, {"schedule": {"epochs": 3}})
    assert overrides == {"schedule": {"epochs": 3, "finetune_switch": 0.8}, "method": "finetune", "seed": 2}
    assert registry.method_of("finetune-late-switch").needs_labelled_target
    with pytest.raises(ValueError, match="already registered"):
        registry.register_variant("finetune-late-switch", "finetune", {}, "")
    with pytest.raises(ValueError, match="unknown method 'segformer'"):
        registry.register_variant("segformer-x", "segformer", {}, "")


def test_unknown_compare_entry_lists_every_registered_name():
    with pytest.raises(MkdError, match="unknown method 'mkd-typo' \\(choose from mkd, target-only, .*mkd-no-iam"):
        compare.run_overrides("mkd-typo", 0, {})
