"""MKDModel.train_step: what each loss term trains, the logged values, the ablations.

Each test runs the real ``train_step`` eagerly on a fixed synthetic batch of 32 x 32 slices with a
tiny model; the loss functions are wrapped to record their outputs so gradients of single terms can
be taken from the step's own (persistent) tape.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mkd_tf import losses
from mkd_tf.config import load_config
from mkd_tf.models.mkd import MKDLossWeights, MKDModel
from mkd_tf.training import build_method
from tests.scripts import tiny_runs

SIZE, BATCH, CLASSES = 32, 2, 4
SEGMENTOR = {"base_filters": 4, "depth": 2}
ALIGNMENT = {"base_filters": 4, "num_blocks": 1, "disc_filters": 4, "disc_layers": 2}


def make_batch(seed=0, labelled_target=True):
    rng = np.random.default_rng(seed)

    def stream(offset):
        labels = np.zeros((BATCH, SIZE, SIZE), np.int32)
        for b in range(BATCH):  # a few rectangles of different classes
            for c in range(1, CLASSES):
                y, x = rng.integers(0, SIZE - 10, 2)
                labels[b, y : y + 8, x : x + 8] = c
        images = labels[..., None] * 0.7 + offset + rng.normal(0, 0.2, (BATCH, SIZE, SIZE, 1))
        return {"image": tf.constant(images, tf.float32), "label": tf.constant(labels), "has_label": tf.ones(BATCH)}

    batch = {"assistant": stream(-1.0), "target": stream(0.5)}
    if labelled_target:
        batch["target_labelled"] = stream(0.5)
    return batch


#: unless a test says otherwise: the paper's step (distillation from the first step, the full IAM: the target
#: cycle and the discriminators on every step, one batch-norm set per segmentor), so that every loss term
#: runs; the constructor's defaults are `mkd train`'s (tested below)
PAPER_STEP = {"target_cycle": True, "discriminator_every": 1, "pretrain_steps": 0, "domain_norm": False}
PAPER_STEP["syn_domain_norm"] = True  # with domain_norm: S_syn too keeps one set per domain
#: and the paper's losses (CycleGAN's cycle weight, no structure loss, S_syn -> S_real on aligned images only)
PAPER_LOSSES = {"cycle": 10.0, "structure": 0.0, "lambda_s2r_target": 0.0}


def make_model(sgd=0.0, weights=None, alignment=None, **switches):
    """A built model; SGD learning rates so that a zero rate freezes a group exactly."""
    keras.utils.set_random_seed(1)
    switches = {**PAPER_STEP, **switches}
    if not isinstance(weights, MKDLossWeights):
        weights = {**PAPER_LOSSES, **(weights or {})}
    rates = sgd if isinstance(sgd, dict) else {k: sgd for k in ("segmentors", "generators", "discriminators")}
    model = MKDModel(
        CLASSES,
        BATCH,
        segmentor=SEGMENTOR,
        alignment={**ALIGNMENT, **(alignment or {})},
        loss_weights=weights,
        optimizers={k: keras.optimizers.SGD(v) for k, v in rates.items()},
        **switches,
    )
    model.build_for((SIZE, SIZE, 1))
    model.build_optimizers()
    return model


def groups(model):
    iam = model.alignment
    return {
        "S_syn": model.synthetic_segmentor.trainable_variables,
        "S_real": model.real_segmentor.trainable_variables,
        "G": iam.assistant_to_target.trainable_variables,
        "F": iam.target_to_assistant.trainable_variables,
        "D_target": iam.target_discriminator.trainable_variables,
        "D_assistant": iam.assistant_discriminator.trainable_variables,
    }


def snapshot(model):
    return {name: [v.numpy().copy() for v in variables] for name, variables in groups(model).items()}


def changed(before, after):
    return {name for name in before if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))}


def gradient_norm(tape, tensor, variables):
    # A vector target is summed by the tape (a reduce_sum here would run outside the recording).
    gradients = tape.gradient(tensor, variables)
    return sum(float(tf.reduce_sum(tf.abs(g))) for g in gradients if g is not None)


@pytest.fixture(scope="module")
def gradient_map():
    """For each recorded loss term of one step: which variable groups its gradient reaches.

    Plain generators: residual ones start as the identity, where the cycle loss |x - F(G(x))| is
    exactly 0 and (|.| having a zero gradient at 0) reaches nothing on the first step."""
    model = make_model(sgd=0.01, alignment={"residual": False})
    recorded = []
    originals = {}
    names = ["segmentation_loss", "distillation_loss", "lsgan_generator_loss", "cycle_loss", "lsgan_discriminator_loss"]
    for name in names:
        originals[name] = getattr(losses, name)

        def recorder(*args, _name=name, **kwargs):
            value = originals[_name](*args, **kwargs)
            recorded.append((_name, value))
            return value

        setattr(losses, name, recorder)
    reached = {}
    original_step = model.step

    def inspecting_step(tape, loss, group):
        if not reached:  # first optimizer step: the tape holds the whole forward pass
            for index, (name, value) in enumerate(recorded):
                key = f"{name}#{sum(1 for n, _ in recorded[:index] if n == name)}"
                reached[key] = {g: gradient_norm(tape, value, v) for g, v in groups(model).items()}
        return original_step(tape, loss, group)

    model.step = inspecting_step
    try:
        model.train_step(make_batch())
    finally:
        for name in names:
            setattr(losses, name, originals[name])
    return {key: {g for g, norm in norms.items() if norm > 0} for key, norms in reached.items()}


# Call order inside train_step: segmentation (S_syn on aligned, S_real and S_syn on labelled target), distillation
# (s2r, r2s), generator LSGAN (G, F), cycle (assistant, target), discriminator LSGAN (D_T, D_A).
@pytest.mark.parametrize(
    "term, expected",
    [
        ("segmentation_loss#0", {"S_syn", "G"}),  # seg on aligned images reaches the generator G
        ("segmentation_loss#1", {"S_real"}),
        ("segmentation_loss#2", {"S_syn"}),  # syn_on_target (default 1): S_syn on labelled target images
        ("distillation_loss#0", {"S_real"}),  # kd_s2r: teacher S_syn and the aligned images are stop-gradient
        ("distillation_loss#1", {"S_syn"}),  # kd_r2s: teacher S_real is stop-gradient
        ("lsgan_generator_loss#0", {"G", "D_target"}),
        ("lsgan_generator_loss#1", {"F", "D_assistant"}),
        ("cycle_loss#0", {"G", "F"}),
        ("cycle_loss#1", {"G", "F"}),
        # The discriminators' loss shares their scores of the translated images with the generators' adversarial
        # loss, so on the tape it reaches the generator that made them; its optimizer takes only the
        # discriminators' weights (test_optimizers_update_only_their_groups).
        ("lsgan_discriminator_loss#0", {"D_target", "G"}),
        ("lsgan_discriminator_loss#1", {"D_assistant", "F"}),
    ],
)
def test_each_loss_term_reaches_exactly_its_networks(gradient_map, term, expected):
    assert len(gradient_map) == 11
    assert gradient_map[term] == expected


def test_optimizers_update_only_their_groups():
    # Generator objective switched off entirely: G and F must not move, everything else does.
    model = make_model(sgd=0.1, weights={"adversarial": 0.0, "cycle": 0.0, "segmentation_to_generator": 0.0})
    before = snapshot(model)
    model.train_step(make_batch())
    assert changed(before, snapshot(model)) == {"S_syn", "S_real", "D_target", "D_assistant"}

    # Only the segmentation term in G's objective: G moves (anatomy-preserving alignment), F does not.
    model = make_model(
        sgd={"segmentors": 0.0, "generators": 0.1, "discriminators": 0.0},
        weights={"adversarial": 0.0, "cycle": 0.0, "segmentation_to_generator": 1.0},
    )
    before = snapshot(model)
    model.train_step(make_batch())
    assert changed(before, snapshot(model)) == {"G"}


def test_kd_terms_alone_train_only_the_students():
    """With the supervised terms removed, each KD direction moves only its student."""
    original = losses.segmentation_loss
    try:
        losses.segmentation_loss = lambda labels, probabilities: 0.0 * original(labels, probabilities)
        for switches, student in (({"kd_r2s": False}, "S_real"), ({"kd_s2r": False}, "S_syn")):
            model = make_model(sgd={"segmentors": 0.5, "generators": 0.0, "discriminators": 0.0}, **switches)
            before = snapshot(model)
            model.train_step(make_batch())
            assert changed(before, snapshot(model)) & {"S_syn", "S_real"} == {student}
    finally:
        losses.segmentation_loss = original


def independent_terms(model, batch, temperature, aligned=True, s2r_on_target=False):
    """Loss terms of the step computed outside it, from the same weights."""

    def mean(values):
        return float(tf.reduce_mean(values))

    assistant, target, labelled = batch["assistant"], batch["target"], batch.get("target_labelled")
    images = model.alignment.assistant_to_target(assistant["image"], training=True) if aligned else assistant["image"]
    syn, real = model.synthetic_segmentor, model.real_segmentor
    terms = {
        "seg_syn": mean(losses.segmentation_loss(assistant["label"], tf.nn.softmax(syn(images, training=True)))),
        "kd_s2r": mean(losses.distillation_loss(syn(images, training=True), real(images, training=True), temperature)),
        "kd_r2s": mean(
            losses.distillation_loss(
                real(target["image"], training=True), syn(target["image"], training=True), temperature
            )
        ),
    }
    if s2r_on_target:
        terms["kd_s2r_target"] = mean(
            losses.distillation_loss(
                syn(target["image"], training=True), real(target["image"], training=True), temperature
            )
        )
    if labelled is not None:
        for name, segmentor in (("seg_real", real), ("seg_syn_target", syn)):
            terms[name] = mean(
                losses.segmentation_loss(labelled["label"], tf.nn.softmax(segmentor(labelled["image"], training=True)))
            )
    return terms


@pytest.mark.parametrize("use_iam", [True, False])
def test_logged_terms_and_total_match_an_independent_computation(use_iam):
    weights = {"temperature": 3.0, "lambda_s2r": 0.7, "lambda_r2s": 1.9, "syn_on_target": 0.6, "lambda_s2r_target": 0.4}
    model = make_model(sgd=0.1, weights=weights, use_iam=use_iam)
    batch = make_batch()
    expected = independent_terms(model, batch, 3.0, aligned=use_iam, s2r_on_target=True)
    logs = {name: float(value) for name, value in model.train_step(batch).items()}
    iam_terms = {"adversarial", "cycle", "discriminator"} if use_iam else set()
    assert set(logs) == set(expected) | iam_terms | {"total"}
    for name, value in expected.items():
        assert logs[name] == pytest.approx(value, rel=1e-5), name
    assert logs["total"] == pytest.approx(
        expected["seg_syn"]
        + expected["seg_real"]
        + 0.6 * expected["seg_syn_target"]
        + 0.7 * expected["kd_s2r"]
        + 1.9 * expected["kd_r2s"]
        + 0.4 * expected["kd_s2r_target"],
        rel=1e-5,
    )
    # Without the IAM S_syn learned from the raw assistant images: its loss differs from the aligned one.
    if not use_iam:
        assert model.alignment is None and set(model.optimizers()) == {"segmentors"}


def test_without_target_labels_s_real_learns_from_distillation_only():
    """The unsupervised setting: no labelled target stream, no seg_real; S_real still moves (kd_s2r)."""
    model = make_model(sgd={"segmentors": 0.1, "generators": 0.0, "discriminators": 0.0})
    batch = make_batch(labelled_target=False)
    expected = independent_terms(model, batch, 2.0)
    before = snapshot(model)
    logs = {name: float(value) for name, value in model.train_step(batch).items()}
    assert not {"seg_real", "seg_syn_target"} & (set(logs) | set(expected))
    assert logs["total"] == pytest.approx(expected["seg_syn"] + expected["kd_s2r"] + expected["kd_r2s"], rel=1e-5)
    assert {"S_syn", "S_real"} <= changed(before, snapshot(model))


def test_a_short_training_lowers_the_segmentation_losses(tmp_path_factory):
    """The compiled MKD run on the phantom (2 epochs x 10 steps): both supervised losses go down; the IAM
    learns in the warm start (epoch 1) and is frozen in distillation (epoch 2 logs none of its losses)."""
    run = tiny_runs.main_mkd_run(tmp_path_factory)
    first, second = (e["losses"] for e in json.loads((run.path / "history.json").read_text())["epochs"])
    assert second["seg_syn"] < first["seg_syn"]
    assert second["seg_real"] < first["seg_real"]
    assert first["discriminator"] > 0 and "discriminator" not in second and "cycle" not in second


def test_get_config_and_image_panels():
    model = make_model(weights={"temperature": 4.0}, kd_r2s=False)
    config = model.get_config()
    assert config["loss_weights"]["temperature"] == 4.0 and config["kd_r2s"] is False and config["use_iam"] is True
    assert config["segmentor"] == SEGMENTOR and config["num_classes"] == CLASSES
    panels = model.image_panels(make_batch())
    assert set(panels) == {
        "target_image",
        "assistant_image",
        "aligned_assistant",
        "target_prediction_syn",
        "target_prediction_real",
        "target_ground_truth",
    }
    for images in panels.values():
        assert images.shape == (BATCH, SIZE, SIZE, 1)
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0


def loss_term_reach(model, call, name="segmentation_loss"):
    """Run one ``train_step``; return its logs, the per-example loss of its ``call``-th call of
    ``losses.<name>`` and the groups whose parameters that loss has a nonzero gradient for."""
    recorded, reached = [], {}
    original, original_step = getattr(losses, name), model.step

    def recorder(*args, **kwargs):
        recorded.append(original(*args, **kwargs))
        return recorded[-1]

    def inspecting_step(tape, loss, group):
        if not reached:
            reached.update({g: gradient_norm(tape, recorded[call], v) for g, v in groups(model).items()})
        return original_step(tape, loss, group)

    model.step = inspecting_step
    setattr(losses, name, recorder)
    try:
        logs = model.train_step(make_batch())
    finally:
        setattr(losses, name, original)
    return logs, recorded[call], {g for g, norm in reached.items() if norm > 0}


def test_structure_loss_reaches_only_the_generators():
    # structure calls: G(assistant) against the assistant, F(target) against the target
    model = make_model(sgd=0.01, weights={"structure": 1.0})
    logs, first, reached = loss_term_reach(model, 0, name="structure_loss")
    assert reached == {"G"}
    _, second, reached = loss_term_reach(make_model(sgd=0.01, weights={"structure": 1.0}), 1, name="structure_loss")
    assert reached == {"F"}
    assert float(logs["structure"]) == pytest.approx(float(tf.reduce_mean(first + second)), rel=1e-4)
    assert "structure" not in make_model(sgd=0.01).train_step(make_batch())  # off by default (the paper)


def test_s_syn_supervised_on_labelled_target_images_reaches_only_s_syn():
    # segmentation calls: S_syn on aligned, S_real on labelled CT, S_syn on labelled CT
    model = make_model(sgd=0.01, domain_norm=True)  # syn_on_target is on by default
    logs, loss, reached = loss_term_reach(model, 2)
    assert reached == {"S_syn"}
    assert float(logs["seg_syn_target"]) == pytest.approx(float(tf.reduce_mean(loss)), rel=1e-5)
    paper = make_model(sgd=0.01, weights={"syn_on_target": 0.0})
    assert "seg_syn_target" not in paper.train_step(make_batch())


def test_s_syn_to_s_real_distillation_on_target_images_reaches_only_s_real():
    # distillation calls: s2r on aligned images, r2s on target images, s2r on target images
    model = make_model(sgd=0.01, domain_norm=True, weights={"lambda_s2r_target": 1.0})
    logs, loss, reached = loss_term_reach(model, 2, name="distillation_loss")
    assert reached == {"S_real"}  # the teacher S_syn is stop-gradient
    assert float(logs["kd_s2r_target"]) == pytest.approx(float(tf.reduce_mean(loss)), rel=1e-5)
    off = make_model(sgd=0.01, weights={"lambda_s2r_target": 0.0}).train_step(make_batch())
    assert "kd_s2r_target" not in off  # 0: the paper's step


def test_warm_start_step_trains_both_segmentors_on_the_assistant_and_the_iam_alone():
    model = make_model(sgd=0.05, pretrain_steps=5)
    batch = make_batch(labelled_target=False)  # the warm start never reads labelled target slices
    before = snapshot(model)
    logs = model.pretrain_step(batch)
    assert set(logs) == {"seg_syn", "seg_real", "adversarial", "cycle", "discriminator", "total"}
    after = snapshot(model)
    assert changed(before, after) == {"S_syn", "S_real", "G", "F", "D_target", "D_assistant"}
    # Both segmentors learn the assistant's labels on raw assistant images (no alignment in between).
    expected = [
        float(
            tf.reduce_mean(
                losses.segmentation_loss(
                    batch["assistant"]["label"], tf.nn.softmax(segmentor(batch["assistant"]["image"], training=True))
                )
            )
        )
        for segmentor in (make_model().synthetic_segmentor, make_model().real_segmentor)
    ]
    assert [float(logs["seg_syn"]), float(logs["seg_real"])] == pytest.approx(expected, rel=1e-4)
    assert int(model.step_counter.numpy()) == 1 and model.get_config()["pretrain_steps"] == 5


def _norm_stats(segmentor, domain):
    return [v.numpy().copy() for v in segmentor.variables if f"_domain{domain}/moving_mean" in v.path]


def test_domain_norm_keeps_each_domains_statistics_and_starts_the_target_from_the_warm_start():
    """With ``domain_norm`` aligned images only move batch-norm set 0, target images only set 1; the warm
    start trains set 0, and at its end set 1 (and its moving average) starts as a copy of it."""
    keras.utils.set_random_seed(1)
    ema = {k: keras.optimizers.SGD(0.1) for k in ("generators", "discriminators")}
    ema["segmentors"] = keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5)
    model = MKDModel(
        CLASSES,
        BATCH,
        segmentor=SEGMENTOR,
        alignment=ALIGNMENT,
        domain_norm=True,
        syn_domain_norm=True,
        optimizers=ema,
        pretrain_steps=1,
    )
    model.build_for((SIZE, SIZE, 1))
    model.build_optimizers()
    assert model.real_segmentor.num_domains == 2 and model.real_segmentor.default_domain == 1
    target_before = _norm_stats(model.real_segmentor, 1)
    model.pretrain_step(make_batch(0))  # assistant images only
    for before, after in zip(target_before, _norm_stats(model.real_segmentor, 1)):
        np.testing.assert_array_equal(before, after)
    assistant_after_warm_start = _norm_stats(model.real_segmentor, 0)
    model.end_pretraining()
    for segmentor in (model.real_segmentor, model.synthetic_segmentor):
        for source, destination in segmentor.domain_variable_pairs(0, 1):
            np.testing.assert_array_equal(source.numpy(), destination.numpy())
    averages = model.average_by_variable()
    assert averages  # the segmentors' (use_ema) averages, kept by the model
    for source, destination in model.real_segmentor.domain_variable_pairs(0, 1):
        if id(source) in averages:
            np.testing.assert_array_equal(averages[id(source)].numpy(), averages[id(destination)].numpy())
    model.train_step(make_batch(1))  # both domains now: each set moves with its own images
    assert not all(
        np.array_equal(a, b) for a, b in zip(assistant_after_warm_start, _norm_stats(model.real_segmentor, 0))
    )
    assert not all(
        np.array_equal(a, b) for a, b in zip(_norm_stats(model.real_segmentor, 0), _norm_stats(model.real_segmentor, 1))
    )
    images = make_batch(2)["target"]["image"]
    np.testing.assert_allclose(
        model.predict_probabilities(images, "real"), tf.nn.softmax(model.real_segmentor(images, domain=1)), rtol=1e-6
    )
    assert model.get_config()["domain_norm"] is True


def test_without_r2s_distillation_s_syn_predicts_the_target_with_the_set_it_trains():
    """Without S_real -> S_syn distillation and without its own target supervision S_syn never sees a
    target image, so its target batch-norm set never trains after the warm start; with ``domain_norm`` it
    then predicts target images with its assistant-domain set (the one trained on aligned images), and
    S_real with its target set. With target supervision (the default) S_syn keeps the target set."""
    model = make_model(sgd=0.1, domain_norm=True, kd_r2s=False, weights={"syn_on_target": 0.0})
    assert (model.synthetic_segmentor.default_domain, model.real_segmentor.default_domain) == (0, 1)
    syn_target_before = _norm_stats(model.synthetic_segmentor, 1)
    model.train_step(make_batch(0))
    for before, after in zip(syn_target_before, _norm_stats(model.synthetic_segmentor, 1)):
        np.testing.assert_array_equal(before, after)  # never trained: the reason for the choice
    images = make_batch(2)["target"]["image"]
    np.testing.assert_allclose(
        model.predict_probabilities(images, "syn"),
        tf.nn.softmax(model.synthetic_segmentor(images, domain=0)),
        rtol=1e-6,
    )
    full = make_model(sgd=0.1, domain_norm=True)
    assert (full.synthetic_segmentor.default_domain, full.real_segmentor.default_domain) == (1, 1)
    # --target-labelled 0: no labelled target slices, so the default syn_on_target cannot train the set
    segmentor = {"domain_norm": True, "syn_domain_norm": True}
    paper = {"lambda_s2r_target": 0.0}  # S_syn -> S_real on the target would show S_syn target images
    settings = {"method": "mkd", "ablation": {"kd_r2s": False}, "segmentor": segmentor, "loss": paper}
    for labelled, domain in ((0, 0), (1, 1)):
        config = load_config(overrides={**settings, "data": {"target_labelled": labelled}})
        assert build_method(config, CLASSES).synthetic_segmentor.default_domain == domain
    supervised = make_model(sgd=0.1, domain_norm=True, kd_r2s=False)
    assert supervised.synthetic_segmentor.default_domain == 1
    teaching = make_model(domain_norm=True, kd_r2s=False, weights={"syn_on_target": 0.0, "lambda_s2r_target": 1.0})
    assert teaching.synthetic_segmentor.default_domain == 1  # it runs on target images to teach S_real there
    syn_target_before = _norm_stats(supervised.synthetic_segmentor, 1)
    supervised.train_step(make_batch(0))
    moved = [
        not np.array_equal(b, a) for b, a in zip(syn_target_before, _norm_stats(supervised.synthetic_segmentor, 1))
    ]
    assert all(moved)  # the labelled target slices train it


def test_syn_domain_norm_off_gives_s_syn_one_set_and_s_real_one_per_domain():
    """``syn_domain_norm=False``: S_syn reads aligned and target images through its one batch-norm set
    (the same logits on a batch whichever domain it is read as), S_real keeps one set per domain; the
    end of the warm start starts S_real's target set from its assistant set, S_syn has nothing to copy."""
    model = make_model(sgd=0.1, domain_norm=True, syn_domain_norm=False, pretrain_steps=1)
    syn, real = model.synthetic_segmentor, model.real_segmentor
    assert (syn.num_domains, real.num_domains, real.default_domain) == (1, 2, 1)
    syn_statistics = [v.numpy().copy() for v in syn.variables if "moving_mean" in v.path]
    model.pretrain_step(make_batch(0))
    model.end_pretraining()
    for source, destination in real.domain_variable_pairs(0, 1):
        np.testing.assert_array_equal(source.numpy(), destination.numpy())
    model.train_step(make_batch(1))
    moved = [not np.array_equal(b, v.numpy()) for b, v in zip(syn_statistics, syn.variables) if "moving_mean" in v.path]
    assert moved and all(moved)
    images = make_batch(2)["target"]["image"]
    np.testing.assert_array_equal(model.on_assistant(syn, images), model.on_target(syn, images))
    assert not np.allclose(model.on_assistant(real, images), model.on_target(real, images), atol=1e-4)
    np.testing.assert_allclose(model.predict_probabilities(images, "syn"), tf.nn.softmax(syn(images)), rtol=1e-6)
    assert model.get_config()["syn_domain_norm"] is False
    # the setting reaches the model from a config; without domain_norm it has nothing to split
    config = load_config(overrides={"method": "mkd", "segmentor": {"syn_domain_norm": False}})
    built = build_method(config, CLASSES)
    assert (built.synthetic_segmentor.num_domains, built.real_segmentor.num_domains) == (1, 2)
    plain = make_model(syn_domain_norm=False)
    assert (plain.synthetic_segmentor.num_domains, plain.real_segmentor.num_domains) == (1, 1)
    assert make_model(domain_norm=True).synthetic_segmentor.num_domains == 2  # syn_domain_norm true: S_syn splits too


