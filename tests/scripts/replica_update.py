"""One MKD update on 2 mirrored CPU replicas vs. the single-device update on the same global batch.

Run as a subprocess (logical CPU devices must be configured before TensorFlow initialises):

    python tests/scripts/replica_update.py OUT.json

Writes a JSON report that tests/test_training.py asserts on:

- ``max_diff_mirrored``: largest |variable after the mirrored step - after the single-device step|
  over every model and optimizer variable (should be float round-off);
- ``max_diff_wrong``: the same against a single-device step whose losses are divided by the
  *per-replica* batch (2) instead of the global batch (4): what a wrong cross-replica reduction
  would produce (the strategy sums replica gradients, so dividing by the per-replica batch on each
  of the 2 replicas is exactly the single-device loss divided by 2);
- ``max_change``: largest change of a variable in the single-device step (the scale of an update);
- ``replicas_in_sync``: largest difference between the two replicas' copies of a mirrored variable;
- ``losses_single`` / ``losses_mirrored``: the reported losses (mirrored: summed over replicas).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from mkd_tf.models.mkd import MKDModel  # noqa: E402

GLOBAL_BATCH, SIZE, CLASSES = 4, 32, 4
# Instance norm everywhere: batch-norm statistics are per replica (2 slices instead of 4), so with
# batch norm the two updates legitimately differ; instance norm is per example and replica-invariant.
SEGMENTOR = {"base_filters": 4, "depth": 2, "norm": "instance"}
ALIGNMENT = {"base_filters": 4, "num_blocks": 1, "disc_filters": 4, "disc_layers": 2, "norm": "instance"}


def make_model(global_batch_size):
    # Plain SGD: the update is lr * gradient, so any error in the loss scaling shows up 1:1.
    optimizers = {name: keras.optimizers.SGD(0.1) for name in ("generators", "discriminators")}
    # The segmentors' weights are averaged (``use_ema``, kept by the model): updated on every replica too.
    optimizers["segmentors"] = keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5)
    model = MKDModel(
        CLASSES,
        global_batch_size,
        segmentor=SEGMENTOR,
        alignment=ALIGNMENT,
        optimizers=optimizers,
        pretrain_steps=0,  # distillation from the first step, with the IAM learning
        domain_norm=False,  # instance norm (see SEGMENTOR)
    )
    model.build_for((SIZE, SIZE, 1))
    model.build_optimizers()
    return model


def state(model):
    """Every model and optimizer variable and weight average, in a fixed order."""
    variables = list(model.variables)
    for optimizer, _ in model.optimizers().values():
        variables += list(optimizer.variables)
    return variables + [average for _, average in model.moving_averages()]


def fixed_batch():
    rng = np.random.default_rng(3)

    def stream():
        labels = rng.integers(0, CLASSES, (GLOBAL_BATCH, SIZE, SIZE)).astype(np.int32)
        images = (labels[..., None] * 0.5 + rng.normal(0, 0.3, (GLOBAL_BATCH, SIZE, SIZE, 1))).astype(np.float32)
        return {"image": images, "label": labels, "has_label": np.ones(GLOBAL_BATCH, np.float32)}

    return {"assistant": stream(), "target": stream(), "target_labelled": stream()}


def tensors(batch):
    return tf.nest.map_structure(tf.constant, batch)


def single_step(initial, batch, global_batch_size):
    """One eager update under the default strategy (eager and graph compute the same step)."""
    model = make_model(global_batch_size)
    for variable, value in zip(state(model), initial):
        variable.assign(value)
    logs = model.train_step(tensors(batch))
    return model, {name: float(value) for name, value in logs.items()}


def main(out):
    batch = fixed_batch()
    keras.utils.set_random_seed(0)
    reference = make_model(GLOBAL_BATCH)
    initial = [v.numpy() for v in state(reference)]

    single, losses_single = single_step(initial, batch, GLOBAL_BATCH)
    wrong, _ = single_step(initial, batch, GLOBAL_BATCH // 2)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make_model(GLOBAL_BATCH)
    mirrored_state = state(mirrored)
    # Same variables in the same order (optimizer names get a uniquifying suffix, model paths do not).
    assert [v.path for v in mirrored.variables] == [v.path for v in single.variables]
    assert [v.shape for v in mirrored_state] == [v.shape for v in state(single)]
    for variable, value in zip(mirrored_state, initial):
        variable.assign(value)

    per_replica = GLOBAL_BATCH // strategy.num_replicas_in_sync

    def shard(context):
        index = context.replica_id_in_sync_group
        return tf.nest.map_structure(lambda a: tf.constant(a[index * per_replica : (index + 1) * per_replica]), batch)

    distributed = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def distributed_step(replica_batch):  # as in mkd_tf.training.train
        logs = strategy.run(mirrored.train_step, args=(replica_batch,))
        return {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for name, value in logs.items()}

    losses_mirrored = {name: float(value) for name, value in distributed_step(distributed).items()}

    def difference(a_vars, b_vars):
        return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(a_vars, b_vars))

    after_single = [v.numpy() for v in state(single)]
    in_sync = 0.0
    for variable in mirrored_state:
        copies = [np.asarray(c) for c in getattr(variable, "values", [variable])]
        in_sync = max(in_sync, max(float(np.max(np.abs(c - copies[0]))) for c in copies))
    report = {
        "replicas": strategy.num_replicas_in_sync,
        "variables": len(mirrored_state),
        "max_diff_mirrored": difference([v.numpy() for v in mirrored_state], after_single),
        "max_diff_wrong": difference([v.numpy() for v in state(wrong)], [v.numpy() for v in mirrored_state]),
        # Over the model's trainable weights only (the optimizers' iteration counters move by exactly 1).
        "max_change": difference(
            [v.numpy() for v in state(single) if v.trainable],
            [value for v, value in zip(state(single), initial) if v.trainable],
        ),
        "replicas_in_sync": in_sync,
        "losses_single": losses_single,
        "losses_mirrored": losses_mirrored,
    }
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
