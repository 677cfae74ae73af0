"""One MKD update on 2 workers (MultiWorkerMirroredStrategy, one CPU each) vs. the single-process update.

Run once per worker, each with its own `TF_CONFIG` (tests/test_multi_worker.py starts both):

    TF_CONFIG=... python tests/scripts/multi_worker_update.py OUT_DIR CACHE

Each worker writes ``OUT_DIR/worker<i>.npz``:

- ``after_<k>``: every model and optimizer variable after one distributed step of the real training
  code (:func:`mkd_tf.trainer.step_functions`) on a fixed global batch of 4 slices, 2 per worker;
- ``batch_<stream>``: this worker's first batch of :func:`mkd_tf.training.distributed_streams` on CACHE
  (the data path of `mkd train`), to check that the workers' shards make up the unsharded batch.

The chief also writes ``OUT_DIR/reference.npz`` (``single_<k>``: the same update in one process on all 4
slices; ``wrong_<k>``: with losses divided by the per-worker batch, what a wrong reduction would give;
``initial_<k>``) and ``OUT_DIR/report.json`` (losses of both updates, replica counts).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mkd_tf import cluster  # noqa: E402

TF_CONFIG = cluster.read_tf_config()
STRATEGY = cluster.make_multi_worker_strategy(120.0, TF_CONFIG)  # before anything else touches TF

import keras  # noqa: E402

from mkd_tf import trainer, training  # noqa: E402
from mkd_tf.config import load_config  # noqa: E402
from mkd_tf.data.cache import SliceCache  # noqa: E402
from mkd_tf.models.mkd import MKDModel  # noqa: E402

GLOBAL_BATCH, SIZE, CLASSES = 4, 32, 4
# Instance norm: per example, so the update does not depend on how the batch is split (batch norm's
# statistics are per replica).
SEGMENTOR = {"base_filters": 4, "depth": 2, "norm": "instance"}
ALIGNMENT = {"base_filters": 4, "num_blocks": 1, "disc_filters": 4, "disc_layers": 2, "norm": "instance"}


def make_model(global_batch_size):
    # Plain SGD: the update is lr * gradient, so any error in the loss scaling shows up 1:1.
    optimizers = {name: keras.optimizers.SGD(0.1) for name in ("segmentors", "generators", "discriminators")}
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
    variables = list(model.variables)
    for optimizer, _ in model.optimizers().values():
        variables += list(optimizer.variables)
    return variables


def fixed_batch():
    rng = np.random.default_rng(3)

    def stream():
        labels = rng.integers(0, CLASSES, (GLOBAL_BATCH, SIZE, SIZE)).astype(np.int32)
        images = (labels[..., None] * 0.5 + rng.normal(0, 0.3, (GLOBAL_BATCH, SIZE, SIZE, 1))).astype(np.float32)
        return {"image": images, "label": labels, "has_label": np.ones(GLOBAL_BATCH, np.float32)}

    return {"assistant": stream(), "target": stream(), "target_labelled": stream()}


def single_step(initial, batch, global_batch_size):
    model = make_model(global_batch_size)
    for variable, value in zip(state(model), initial):
        variable.assign(value)
    logs = model.train_step(tf.nest.map_structure(tf.constant, batch))
    return model, {name: float(value) for name, value in logs.items()}


def main(out, cache_path):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    strategy, chief = STRATEGY, cluster.is_chief_task(TF_CONFIG)
    index = TF_CONFIG["task"]["index"]
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = make_model(GLOBAL_BATCH)  # initial values: the chief's, broadcast by the strategy
    initial = [v.numpy() for v in state(model)]
    batch = fixed_batch()
    per_replica = GLOBAL_BATCH // strategy.num_replicas_in_sync

    def shard(context):
        i = context.replica_id_in_sync_group
        return tf.nest.map_structure(lambda a: tf.constant(a[i * per_replica : (i + 1) * per_replica]), batch)

    _, train_step = trainer.step_functions(strategy, model)
    logs, _ = train_step(
        strategy.experimental_distribute_values_from_function(shard), tf.constant(1.0 if chief else 0.0)
    )
    logs = {name: float(value) for name, value in logs.items()}
    arrays = {f"after_{k}": v.numpy() for k, v in enumerate(state(model))}

    # The data path of `mkd train`: this worker's first batch of epoch 0.
    cache = SliceCache(cache_path)
    config = load_config(overrides={"data": {"batch_size": GLOBAL_BATCH}})
    first = next(iter(training.distributed_streams(strategy, cache, config, epoch=0)))
    for stream, values in first.items():
        local = strategy.experimental_local_results(values["image"])
        arrays[f"batch_{stream}"] = np.concatenate([np.asarray(v) for v in local])
    np.savez(out / f"worker{index}.npz", **arrays)

    if chief:
        single, losses_single = single_step(initial, batch, GLOBAL_BATCH)
        wrong, _ = single_step(initial, batch, GLOBAL_BATCH // strategy.num_replicas_in_sync)
        reference = {f"single_{k}": v.numpy() for k, v in enumerate(state(single))}
        reference.update({f"wrong_{k}": v.numpy() for k, v in enumerate(state(wrong))})
        reference.update({f"initial_{k}": v for k, v in enumerate(initial)})
        reference.update({f"trainable_{k}": np.array(v.trainable) for k, v in enumerate(state(single))})
        np.savez(out / "reference.npz", **reference)
        report = {
            "replicas": strategy.num_replicas_in_sync,
            "variables": len(initial),
            "losses_single": losses_single,
            "losses_multi_worker": logs,
        }
        (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