def previous_alignment_losses(model, assistant_images, target_images, aligned, logs):
    """MKDModel.alignment_losses as it was before each discriminator ran once on the translated images: the
    discriminators' loss ran them again on stop-gradient copies."""
    w, iam = model.loss_weights, model.alignment
    target_as_assistant = iam.target_to_assistant(target_images, training=True)
    assistant_cycle = iam.target_to_assistant(aligned, training=True)
    target_cycle = iam.assistant_to_target(target_as_assistant, training=True)
    logs["adversarial"] = model.average(
        losses.lsgan_generator_loss(iam.target_discriminator(aligned, training=True))
        + losses.lsgan_generator_loss(iam.assistant_discriminator(target_as_assistant, training=True))
    )
    logs["cycle"] = model.average(
        losses.cycle_loss(assistant_images, assistant_cycle) + losses.cycle_loss(target_images, target_cycle)
    )
    logs["discriminator"] = model.average(
        losses.lsgan_discriminator_loss(
            iam.target_discriminator(target_images, training=True),
            iam.target_discriminator(tf.stop_gradient(aligned), training=True),
        )
        + losses.lsgan_discriminator_loss(
            iam.assistant_discriminator(assistant_images, training=True),
            iam.assistant_discriminator(tf.stop_gradient(target_as_assistant), training=True),
        )
    )
    generator_loss = w.adversarial * logs["adversarial"] + w.cycle * logs["cycle"]
    logs["structure"] = model.average(
        losses.structure_loss(assistant_images, aligned) + losses.structure_loss(target_images, target_as_assistant)
    )
    return generator_loss + w.structure * logs["structure"]


