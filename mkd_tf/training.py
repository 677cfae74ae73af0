"""`mkd train`: strategy, data streams, the training loop, checkpoints, resume, TensorBoard.

The loop is a small custom one — `strategy.run(model.train_step, ...)` inside a `tf.function` —
rather than `Model.fit`: the methods use several optimizers, it works the same under the default,
Mirrored and MultiWorkerMirrored strategies (Keras `fit` is broken with the latter upstream,
keras-team/keras#20585), and every optimizer's state goes into the checkpoint.

The run folder and who writes it (the chief alone, in a multi-worker job) is
:class:`mkd_tf.run_folder.RunFolder`; `TF_CONFIG` and the cluster are :mod:`mkd_tf.cluster`.

Running the same command again after an interruption (even kill -9) resumes from the furthest
checkpoint: the last finished epoch, or the step checkpoint written every ``checkpoint_every``
minutes inside an epoch; the batches after resume are the ones the uninterrupted run would have seen
(:func:`mkd_tf.data.pipeline.slice_dataset`'s ``start``). A finished run is left as it is.
"""

from __future__ import annotations

import contextlib
import os  # noqa: F401  (tests replace os.replace through this module to simulate a kill)
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mkd_tf import cluster, registry
from mkd_tf.checkpoints import best_weights_prefix, model_state, restore_checkpoint, training_state
from mkd_tf.config import STRATEGIES, learning_settings, load_config, read_yaml_mapping
from mkd_tf.config_migrations import switched_on
from mkd_tf.data import pipeline
from mkd_tf.data.cache import SliceCache
from mkd_tf.errors import MkdError, fail
from mkd_tf.files import check_parent_is_folder
from mkd_tf.models.cross_modality import METHOD_SCHEDULE_SETTINGS, CrossModalityModel, phase_start_step
from mkd_tf.models.optimizers import make_optimizer
from mkd_tf.phased_cosine_decay import PhasedCosineDecay
from mkd_tf.run_files import read_cache_record, read_history
from mkd_tf.run_folder import RunFolder, not_a_run_folder
from mkd_tf.trainer import Trainer


def make_strategy(
    name: str, worker_timeout: float = 600.0, tf_config: dict | None = None
) -> tuple[tf.distribute.Strategy, dict | None]:
    """`auto`: MultiWorkerMirroredStrategy when `TF_CONFIG` names more than one worker, else
    MirroredStrategy over all visible GPUs (default strategy without GPUs);
    `mirrored`: MirroredStrategy over all GPUs, or over all logical CPUs when there is no GPU;
    `multi-worker`: MultiWorkerMirroredStrategy on the cluster of `TF_CONFIG` (see :mod:`mkd_tf.cluster`);
    `default`: no distribution.

    Args:
        tf_config: the parsed `TF_CONFIG` when the caller has read it (``None``: read it here).

    Returns:
        `(strategy, tf_config)`: ``tf_config`` is the parsed `TF_CONFIG` under multi-worker, else None.
    """
    if name not in STRATEGIES:
        fail("--strategy", f"unknown strategy '{name}' ({', '.join(STRATEGIES)})")
    if tf_config is None and name in ("auto", "multi-worker"):
        tf_config = cluster.read_tf_config()
    if name == "multi-worker" or (name == "auto" and cluster.worker_count(tf_config) > 1):
        if tf_config is None:
            fail(
                "--strategy",
                "multi-worker needs TF_CONFIG (the cluster and this task; see docs/multi-worker.md)",
            )
        return cluster.make_multi_worker_strategy(worker_timeout, tf_config), tf_config
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and not gpus):
        return tf.distribute.get_strategy(), None
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices), None


