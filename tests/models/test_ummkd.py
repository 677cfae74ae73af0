import numpy as np
import pytest
import tensorflow as tf

import keras

from mkd_tf import losses
from mkd_tf.config import load_config
from mkd_tf.models.segmentor import Segmentor
from mkd_tf.training import build_method
from mkd_tf.models.ummkd import UMMKDModel
from tests.models.test_segmentor import expected_parameters

NUM_CLASSES, BATCH, SIZE = 4, 4, 32
SEGMENTOR = {"base_filters": 4, "depth": 2}
# Per-class intensities: the assistant modality has the reversed contrast of the target.
TARGET_INTENSITIES = (0.0, 1.0, 2.0, 3.0)
ASSISTANT_INTENSITIES = (3.0, 2.0, 1.0, 0.0)


def stream(seed, intensities, batch=BATCH):
    """Slices with three random rectangles (classes 1, 2, 3) on background, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((batch, SIZE, SIZE), np.int32)
    for b in range(batch):
        for c in (1, 2, 3):
            top, left = rng.integers(0, 20, size=2)
            height, width = rng.integers(8, 13, size=2)
            labels[b, top : top + height, left : left + width] = c
    images = np.asarray(intensities, np.float32)[labels] + rng.normal(scale=0.2, size=labels.shape)
    return {"image": images[..., None].astype(np.float32), "label": labels, "has_label": np.ones(batch, np.float32)}


def make_batch(seed=0):
    return {
        "assistant": stream(seed, ASSISTANT_INTENSITIES),
        "target": stream(seed + 1, TARGET_INTENSITIES),
        "target_labelled": stream(seed + 2, TARGET_INTENSITIES),
    }


def make_model(optimizer=None, **kwargs):
    model = UMMKDModel(NUM_CLASSES, BATCH, dict(SEGMENTOR), optimizer or keras.optimizers.Adam(1e-2), **kwargs)
    model.build_for((SIZE, SIZE, 1))
    model.build_optimizers()
    return model


def images(seed=5, intensities=TARGET_INTENSITIES):
    return stream(seed, intensities)["image"]


def batch_norms(net, domain):
    return [layer for layer in net._flatten_layers() if layer.name.endswith(f"_domain{domain}")]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def classwise_kl_reference(teacher_logits, student_logits, teacher_labels, student_labels, temperature):
    """UMMKD's class-wise KL in NumPy: per class present in both, KL of softened mean logits."""
    values = []
    for c in range(NUM_CLASSES):
        in_teacher, in_student = teacher_labels == c, student_labels == c
        if in_teacher.any() and in_student.any():
            q_teacher = softmax(teacher_logits[in_teacher].astype(np.float64).mean(0) / temperature)
            q_student = softmax(student_logits[in_student].astype(np.float64).mean(0) / temperature)
            values.append(np.sum(q_teacher * (np.log(q_teacher) - np.log(q_student))))
    return np.mean(values)


@pytest.fixture(scope="module")
def trained():
    """A model after 30 steps on one synthetic batch, with its per-step losses."""
    keras.utils.set_random_seed(0)
    model = make_model()
    batch = make_batch()
    step = tf.function(model.train_step)
    history = [{name: float(value) for name, value in step(batch).items()} for _ in range(30)]
    return model, batch, history


def test_kernels_shared_and_batch_norm_per_modality():
    keras.utils.set_random_seed(0)
    net = make_model().network
    assert net.num_domains == 2 and net.default_domain == 1 and net.norm == "batch"
    # Hand count (see test_segmentor): shared convolutions once, batch norm (gamma, beta, mean,
    # variance) twice: 4 numbers per channel become 8, trainable 2 (gamma, beta) become 4. One domain
    # has 7652; blocks of 4 + 8 + 16 + 8 + 4 = 40 channels with 2 norms each add 2 * 4 * 40 = 320.
    assert net.count_params() == expected_parameters(NUM_CLASSES, 4, 2, norm_params_per_channel=8) == 7652 + 320
    trainable = sum(int(np.prod(v.shape)) for v in net.trainable_variables)
    assert trainable == expected_parameters(NUM_CLASSES, 4, 2, norm_params_per_channel=4)
    single = Segmentor(NUM_CLASSES, **SEGMENTOR)
    single.build((None, SIZE, SIZE, 1))
    convolutions = [v.path for v in net.variables if "norm" not in v.path]

    def inner(path):  # the model's own (auto-numbered) name is not part of the structure
        return path.split("/", 1)[1]

    assert [inner(p) for p in convolutions] == [inner(v.path) for v in single.variables if "norm" not in v.path]
    assert len(batch_norms(net, 0)) == len(batch_norms(net, 1)) == 10  # 5 blocks x 2 convolutions

    # Fresh batch norms are identical, so equal inference outputs mean the kernels are the same ones.
    x = images()
    np.testing.assert_array_equal(net(x, domain=0), net(x, domain=1))

    # A loss through domain 0 reaches every convolution kernel and no domain-1 batch norm.
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(net(x, training=True, domain=0)))
    gradients = dict(zip([v.path for v in net.trainable_variables], tape.gradient(loss, net.trainable_variables)))
    assert all(gradients[path] is not None for path in convolutions)
    assert all(gradient is None for path, gradient in gradients.items() if "_domain1/" in path)
    assert all(gradient is not None for path, gradient in gradients.items() if "_domain0/" in path)