def test_discriminators_run_once_on_translated_images_with_the_same_losses_and_gradients():
    # plain generators (not the identity at the start) and a structure weight: every term is non-trivial
    model = make_model(sgd=0.01, weights={"structure": 3.0, "cycle": 0.3}, alignment={"residual": False})
    batch = make_batch()
    assistant, target = batch["assistant"]["image"], batch["target"]["image"]
    iam = model.alignment
    results = []
    for compute in (previous_alignment_losses, MKDModel.alignment_losses):
        logs = {}
        with tf.GradientTape(persistent=True) as tape:
            aligned = iam.assistant_to_target(assistant, training=True)
            generator_loss = compute(model, assistant, target, aligned, logs)
        gradients = tape.gradient(generator_loss, iam.generator_variables) + tape.gradient(
            logs["discriminator"], iam.discriminator_variables
        )
        results.append(({k: float(v) for k, v in logs.items()}, float(generator_loss), gradients))
    (before, generator_before, gradients_before), (after, generator_after, gradients_after) = results
    assert set(after) == set(before) == {"adversarial", "cycle", "discriminator", "structure"}
    assert after == pytest.approx(before, rel=1e-6) and generator_after == pytest.approx(generator_before, rel=1e-6)
    assert len(gradients_after) == len(gradients_before) > 0
    assert all(g is not None for g in gradients_after)
    for old, new in zip(gradients_before, gradients_after):
        np.testing.assert_allclose(new.numpy(), old.numpy(), rtol=1e-5, atol=1e-7)


