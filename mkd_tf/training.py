"""`mkd train`: strategy, data streams, the training loop, checkpoints, resume, TensorBoard.

The loop is a small custom one — `strategy.run(model.train_step, ...)` inside a `tf.function` —
rather than `Model.fit`: the methods use several optimizers, it works the same under the default,
Mirrored and MultiWorkerMirrored strategies (Keras `fit` is broken with the latter upstream,
keras-team/keras#20585), and every optimizer's state goes into the checkpoint.

A run folder holds::

    RUN/config.yaml          the resolved configuration (defaults <- --config <- flags)
    RUN/cache.json           classes, label values and preprocessing of the cache (for predict/export)
    RUN/checkpoints/         the last two epochs (model + optimizers + epoch), for resume
    RUN/best/                model weights with the best validation Dice on the target
    RUN/history.json         losses and validation Dice per epoch
    RUN/logs/                TensorBoard: every loss term, validation Dice per structure, image panels

Running the same command again after an interruption (even kill -9) resumes after the last
finished epoch; a finished run is left as it is.
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from mkd_tf.config import learning_settings, load_config, save_config
from mkd_tf.data import pipeline
from mkd_tf.data.cache import SliceCache
from mkd_tf.errors import MkdError, fail
from mkd_tf.files import read_json, write_text_atomic


def make_strategy(name):
    """`auto`: MirroredStrategy over all visible GPUs (default strategy without GPUs);
    `mirrored`: MirroredStrategy over all GPUs, or over all logical CPUs when there is no GPU;
    `default`: no distribution."""
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and not gpus):
        return tf.distribute.get_strategy()
    if name in ("auto", "mirrored"):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    fail("--strategy", f"unknown strategy '{name}' (auto, default, mirrored)")


def labelled_target_volumes(cache, count, seed):
    """Indices of the target training volumes whose labels training may use (`count=None`: all)."""
    volumes = [i for i, v in enumerate(cache.volumes("target")) if v["split"] == "train" and v["labelled"]]
    if count is None:
        return volumes
    if count > len(volumes):
        fail(cache.path, f"--target-labeled {count} but the cache has {len(volumes)} labelled target training volumes")
    order = sorted(volumes, key=lambda i: cache.volumes("target")[i]["case_id"])
    np.random.default_rng(seed).shuffle(order)
    return sorted(order[:count])


def usable_target_volumes(cache, config):
    """:func:`labelled_target_volumes` of the config; fails when the method needs them and there are none."""
    keep = labelled_target_volumes(cache, config["data"]["target_labeled"], config["seed"])
    from mkd_tf.models.baselines import NEEDS_LABELLED_TARGET

    if not keep and config["method"] in NEEDS_LABELLED_TARGET:
        fail(cache.path, f"method '{config['method']}' needs labelled target training volumes; "
                         "the cache (or --target-labeled) leaves none")
    return keep


def training_streams(cache, config, epoch):
    """The batch dict stream of one epoch (see :mod:`mkd_tf.models.cross_modality`)."""
    data = config["data"]
    seed = int(config["seed"]) * 1000 + epoch  # a fresh, reproducible order every epoch (and after resume)
    keep = usable_target_volumes(cache, config)
    return pipeline.training_dataset(cache, data["batch_size"], augment=data["augment"], seed=seed,
                                     labelled_target_volumes=keep)


def build_method(config, num_classes):
    """The model of ``config["method"]``, not yet built."""
    from mkd_tf.models import baselines
    from mkd_tf.models.mkd import MKDModel

    method, optimizer = config["method"], config["optimizer"]
    batch = config["data"]["batch_size"]
    steps = config["schedule"]["epochs"] * config["schedule"]["steps_per_epoch"]
    segmentor_optimizer = keras.optimizers.Adam(optimizer["segmentor_lr"], use_ema=bool(optimizer["ema"]),
                                                ema_momentum=float(optimizer["ema_momentum"]))
    if method == "mkd":
        gan = {"beta_1": optimizer["gan_beta_1"]}
        return MKDModel(
            num_classes, batch, segmentor=config["segmentor"], alignment=config["alignment"],
            weights={k: config["loss"][k] for k in ("temperature", "lambda_s2r", "lambda_r2s", "adversarial",
                                                     "cycle", "segmentation_to_generator")},
            use_iam=config["ablation"]["iam"], kd_s2r=config["ablation"]["kd_s2r"],
            kd_r2s=config["ablation"]["kd_r2s"],
            pretrain_steps=int(config["schedule"]["mkd_pretrain"] * steps),
            optimizers={"segmentors": segmentor_optimizer,
                        "generators": keras.optimizers.Adam(optimizer["generator_lr"], **gan),
                        "discriminators": keras.optimizers.Adam(optimizer["discriminator_lr"], **gan)})
    return baselines.build(method, num_classes, batch, config["segmentor"], segmentor_optimizer,
                           loss=config["loss"], switch_step=int(config["schedule"]["finetune_switch"] * steps))


def validation_dice(model, cache, batch_size=32, split="val"):
    """Dice per predictor and foreground class over all labelled target slices of ``split``.

    Intersections and sums are accumulated over the whole split (so it is the Dice of the split's
    volumes stacked together, not a mean over slices). Returns `{predictor: [dice per class]}`, or
    `None` when the cache has no labelled target slices in the split.
    """
    rows = cache.indices("target", split, labelled=True)
    if rows.size == 0:
        return None
    names = model.predictor_names()
    classes = cache.num_classes
    stats = {name: np.zeros((3, classes)) for name in names}
    images, labels = cache.images("target"), cache.labels("target")
    for start in range(0, rows.size, batch_size):
        chunk = rows[start:start + batch_size]
        batch = tf.constant(np.asarray(images[chunk])[..., None])
        truth = np.asarray(labels[chunk])
        for name in names:
            predicted = np.argmax(model.predict_probabilities(batch, name).numpy(), axis=-1)
            for c in range(classes):
                p, g = predicted == c, truth == c
                stats[name][:, c] += ((p & g).sum(), p.sum(), g.sum())
    result = {}
    for name, (both, pred, true) in stats.items():
        denominator = pred + true
        result[name] = [float(2 * b / d) if d > 0 else 1.0 for b, d in zip(both[1:], denominator[1:])]
    return result


def model_state(model):
    """Every variable of the model, keyed by its stable Keras path, for `tf.train.Checkpoint`.

    `tf.train.Checkpoint(model=keras3_model)` silently misses layers kept in Python lists (Keras 3
    tracks them itself, TF's object graph does not): a U-Net restored that way keeps its initial
    encoder weights. Naming each variable explicitly makes save and restore complete.
    """
    state = {"step_counter": model.step_counter}
    for variable in model.weights:
        state[f"model/{variable.path}"] = variable.value
    return state


def training_state(model, epoch_counter):
    """:func:`model_state` + every optimizer's variables (moments, iterations) + the epoch."""
    state = model_state(model)
    state["epoch"] = epoch_counter
    for group, (optimizer, _) in model.optimizers().items():
        for variable in optimizer.variables:
            # Drop the optimizer's own name ("adam_3/..."): it depends on how many were made before.
            state[f"optimizer/{group}/{variable.path.split('/', 1)[-1]}"] = variable.value
    return state


def _restore(checkpoint, path, run, partial=False, saved=False):
    """Restore every variable of ``checkpoint`` from ``path`` or fail with one line.

    ``saved``: ``path`` was written by `CheckpointManager.save` (which also stores the checkpoint's
    ``save_counter``: `restore` consumes it, `read` would leave it unmatched), not by `write`.
    """
    status = None
    try:
        status = checkpoint.restore(path) if saved else checkpoint.read(path)
        if partial:  # a training checkpoint also holds optimizer state, which inference does not need
            status.expect_partial().assert_existing_objects_matched()
        else:
            status.assert_consumed()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        if status is not None:
            status.expect_partial()  # else TF logs every unmatched value when the checkpoint is collected
        fail(run, f"checkpoint {path} does not match this model ({str(exc).splitlines()[0][:160]})")


def _write_json(path, value):
    write_text_atomic(path, json.dumps(value, indent=1))


def _clean_stale_staging(run):
    """Finish or remove what a killed run left half-done in its own folder.

    - a kill between the two renames of :func:`_save_best` leaves ``.best.old`` and no ``best/``:
      the old best comes back (history.json still names its epoch);
    - ``.best.tmp`` (a best checkpoint being written) and ``checkpoints/ckpt-N_temp`` (TF's staging of
      a checkpoint being saved) are incomplete and removed.
    """
    retired = run / ".best.old"
    if retired.is_dir() and not (run / "best").exists():
        os.replace(retired, run / "best")
    for stale in [run / ".best.tmp", retired, *(run / "checkpoints").glob("ckpt-*_temp")]:
        if stale.is_dir():
            shutil.rmtree(stale)


def _best_weights(run):
    """Prefix of the best checkpoint, also found when a kill left it at ``.best.old`` (see above)."""
    for folder in (run / "best", run / ".best.old"):
        if (folder / "weights.index").exists():
            return str(folder / "weights")
    fail(run, "has no best checkpoint yet (training has not finished an epoch)")


def _save_best(model, run):
    """Model-only checkpoint in RUN/best, replaced atomically (written aside, then renamed)."""
    staging = run / ".best.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    tf.train.Checkpoint(**model_state(model)).write(str(staging / "weights"))
    retired = run / ".best.old"
    shutil.rmtree(retired, ignore_errors=True)
    if (run / "best").exists():
        os.replace(run / "best", retired)
    os.replace(staging, run / "best")
    shutil.rmtree(retired, ignore_errors=True)


def _check_finite(logs, epoch, step):
    for name, value in logs.items():
        if not math.isfinite(value):
            raise MkdError(f"training diverged: loss '{name}' is {value} at epoch {epoch + 1}, step {step + 1}; "
                           "lower the learning rates or check the input data")


def cache_record(cache):
    """What predict/export need from the cache without reading its arrays."""
    return {
        "path": str(Path(cache.path).resolve()),
        "classes": cache.classes,
        "preprocess": cache.manifest["preprocess"],
        "target": {k: cache.modality("target")[k] for k in ("name", "label_values")},
        "assistant": {k: cache.modality("assistant")[k] for k in ("name", "label_values")},
        "target_intensity": cache.volumes("target")[0]["inverse"]["intensity"],
    }


def train(cache_path, run_dir, config_path=None, overrides=None, verbose=1):
    """Train one method on a slice cache into ``run_dir``; resumes an interrupted run.

    Args:
        cache_path: slice cache written by `mkd prepare`.
        run_dir: the run folder (created; an existing one is resumed if its config matches).
        config_path: optional YAML config.
        overrides: nested dict of settings from the command line.
        verbose: 1 shows a Keras progress bar, 0 is silent.

    Returns:
        dict with the final epoch, best validation Dice and paths.
    """
    # Everything is checked, and the model built, before the first write into RUN: a run that fails
    # on its inputs leaves nothing behind that would make the corrected command refuse the folder.
    cache = SliceCache(cache_path)
    run = Path(run_dir)
    existing = next(p for p in [run, *run.parents] if p.exists())
    if not existing.is_dir():
        fail(run, "exists and is not a folder" if existing == run else f"cannot be created: {existing} is a file")
    config = load_config(config_path, overrides)
    if (run / "config.yaml").exists():
        previous = learning_settings(load_config(run / "config.yaml"))
        if previous != learning_settings(config):
            changed = sorted(k for k in previous if learning_settings(config)[k] != previous.get(k))
            fail(run, f"holds a run with a different config (differs in: {', '.join(changed)}); use a new --out")
    usable_target_volumes(cache, config)
    keras.utils.set_random_seed(int(config["seed"]))
    strategy = make_strategy(config["strategy"])
    size = cache.size
    with strategy.scope():
        model = build_method(config, cache.num_classes)
        try:
            model.build_for((size, size, 1))
        except ValueError as exc:
            fail(config_path or "config", f"the networks do not fit {size}x{size} slices: {exc}")
        model.build_optimizers()
        epoch_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(**training_state(model, epoch_counter))

    run.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(run)
    save_config(config, run / "config.yaml")
    _write_json(run / "cache.json", cache_record(cache))
    manager = tf.train.CheckpointManager(checkpoint, str(run / "checkpoints"), max_to_keep=2)
    history_path = run / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {"epochs": [], "best": None}
    if manager.latest_checkpoint:
        _restore(checkpoint, manager.latest_checkpoint, run, saved=True)
        history["epochs"] = [e for e in history["epochs"] if e["epoch"] <= int(epoch_counter.numpy())]
        if verbose:
            print(f"resuming {run} after epoch {int(epoch_counter.numpy())}")

    def distributed(step_function):
        @tf.function
        def run_step(batch):
            per_replica = strategy.run(step_function, args=(batch,))
            return {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                    for name, value in per_replica.items()}
        return run_step

    train_step, pretrain_step = distributed(model.train_step), distributed(model.pretrain_step)

    schedule = config["schedule"]
    epochs, steps = int(schedule["epochs"]), int(schedule["steps_per_epoch"])
    writers = {name: tf.summary.create_file_writer(str(run / "logs" / name)) for name in ("train", "validation")}
    panel_batch = None

    for epoch in range(int(epoch_counter.numpy()), epochs):
        dataset = training_streams(cache, config, epoch)
        if panel_batch is None:
            panel_batch = next(iter(dataset))
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        progress = keras.utils.Progbar(steps, verbose=verbose, unit_name="step") if verbose else None
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}")
        totals, started = {}, time.perf_counter()
        for step in range(steps):
            step_function = pretrain_step if epoch * steps + step < model.pretrain_steps else train_step
            logs = {name: float(value) for name, value in step_function(next(iterator)).items()}
            _check_finite(logs, epoch, step)
            for name, value in logs.items():
                totals[name] = totals.get(name, 0.0) + value
            if progress:
                progress.update(step + 1, list(logs.items()))
        means = {name: value / steps for name, value in totals.items()}
        seconds = time.perf_counter() - started
        with model.averaged_weights():
            dice = validation_dice(model, cache, int(schedule["validation_batch"]))
            # For learning curves only (`mkd compare` plots them); never used to select a checkpoint.
            test_dice = validation_dice(model, cache, int(schedule["validation_batch"]), split="test")
        record = {"epoch": epoch + 1, "losses": means, "steps_per_second": steps / seconds, "val_dice": dice,
                  "test_dice": test_dice}
        global_step = (epoch + 1) * steps
        with writers["train"].as_default():
            for name, value in means.items():
                tf.summary.scalar(f"loss/{name}", value, step=global_step)
            tf.summary.scalar("steps_per_second", steps / seconds, step=global_step)
            for name, images in model.image_panels(panel_batch).items():
                tf.summary.image(f"panels/{name}", images, step=global_step, max_outputs=4)
        main = model.predictor_names()[-1]
        if dice is not None:
            record["val_dice_mean"] = float(np.mean(dice[main]))
            with writers["validation"].as_default():
                for name, values in dice.items():
                    for structure, value in zip(cache.classes[1:], values):
                        tf.summary.scalar(f"dice_{name}/{structure}", value, step=global_step)
                    tf.summary.scalar(f"dice_{name}/mean", float(np.mean(values)), step=global_step)
        for writer in writers.values():
            writer.flush()
        # Without validation data the last epoch is "best": a negative score (no Dice to show) that
        # grows with the epoch (-epoch would keep the first epoch and score it 0, i.e. a Dice).
        score = record.get("val_dice_mean", -1.0 / (epoch + 1))
        if history["best"] is None or score > history["best"]["score"]:
            with model.averaged_weights():
                _save_best(model, run)
            history["best"] = {"epoch": epoch + 1, "score": score, "predictor": main}
        # History first: a kill between the two leaves a record newer than the checkpoint, which
        # resume drops and trains again; the other order would lose the epoch's record for good.
        history["epochs"].append(record)
        _write_json(history_path, history)
        epoch_counter.assign(epoch + 1)
        manager.save(checkpoint_number=epoch + 1)
        if verbose:
            shown = f", val Dice ({main}) {record['val_dice_mean']:.3f}" if dice is not None else ""
            print(f"epoch {epoch + 1}: {steps / seconds:.2f} steps/s{shown}")
    return {"run": str(run), "epochs": epochs, "best": history["best"], "logs": str(run / "logs")}


def load_run(run_dir, which="best"):
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
    config = load_config(run / "config.yaml")
    record = read_json(run / "cache.json", "missing: the run folder is incomplete")
    model = build_method(config, len(record["classes"]))
    size = int(record["preprocess"]["size"])
    model.build_for((size, size, 1))
    if which == "best":
        _restore(tf.train.Checkpoint(**model_state(model)), _best_weights(run), run)
    else:
        latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
        if latest is None:
            fail(run, "has no checkpoint")
        # The raw weights and the optimizers' moving averages: evaluate the averages, as training did.
        model.build_optimizers()
        state = training_state(model, tf.Variable(0, dtype=tf.int64, trainable=False))
        _restore(tf.train.Checkpoint(**state), latest, run, partial=True)
        model.load_averaged_weights()
    return model, config, record
