"""The moving average of weights the model keeps for an optimizer made with Keras' ``use_ema=True``: the
same numbers as Keras' own average, swapped in and out exactly, and checkpointed under Keras' keys."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mkd_tf.models.baselines import TargetOnlyModel
from mkd_tf.checkpoints import training_state

SIZE, BATCH, CLASSES = 32, 2, 4
SEGMENTOR = {"base_filters": 4, "depth": 2}


def make_batch(seed):
    """The labelled target stream target-only trains on: a few class rectangles plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((BATCH, SIZE, SIZE), np.int32)
    for b in range(BATCH):
        for c in range(1, CLASSES):
            y, x = rng.integers(0, SIZE - 10, 2)
            labels[b, y : y + 8, x : x + 8] = c
    images = labels[..., None] * 0.7 + rng.normal(0, 0.2, (BATCH, SIZE, SIZE, 1))
    stream = {"image": tf.constant(images, tf.float32), "label": tf.constant(labels), "has_label": tf.ones(BATCH)}
    return {"target_labelled": stream}


def target_only(optimizer, model_keeps_the_average=True):
    """A built, seeded target-only model; with ``model_keeps_the_average=False`` its optimizer is built
    directly, so Keras keeps the average inside the optimizer (how every run was trained before)."""
    keras.utils.set_random_seed(4)
    model = TargetOnlyModel(CLASSES, BATCH, SEGMENTOR, optimizer, predictor="real")
    model.build_for((SIZE, SIZE, 1))
    if model_keeps_the_average:
        model.build_optimizers()
    else:
        optimizer.build(model.optimizers()["segmentors"][1])
    return model


def keras_average(model):
    """The average Keras keeps inside the optimizer, read through its public ``finalize_variable_values``."""
    optimizer, variables = model.optimizers()["segmentors"]
    raw = [v.numpy() for v in variables]
    optimizer.finalize_variable_values(variables)  # the weights become the averages
    averages = [v.numpy() for v in variables]
    for variable, value in zip(variables, raw):
        variable.assign(value)
    return averages


def adam(scaled=False):
    inner = keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.5)
    return keras.optimizers.LossScaleOptimizer(inner) if scaled else inner


@pytest.mark.parametrize("scaled", [False, True])
def test_the_models_average_is_keras_average(scaled):
    """Three compiled steps (with a loss-scaled optimizer: and an overflowing one after the second, which neither
    steps nor averages): the model's averages equal those Keras keeps inside an optimizer, to float round-off."""
    ours, reference = target_only(adam(scaled)), target_only(adam(scaled), model_keeps_the_average=False)
    assert set(ours.weight_averages) == {"segmentors"} and not reference.weight_averages
    for model, kept_by_keras in ((ours, False), (reference, True)):  # kept once, by the model or by Keras
        inner = getattr(model.segmentor_optimizer, "inner_optimizer", model.segmentor_optimizer)
        assert any(v.path.endswith("_average") for v in inner.variables) == kept_by_keras
    overflow = make_batch(0)
    overflow["target_labelled"]["image"] = tf.fill((BATCH, SIZE, SIZE, 1), np.inf)
    batches = [make_batch(0), make_batch(1)] + ([overflow] if scaled else []) + [make_batch(2)]
    for model in (ours, reference):
        step = tf.function(model.train_step)
        for batch in batches:
            step(batch)
        assert int(model.optimizers()["segmentors"][0].iterations.numpy()) == 3  # the overflow was skipped
    for (weight, average), expected, raw in zip(
        ours.moving_averages(), keras_average(reference), reference.optimizers()["segmentors"][1]
    ):
        np.testing.assert_allclose(weight.numpy(), raw.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(average.numpy(), expected, rtol=1e-6, atol=1e-7)
    moved = max(float(np.abs(w.numpy() - a.numpy()).max()) for w, a in ours.moving_averages())
    assert moved > 1e-4  # the averages are not the weights


def test_the_averaged_weights_swap_in_and_back_out_exactly():
    model = target_only(adam())
    assert model.moving_averages(started_only=True) == []  # no step yet: no average to swap in
    for seed in range(2):
        model.train_step(make_batch(seed))
    raw = [v.numpy() for v in model.variables]
    averages = {id(w): a.numpy() for w, a in model.moving_averages()}
    with model.averaged_weights():
        for variable, value in zip(model.variables, raw):
            expected = averages.get(id(variable), value)  # statistics (not optimised) stay as they are
            np.testing.assert_array_equal(variable.numpy(), expected)
    for variable, value in zip(model.variables, raw):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_the_averages_are_checkpointed_under_the_keys_keras_gave_them():
    """A run's training state is laid out as when the optimizer kept the averages (so either restores the
    other), and the model's own weights are unchanged by the averages it keeps."""
    ours, reference = target_only(adam()), target_only(adam(), model_keeps_the_average=False)
    assert [v.path for v in ours.weights] == [v.path for v in reference.weights]
    epoch = tf.Variable(0, dtype=tf.int64)
    ours_state, reference_state = training_state(ours, epoch), training_state(reference, epoch)
    assert sorted(ours_state) == sorted(reference_state)
    assert sum(key.endswith("_average") for key in ours_state) == len(ours.optimizers()["segmentors"][1]) > 0
    assert all(ours_state[key].shape == reference_state[key].shape for key in ours_state)