def test_without_the_target_cycle_g_never_translates_f_of_the_target():
    model = make_model(sgd=0.01, alignment={"residual": False}, target_cycle=False)
    batch = make_batch()
    calls = []
    generator = model.alignment.assistant_to_target
    original = generator.call
    generator.call = lambda images, training=False: calls.append(images) or original(images, training=training)
    try:
        logs = model.train_step(batch)
    finally:
        generator.call = original
    assert len(calls) == 1  # G(assistant) only, not G(F(target))
    iam, assistant = model.alignment, batch["assistant"]["image"]
    # the cycle is the assistant's alone (computed with the weights before the step)
    fresh = make_model(sgd=0.01, alignment={"residual": False}).alignment
    expected = tf.reduce_mean(
        losses.cycle_loss(
            assistant, fresh.target_to_assistant(fresh.assistant_to_target(assistant, training=True), training=True)
        )
    )
    assert float(logs["cycle"]) == pytest.approx(float(expected), rel=1e-5)
    before = snapshot(model)
    model.train_step(batch)
    assert changed(before, snapshot(model)) == set(groups(model)) and iam is model.alignment


def test_discriminators_learn_on_every_kth_step_only():
    model = make_model(sgd=0.05, alignment={"residual": False}, discriminator_every=2)
    step = tf.function(model.train_step)  # as training runs it: the update is a tf.cond on the step counter
    batch = make_batch()
    moved = []
    for _ in range(4):
        before = snapshot(model)
        logs = step(batch)
        assert float(logs["discriminator"]) > 0  # computed and logged on every step
        moved.append(changed(before, snapshot(model)))
    everything, without_discriminators = set(groups(model)), {"S_syn", "S_real", "G", "F"}
    assert moved == [everything, without_discriminators, everything, without_discriminators]
    assert int(model.discriminator_optimizer.iterations.numpy()) == 2