def test_batch_statistics_move_only_for_the_trained_domain():
    keras.utils.set_random_seed(0)
    net = make_model().network

    def statistics(domain):
        return [np.array(layer.moving_mean) for layer in batch_norms(net, domain)]

    before = statistics(0), statistics(1)
    net(images(intensities=TARGET_INTENSITIES), training=True, domain=1)
    np.testing.assert_array_equal(np.concatenate(statistics(0)), np.concatenate(before[0]))
    assert not np.allclose(np.concatenate(statistics(1)), np.concatenate(before[1]))
    after_target = statistics(1)
    net(images(intensities=ASSISTANT_INTENSITIES), training=True, domain=0)
    assert not np.allclose(np.concatenate(statistics(0)), np.concatenate(before[0]))
    np.testing.assert_array_equal(np.concatenate(statistics(1)), np.concatenate(after_target))


def test_losses_match_reference_and_ignore_unlabelled_slices():
    keras.utils.set_random_seed(0)
    model = make_model(keras.optimizers.SGD(0.0), temperature=2.0, kd_weight=0.5)
    batch = make_batch(seed=3)
    # The last target slice is unlabelled; its placeholder labels claim class 3 everywhere.
    target = batch["target_labelled"]
    target["has_label"][-1] = 0.0
    target["label"][-1] = 3
    assistant_logits = np.asarray(model.network(batch["assistant"]["image"], training=True, domain=0))
    target_logits = np.asarray(model.network(target["image"], training=True, domain=1))

    logs = {name: float(value) for name, value in model.train_step(batch).items()}

    labelled = target["has_label"] > 0
    a_labels, t_labels = batch["assistant"]["label"], target["label"][labelled]
    expected_kd = 0.5 * (
        classwise_kl_reference(assistant_logits, target_logits[labelled], a_labels, t_labels, 2.0)
        + classwise_kl_reference(target_logits[labelled], assistant_logits, t_labels, a_labels, 2.0)
    )
    assert expected_kd > 1e-4
    np.testing.assert_allclose(logs["kd"], expected_kd, rtol=1e-3)
    # Counting the unlabelled slice as class 3 would give another value: the mask matters.
    unmasked = 0.5 * (
        classwise_kl_reference(assistant_logits, target_logits, a_labels, target["label"], 2.0)
        + classwise_kl_reference(target_logits, assistant_logits, target["label"], a_labels, 2.0)
    )
    assert abs(unmasked - expected_kd) > 1e-3 * expected_kd

    per_example = losses.segmentation_loss(target["label"], tf.nn.softmax(target_logits)).numpy()
    np.testing.assert_allclose(logs["seg_target"], per_example[labelled].sum() / BATCH, rtol=1e-5)
    per_example = losses.segmentation_loss(a_labels, tf.nn.softmax(assistant_logits)).numpy()
    np.testing.assert_allclose(logs["seg_assistant"], per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(logs["total"], logs["seg_assistant"] + logs["seg_target"] + 0.5 * logs["kd"], rtol=1e-6)
    assert int(model.step_counter.numpy()) == 1


def test_training_reduces_the_loss(trained):
    model, batch, history = trained
    totals = [logs["total"] for logs in history]
    assert np.all(np.isfinite(totals)) and all(logs["kd"] >= 0.0 for logs in history)
    assert totals[-1] < 0.5 * totals[0], totals
    assert int(model.step_counter.numpy()) == len(history)
    # The target path (domain 1) segments its training slices.
    target = batch["target_labelled"]
    predicted = np.argmax(model.network(target["image"], training=True, domain=1), axis=-1)
    assert (predicted == target["label"]).mean() > 0.8


def test_predict_probabilities_uses_the_target_batch_norm(trained):
    model, _, _ = trained
    assert model.predictor_names() == ["ummkd"]
    x = images()
    probabilities = np.asarray(model.predict_probabilities(x))
    assert probabilities.shape == (BATCH, SIZE, SIZE, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities, model.predict_probabilities(x, which="ummkd"), rtol=1e-6)
    np.testing.assert_allclose(probabilities, softmax(np.asarray(model.network(x, domain=1))), rtol=1e-4, atol=1e-6)
    # After training the two modalities' statistics differ, so domain 0 would give other numbers.
    assert not np.allclose(probabilities, softmax(np.asarray(model.network(x, domain=0))), atol=1e-3)


def test_built_from_settings_through_the_registry():
    config = load_config(
        overrides={
            "method": "ummkd",
            "data": {"batch_size": 8},
            "segmentor": {**SEGMENTOR, "norm": "instance"},
            "loss": {"ummkd_temperature": 3.0, "ummkd_weight": 0.25},
        }
    )
    model = build_method(config, NUM_CLASSES)
    assert isinstance(model, UMMKDModel)
    assert (model.temperature, model.kd_weight, model.global_batch_size) == (3.0, 0.25, 8)
    assert model.network.norm == "batch"  # forced: modality-specific batch norm is the method
    assert model.get_config()["segmentor"] == {**config["segmentor"], "norm": "batch"}


def test_two_domain_segmentor_config_round_trip():
    keras.utils.set_random_seed(0)
    net = make_model().network
    config = net.get_config()
    assert (config["num_domains"], config["default_domain"], config["norm"]) == (2, 1, "batch")
    clone = Segmentor.from_config(config)
    clone.build((None, SIZE, SIZE, 1))
    clone.set_weights(net.get_weights())
    # Give each domain different statistics so the comparison below tells the domains apart.
    for domain, intensities in ((0, ASSISTANT_INTENSITIES), (1, TARGET_INTENSITIES)):
        x = images(intensities=intensities)
        for model in (net, clone):
            model(x, training=True, domain=domain)
    x = images()
    for domain in (0, 1):
        np.testing.assert_allclose(clone(x, domain=domain), net(x, domain=domain), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(net(x), net(x, domain=1))  # default_domain
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(net))
    assert isinstance(revived, Segmentor) and revived.get_config() == config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_domains": 2, "norm": "instance"},
        {"num_domains": 0},
        {"num_domains": 2, "default_domain": 2},
        {"default_domain": 1},
    ],
)
def test_invalid_domain_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="domain"):
        Segmentor(NUM_CLASSES, **SEGMENTOR, **kwargs)


