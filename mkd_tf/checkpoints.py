"""Checkpoints of a run: what a model's and a training's state are, and reading them back.

A run folder (:mod:`mkd_tf.run_folder`) writes them; training resumes from them and inference loads the
best one. Every variable is named explicitly (:func:`model_state`): ``tf.train.Checkpoint(model=...)``
misses Keras 3 layers kept in Python lists.
"""

import os
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from mkd_tf.errors import fail
from mkd_tf.models.cross_modality import CrossModalityModel


def model_state(model: keras.Model) -> dict[str, tf.Variable]:
    """Every variable of the model, keyed by its stable Keras path, for `tf.train.Checkpoint`.

    `tf.train.Checkpoint(model=keras3_model)` silently misses layers kept in Python lists (Keras 3
    tracks them itself, TF's object graph does not): a U-Net restored that way keeps its initial
    encoder weights. Naming each variable explicitly makes save and restore complete.
    """
    state = {"step_counter": model.step_counter}
    for variable in model.weights:
        state[f"model/{variable.path}"] = variable.value
    return state


def training_state(model: CrossModalityModel, epoch_counter: tf.Variable) -> dict[str, Any]:
    """:func:`model_state` + every optimizer's variables (moments, iterations) and moving averages + the epoch."""
    state = model_state(model)
    state["epoch"] = epoch_counter
    for group, (optimizer, _) in model.optimizers().items():
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer wraps the real one
        for variable in inner.variables:
            # Drop the optimizer's own name ("adam_3/..."): it depends on how many were made before.
            state[f"optimizer/{group}/{variable.path.split('/', 1)[-1]}"] = variable.value
        if inner is not optimizer:  # the loss scale and its counters (its iteration, lr mirror the inner's)
            own = {id(v) for v in inner.variables}
            for variable in optimizer.variables:
                if id(variable) not in own:
                    state[f"optimizer/{group}/loss_scale/{variable.path.split('/', 1)[-1]}"] = variable.value
        if group in model.weight_averages:  # the model keeps the moving averages (`use_ema`): saved under
            # the keys they had when the optimizer kept them, so older run folders resume
            for name, average in model.weight_averages[group].named().items():
                state[f"optimizer/{group}/{name}"] = average.value
    return state


def restore_checkpoint(checkpoint, path, run, partial=False, saved=False):
    """Restore every variable of ``checkpoint`` from ``path`` or fail with one line.

    ``saved``: ``path`` was written by `CheckpointManager.save` (which also stores the checkpoint's
    ``save_counter``: `restore` consumes it, `read` would leave it unmatched), not by `write`.
    """
    check_checkpoint_files(path)
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
    except IndexError as exc:  # TF's reader: "Read less bytes than requested" for a truncated data file
        if not saved:
            raise  # load_run's callers name the best/last checkpoint themselves (mkd_tf.inference.load_trained)
        data = sorted(Path(path).parent.glob(f"{Path(path).name}.data-*"))
        fail(
            data[0] if data else path,
            f"cannot read the checkpoint to resume from: truncated or corrupt weights file ({exc})",
        )


def check_checkpoint_files(prefix: str | os.PathLike) -> None:
    """Fail with one line naming the file when a checkpoint's ``.index`` or one of its ``.data-*`` shards is
    missing or empty (what a killed copy or a full disk leaves), before TensorFlow reads it."""
    prefix = Path(prefix)
    index = prefix.with_name(prefix.name + ".index")
    if not index.is_file() or index.stat().st_size == 0:
        fail(index, "missing or empty: the checkpoint is incomplete")
    shards = sorted(prefix.parent.glob(prefix.name + ".data-*-of-*"))
    if not shards:
        fail(prefix, "the checkpoint has no .data-* file: it is incomplete")
    expected = int(shards[0].name.rsplit("-of-", 1)[1])
    for number in range(expected):
        shard = prefix.with_name(f"{prefix.name}.data-{number:05d}-of-{expected:05d}")
        if not shard.is_file():
            fail(shard, "missing: the checkpoint is incomplete")


def best_weights_prefix(run):
    """Prefix of the best checkpoint, also found when a kill left it at ``.best.old``
    (:meth:`mkd_tf.run_folder.RunFolder.save_best`)."""
    for folder in (run / "best", run / ".best.old"):
        if (folder / "weights.index").exists():
            return str(folder / "weights")
    fail(run, "has no best checkpoint yet (training has not finished an epoch)")