def test_a_frozen_iam_runs_only_g_after_the_warm_start_and_the_segmentors_still_learn():
    model = make_model(sgd=0.05, alignment={"residual": False}, pretrain_steps=1, freeze_iam_after_warm_start=True)
    batch = make_batch()
    before = snapshot(model)
    model.pretrain_step(batch)  # the warm start trains the IAM as usual
    assert changed(before, snapshot(model)) == set(groups(model))
    model.end_pretraining()
    for _ in range(2):
        before = snapshot(model)
        logs = model.train_step(batch)
        assert changed(before, snapshot(model)) == {"S_syn", "S_real"}
    assert not {"adversarial", "cycle", "discriminator"} & set(logs)
    # S_syn learns on G's (inference-mode) translation of the assistant images
    aligned = model.alignment.assistant_to_target(batch["assistant"]["image"], training=False)
    expected = tf.reduce_mean(
        losses.segmentation_loss(
            batch["assistant"]["label"], tf.nn.softmax(model.on_assistant(model.synthetic_segmentor, aligned))
        )
    )
    assert float(model.train_step(batch)["seg_syn"]) == pytest.approx(float(expected), rel=1e-4)


def test_the_default_cheaper_iam_reaches_the_model_and_trains_and_mkd_full_iam_restores_the_paper_s():
    from mkd_tf import registry
    from mkd_tf.models.mkd import AUTO_DISCRIMINATOR_EVERY

    overrides = {
        "method": "mkd",
        "data": {"batch_size": BATCH},
        "segmentor": {**SEGMENTOR},
        "alignment": {**ALIGNMENT},
        "schedule": {"epochs": 1, "steps_per_epoch": 4},
    }
    model = build_method(load_config(overrides=overrides), CLASSES)
    # the defaults: no target cycle, the discriminators' period left to the strategy, frozen after the warm start
    assert (model.target_cycle, model.discriminator_every, model.freeze_iam_after_warm_start) == (False, None, True)
    assert model.get_config()["discriminator_every"] is None and model.pretrain_steps == 2
    model.build_for((SIZE, SIZE, 1))
    model.build_optimizers()
    batch = make_batch()
    # eager: tracing both steps costs ~15 s; test_discriminators_learn_on_every_kth_step_only compiles them
    # on one device the discriminators learn on steps 0, 2, 4, ...
    discriminator = model.alignment.assistant_discriminator.trainable_variables[0]
    seen = [discriminator.numpy().copy()]
    first = []
    for _ in range(2):
        first.append(float(model.pretrain_step(batch)["total"]))
        seen.append(discriminator.numpy().copy())
    assert AUTO_DISCRIMINATOR_EVERY == 2
    assert not np.array_equal(seen[1], seen[0]) and np.array_equal(seen[2], seen[1])
    model.end_pretraining()
    later = [float(model.train_step(batch)["total"]) for _ in range(2)]
    assert all(np.isfinite(first + later))
    # no warm start: nothing to freeze after, the IAM learns throughout
    unfrozen = build_method(
        load_config(overrides={**overrides, "schedule": {"epochs": 1, "steps_per_epoch": 4, "mkd_pretrain": 0.0}}),
        CLASSES,
    )
    assert unfrozen.freeze_iam_after_warm_start is False
    # the constructor's defaults are the same cheaper IAM (frozen only after a warm start)
    constructed = MKDModel(CLASSES, BATCH, segmentor=SEGMENTOR, alignment=ALIGNMENT, pretrain_steps=2)
    assert (constructed.target_cycle, constructed.discriminator_every, constructed.freeze_iam_after_warm_start) == (
        False,
        None,
        True,
    )
    without_warm_start = MKDModel(CLASSES, BATCH, segmentor=SEGMENTOR, alignment=ALIGNMENT, pretrain_steps=0)
    assert without_warm_start.freeze_iam_after_warm_start is False
    # mkd-full-iam: the paper's IAM training
    full = registry.variant_overrides("mkd-full-iam")
    assert set(full) == {"alignment"}
    paper = build_method(load_config(overrides={**overrides, "alignment": {**ALIGNMENT, **full["alignment"]}}), CLASSES)
    assert (paper.target_cycle, paper.discriminator_every, paper.freeze_iam_after_warm_start) == (True, 1, False)