def test_calling_an_unknown_domain_raises():
    net = Segmentor(NUM_CLASSES, **SEGMENTOR, num_domains=2)
    with pytest.raises(ValueError, match="domain must be in"):
        net(images(), domain=2)


def test_exported_archive_serves_the_target_domain(trained, tmp_path):
    model, _, _ = trained
    net = model.network
    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(
        "serve",
        lambda x: keras.ops.softmax(net(x, training=False), axis=-1),
        input_signature=[tf.TensorSpec((None, SIZE, SIZE, 1), tf.float32)],
    )
    archive.write_out(str(tmp_path / "ummkd"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "ummkd"))
    x = images(seed=9)
    served = np.asarray(reloaded.serve(tf.constant(x)))
    np.testing.assert_allclose(served, model.predict_probabilities(x), rtol=1e-4, atol=1e-6)
    assert not np.allclose(served, softmax(np.asarray(net(x, domain=0))), atol=1e-3)


def test_mirrored_strategy_step_matches_plain_step():
    """The training loop runs train_step in a replica context (num_replicas_in_sync = 1 here)."""
    batch = make_batch(seed=7)
    keras.utils.set_random_seed(0)
    plain = make_model(keras.optimizers.SGD(0.1))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        mirrored = make_model(keras.optimizers.SGD(0.1))
    mirrored.network.set_weights(plain.network.get_weights())

    @tf.function
    def distributed_step(batch):
        logs = strategy.run(mirrored.train_step, args=(batch,))
        return {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for name, value in logs.items()}

    plain_logs = plain.train_step(batch)
    mirrored_logs = distributed_step(batch)
    for name in ("seg_assistant", "seg_target", "kd", "total"):
        np.testing.assert_allclose(float(mirrored_logs[name]), float(plain_logs[name]), rtol=1e-5)
    for a, b in zip(plain.network.get_weights(), mirrored.network.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