def resume_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a run folder's training must share with a command that resumes it, flattened to
    ``section.key``: :func:`~mkd_tf.config.learning_settings` without the ``loss`` settings the method
    does not read, nor another method's ``schedule`` settings, nor the ``alignment`` settings of a method
    without an IAM (a default changed for MKD does not make a finished baseline run "different")."""
    model = registry.load(registry.METHODS[config["method"]].model)

    def read(section, name):
        if section == "loss":
            return name in model.loss_settings
        if section == "schedule" and name in METHOD_SCHEDULE_SETTINGS:
            return name in model.schedule_settings
        if section == "alignment":
            return model.reads_alignment
        return True

    flat = {}
    for key, value in learning_settings(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in value.items() if read(key, name)})
        else:
            flat[key] = value
    return flat


def labelled_target_volumes(cache: SliceCache, count: int | None, seed: int) -> list[int]:
    """Indices of the target training volumes whose labels training may use (`count=None`: all)."""
    volumes = [i for i, v in enumerate(cache.volumes("target")) if v["split"] == "train" and v["labelled"]]
    if count is None:
        return volumes
    if count > len(volumes):
        fail(cache.path, f"--target-labelled {count} but the cache has {len(volumes)} labelled target training volumes")
    order = sorted(volumes, key=lambda i: cache.volumes("target")[i]["case_id"])
    np.random.default_rng(seed).shuffle(order)
    return sorted(order[:count])


def usable_target_volumes(cache: SliceCache, config: dict[str, Any]) -> list[int]:
    """:func:`labelled_target_volumes` of the config; fails when the method needs them and there are none."""
    keep = labelled_target_volumes(cache, config["data"]["target_labelled"], config["seed"])
    if not keep and registry.METHODS[config["method"]].needs_labelled_target:
        fail(
            cache.path,
            f"method '{config['method']}' needs labelled target training volumes; "
            "the cache (or --target-labelled) leaves none",
        )
    return keep


def training_streams(
    cache: SliceCache, config: dict[str, Any], epoch: int, shard: tuple[int, int] = (0, 1), start: int = 0
) -> tf.data.Dataset:
    """The batch dict stream of one epoch (see :mod:`mkd_tf.models.cross_modality`).

    ``shard=(index, count)``: this input pipeline's block of every global batch; ``start``: the first
    step to yield (the earlier ones of the epoch are skipped unloaded, the later ones are unchanged).
    """
    data = config["data"]
    seed = int(config["seed"]) * 1000 + epoch  # a fresh, reproducible order every epoch (and after resume)
    keep = usable_target_volumes(cache, config)
    return pipeline.training_dataset(
        cache,
        data["batch_size"],
        augment=data["augment"],
        seed=seed,
        labelled_target_volumes=keep,
        shard=shard,
        start=start,
    )


def distributed_streams(
    strategy: tf.distribute.Strategy, cache: SliceCache, config: dict[str, Any], epoch: int, start: int = 0
) -> tf.distribute.DistributedDataset:
    """The epoch's stream for a strategy with several replicas: each input pipeline (one per worker)
    reads its own block of every global batch and splits it into its replicas' batches; all replicas of
    a step together see exactly the single-process batch of that step."""
    global_batch = int(config["data"]["batch_size"])
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        fail("--batch-size", f"{global_batch} slices per stream cannot be split evenly over {replicas} replicas")

    def dataset_fn(context):
        dataset = training_streams(
            cache, config, epoch, shard=(context.input_pipeline_id, context.num_input_pipelines), start=start
        )
        per_pipeline = global_batch // context.num_input_pipelines
        per_replica = context.get_per_replica_batch_size(global_batch)
        return dataset if per_replica == per_pipeline else dataset.rebatch(per_replica)

    return strategy.distribute_datasets_from_function(dataset_fn)


def build_method(config: dict[str, Any], num_classes: int) -> CrossModalityModel:
    """The model of ``config["method"]`` (a registered method, :mod:`mkd_tf.registry`), not yet built.

    Every optimizer is Adam; the segmentors' keeps an exponential moving average of the weights when
    ``optimizer.ema`` is on, the GAN's use ``gan_beta_1``. Under ``mixed_float16`` each is wrapped in a
    ``LossScaleOptimizer`` (float16 gradients would underflow; bfloat16 and float32 need no scaling).
    """
    scaled = config.get("precision") == "mixed_float16"
    model_class = registry.load(registry.METHODS[config["method"]].model)

    def optimizer(role):
        rate = segmentor_learning_rate(config, model_class) if role == "segmentors" else None
        return make_optimizer(config["optimizer"], role, learning_rate=rate, loss_scale=scaled)

    return model_class.from_settings(config, num_classes, optimizer)


def segmentor_learning_rate(config: dict[str, Any], model_class: type) -> float | PhasedCosineDecay:
    """The segmentors' learning rate: ``optimizer.segmentor_lr``, or with ``optimizer.lr_schedule: cosine``
    a :class:`~mkd_tf.phased_cosine_decay.PhasedCosineDecay` from it whose phases are the method's own
    (each of its ``schedule_settings`` is the fraction of the steps at which a phase starts: MKD's
    ``mkd_pretrain``, finetune's ``finetune_switch``)."""
    settings, schedule = config["optimizer"], config["schedule"]
    if settings["lr_schedule"] == "constant":
        return settings["segmentor_lr"]
    total = schedule["epochs"] * schedule["steps_per_epoch"]
    # the steps at which the method's own phases start; 0 or a repeat adds no phase
    starts = sorted({0} | {phase_start_step(schedule, name) for name in model_class.schedule_settings})
    return PhasedCosineDecay(settings["segmentor_lr"], starts, total)


def cache_record(cache: SliceCache) -> dict[str, Any]:
    """What predict/export need from the cache without reading its arrays."""
    return {
        "path": str(Path(cache.path).resolve()),
        "classes": cache.classes,
        "preprocess": cache.manifest["preprocess"],
        "target": {k: cache.modality("target")[k] for k in ("name", "label_values")},
        "assistant": {k: cache.modality("assistant")[k] for k in ("name", "label_values")},
        "target_intensity": cache.volumes("target")[0]["inverse"]["intensity"],
    }


def float32_outputs(model: keras.Model) -> None:
    """Under a mixed-precision policy keep what the losses see in float32: every segmentor's logits,
    every generator's output (its residual ``x + r(x)`` too) and every discriminator's scores. The
    networks' containers run in float32 (their inputs are not rounded to 16 bits); the layers inside
    compute in the policy's 16-bit type."""
    for network in nested_models(model):  # every network and container: float32 in and out
        network.dtype_policy = "float32"
        head = getattr(network, "output_layer_name", None)  # a network's last layer (its output)
        if head:
            getattr(network, head).dtype_policy = "float32"


def nested_models(model: keras.Model) -> Iterator[keras.Model]:
    """``model`` and every `keras.Model` inside it, depth first, through the public ``Model.layers``.

    Args:
        model: a network or a method's model.

    Returns:
        An iterator over the models, ``model`` first.
    """
    yield model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from nested_models(layer)


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy ``name`` inside the block (the previous one is restored after)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def train(
    cache_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    verbose: int = 1,
) -> dict[str, Any]:
    """Train one method on a slice cache into ``run_dir``; resumes an interrupted run.

    Args:
        cache_path: slice cache written by `mkd prepare`.
        run_dir: the run folder (created; an existing one is resumed if its config matches). Under
            multi-worker training every worker passes the same one; only the chief writes it.
        config_path: optional YAML config.
        overrides: nested dict of settings, the YAML's shape (docs/configuration.md); they win over the
            YAML, which wins over the defaults. `None` values are skipped (the command line's unset flags).
        verbose: 1 shows a Keras progress bar, 0 is silent.

    Returns:
        dict with ``run``, ``epochs``, ``best`` (epoch, predictor, val Dice), ``logs`` and ``chief``.

    Example:
        >>> result = train("cache", "runs/mkd", overrides={"method": "mkd", "schedule": {"epochs": 2}})  # doctest: +SKIP
        >>> result["best"]  # doctest: +SKIP
        {'epoch': 2, 'predictor': 'ensemble', 'score': 0.71}
    """
    # Everything is checked, and the model built, before the first write into RUN: a run that fails
    # on its inputs leaves nothing behind that would make the corrected command refuse the folder.
    cache = SliceCache(cache_path)
    run = Path(run_dir)
    config = load_config(config_path, overrides)
    tf_config = cluster.read_tf_config() if config["strategy"] in ("auto", "multi-worker") else None
    multi_worker = config["strategy"] == "multi-worker" or cluster.worker_count(tf_config) > 1
    chief = not multi_worker or tf_config is None or cluster.is_chief_task(tf_config)
    if chief:
        if run.exists() and not run.is_dir():
            fail(run, "exists and is not a folder")
        check_parent_is_folder(run, "create the run folder")
        check_run_folder(run, config)
        if (run / "history.json").exists():  # resumed: a damaged history is refused before any write
            read_history(run / "history.json")
    check_training_slices(cache)
    usable_target_volumes(cache, config)
    strategy, tf_config = make_strategy(config["strategy"], float(config["worker_timeout"]), tf_config)
    keras.utils.set_random_seed(int(config["seed"]))  # after the strategy, which configures TF's context
    folder = RunFolder(run, chief)  # locked (chief) from its first write to the end of training
    with (
        precision_policy(config["precision"]),
        _xla_errors(config["jit_compile"]),
        deterministic_training(config["deterministic"]),
        folder,  # releases the lock on leaving
    ):
        if tf_config is None:
            return _train(cache, run, config, config_path, strategy, folder, None, verbose)
        try:
            result = _train(cache, run, config, config_path, strategy, folder, tf_config, verbose if chief else 0)
            cluster.discard_native_log()
            return result
        except (
            tf.errors.UnavailableError,
            tf.errors.DeadlineExceededError,
            tf.errors.AbortedError,
            tf.errors.CancelledError,
            tf.errors.FailedPreconditionError,
            tf.errors.InternalError,
        ) as exc:
            raise MkdError(cluster.describe_failure(exc, tf_config, float(config["worker_timeout"]))) from None


def check_run_folder(run: Path, config: dict[str, Any], locked: bool = False) -> None:
    """Refuse, before anything is written, a ``run`` folder `mkd train` must not write into: one that is not
    a run folder (:func:`~mkd_tf.run_folder.not_a_run_folder`: a user's files would be overwritten or
    deleted), or a started run (:meth:`~mkd_tf.run_folder.RunFolder.started`) whose learning settings differ
    from ``config``'s, or a run folder another `mkd train` is using (unless ``locked``: this process holds
    the lock). A run that never reached its first checkpoint (e.g. diverged in epoch 1) holds no training
    to resume: it may be started again with another config."""
    problem = not_a_run_folder(run)
    if problem is not None:
        fail(run, f"not a run folder of mkd train ({problem}); choose another --out")
    if not locked:
        RunFolder(run).check_not_in_use()
    if (run / "config.yaml").exists() and RunFolder(run).started():
        removed = switched_on(read_yaml_mapping(run / "config.yaml"))
        if removed:
            fail(
                run,
                f"was trained with '{removed[0]}', which mkd-tf no longer has: it cannot be resumed; use a new --out",
            )
        previous, requested = (
            resume_settings(load_config(run / "config.yaml", recorded=True)),
            resume_settings(config),
        )
        if previous != requested:
            changed = sorted(k for k in requested if requested[k] != previous.get(k))
            fail(run, f"holds a run with a different config (differs in: {', '.join(changed)}); use a new --out")


def check_training_slices(cache: SliceCache) -> None:
    """Every method trains on labelled assistant slices and target slices of the train split: refuse a cache
    without them before anything is written (the data streams would refuse it only after the run folder)."""
    for role, labelled, what in (("assistant", True, "labelled assistant"), ("target", None, "target")):
        if pipeline.selected_rows(cache, role, "train", labelled).size == 0:
            fail(cache.path, f"has no {what} slices in the train split; training needs them (prepare another split)")


@contextlib.contextmanager
def deterministic_training(enabled: bool) -> Iterator[None]:
    """With ``enabled``, training inside the block is bit-reproducible: the same command gives the same losses
    and weights. Deterministic kernels (``tf.config.experimental.enable_op_determinism``, process-wide and
    irreversible: TensorFlow has no way back) are not enough for a compiled MKD step, whose results then still
    vary from one build of the graph to the next in the seventh digit; with Grappler's graph rewrites off
    (``disable_meta_optimizer``, restored on leaving) they do not (``benchmarks/determinism.py``; README).
    """
    if not enabled:
        yield
        return
    tf.config.experimental.enable_op_determinism()
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


@contextlib.contextmanager
def _xla_errors(jit_compile):
    """With --jit-compile, an op XLA cannot compile (e.g. under `enable_op_determinism`, MaxPool's
    gradient has no deterministic XLA kernel) is one line, not a traceback."""
    try:
        yield
    except tf.errors.UnimplementedError as exc:
        if not jit_compile:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        fail("--jit-compile", f"XLA cannot compile the training step here ({first}); train without it")


def _train(cache, run, config, config_path, strategy, folder, tf_config, verbose):
    """The model and data streams of :func:`train`, run by a :class:`~mkd_tf.trainer.Trainer` (``folder``
    knows whether this process writes the run folder)."""
    with strategy.scope():
        model = build_method(config, cache.num_classes)
        if config["precision"] != "float32":
            float32_outputs(model)
        try:
            model.build_for((cache.size, cache.size, 1))
        except ValueError as exc:
            fail(config_path or "config", f"the networks do not fit {cache.size}x{cache.size} slices: {exc}")
        model.build_optimizers()
    distributed = strategy.num_replicas_in_sync > 1 or tf_config is not None

    def streams(epoch, start):
        if distributed:
            return iter(distributed_streams(strategy, cache, config, epoch, start)), None
        dataset = training_streams(cache, config, epoch, start=start)
        return iter(dataset), dataset

    trainer = Trainer(
        model,
        strategy,
        folder,
        cache,
        config["schedule"],
        streams,
        panel_streams=lambda epoch: training_streams(cache, config, epoch),
        checkpoint_every=float(config["checkpoint_every"]) * 60.0,
        jit_compile=config["jit_compile"],
        shared=tf_config is not None,
        verbose=verbose,
    )
    progress = trainer.resume()
    # after the checkpoint is read (an unreadable one changes nothing); the lock is held from here to the end
    folder.prepare(config, cache_record(cache), check=lambda: check_run_folder(run, config, locked=True))
    best = trainer.fit(trainer.share(progress))
    return {"run": str(run), "epochs": trainer.epochs, "best": best, "logs": str(run / "logs"), "chief": folder.chief}


def load_run(
    run_dir: str | os.PathLike, which: str = "best"
) -> tuple[CrossModalityModel, dict[str, Any], dict[str, Any]]:
    """Rebuild a trained model from its run folder.

    Args:
        run_dir: a folder written by :func:`train`.
        which: `"best"` (best validation Dice) or `"last"` (latest epoch checkpoint).

    Returns:
        `(model, config, cache_record)`.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        fail(run, "not a training run (no config.yaml)")
    config = load_config(run / "config.yaml", recorded=True)
    record = read_cache_record(run)
    model = build_method(config, len(record["classes"]))
    size = int(record["preprocess"]["size"])
    model.build_for((size, size, 1))
    if which == "best":
        restore_checkpoint(tf.train.Checkpoint(**model_state(model)), best_weights_prefix(run), run)
    else:
        latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
        if latest is None:
            fail(run, "has no checkpoint")
        # The raw weights and the optimizers' moving averages: evaluate the averages, as training did.
        model.build_optimizers()
        state = training_state(model, tf.Variable(0, dtype=tf.int64, trainable=False))
        restore_checkpoint(tf.train.Checkpoint(**state), latest, run, partial=True)
        model.load_averaged_weights()
    return model, config, record