def test_the_model_built_without_settings_is_the_one_mkd_train_builds():
    """Every constructor setting left out is mkd train's default (mkd_tf.config), not a default of its own."""
    keras.utils.set_random_seed(1)
    constructed = MKDModel(CLASSES, 8)
    keras.utils.set_random_seed(1)
    trained = build_method(load_config(overrides={"method": "mkd"}), CLASSES)
    assert constructed.get_config() == {**trained.get_config(), "name": constructed.name}
    assert constructed.get_config()["loss_weights"]["cycle"] == 0.3 and constructed.pretrain_steps == 1400
    for role, (optimizer, _) in trained.optimizers().items():
        default, _ = constructed.optimizers()[role]
        assert type(default) is type(optimizer) and default.get_config() == {
            **optimizer.get_config(),
            "name": default.name,
        }


def test_the_default_discriminator_period_is_every_step_under_a_distribution_strategy():
    model = make_model(sgd=0.05, discriminator_every=None)
    assert model.discriminator_period() == 2
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        assert model.discriminator_period() == 1  # (then finish_step takes the every-step path)
    assert make_model(discriminator_every=3).discriminator_period() == 3


def test_skipping_discriminator_updates_under_a_distribution_strategy_fails_in_one_line():
    from mkd_tf.errors import MkdError

    model = make_model(sgd=0.05, discriminator_every=2)
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope(), pytest.raises(MkdError) as raised:
        model.train_step(make_batch())
    assert str(raised.value).startswith("alignment.discriminator_every: 2 needs strategy default")
