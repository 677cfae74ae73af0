"""The training loop: a generic :class:`Trainer` that runs a method's steps (the task, :mod:`mkd_tf.models`).

:func:`mkd_tf.training.train` checks the inputs, builds the model and the data streams and hands them to a
:class:`Trainer`, which resumes from the furthest checkpoint, runs the epochs, ends each one (validation,
TensorBoard, best weights, history) and checkpoints on time and at every epoch's end. Only the chief
writes (:class:`~mkd_tf.run_folder.RunFolder`); every worker runs the same steps.
"""

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mkd_tf import cluster, metrics
from mkd_tf.checkpoints import model_state, restore_checkpoint, training_state
from mkd_tf.data.cache import SliceCache
from mkd_tf.errors import MkdError
from mkd_tf.models.cross_modality import CrossModalityModel
from mkd_tf.run_folder import RunFolder


def step_functions(
    strategy: tf.distribute.Strategy, model: CrossModalityModel, jit_compile: bool = False
) -> tuple[Callable, Callable]:
    """`(pretrain_step, train_step)`, each ``(batch, save_flag) -> (losses, save_votes)``: one distributed
    step of the model; ``losses`` summed over replicas (each replica divides by the global batch), and
    ``save_votes`` the sum over replicas of the ``save_flag`` each passed, so that every worker learns in
    the same step that the chief asked for a checkpoint (a collective, not a message)."""

    def distributed(step_function):
        def replica_step(batch, save_flag):
            return dict(step_function(batch)), tf.identity(save_flag)

        def run_step(batch, save_flag):
            losses, votes = strategy.run(replica_step, args=(batch, save_flag))
            reduce = lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)  # noqa: E731
            return {name: reduce(value) for name, value in losses.items()}, reduce(votes)

        return tf.function(run_step, jit_compile=bool(jit_compile))

    return distributed(model.pretrain_step), distributed(model.train_step)


def validation_dice(
    model: CrossModalityModel, cache: SliceCache, batch_size: int = 32, split: str = "val"
) -> dict[str, list[float]] | None:
    """Dice per predictor and foreground class over all labelled target slices of ``split``.

    The overlaps are accumulated over the whole split (so it is the Dice of the split's volumes stacked
    together, not a mean over slices; a class absent from both scores 1.0, :mod:`mkd_tf.metrics`).
    Returns `{predictor: [dice per class]}`, or `None` when the cache has no labelled target slices in
    the split.
    """
    rows = cache.indices("target", split, labelled=True)
    if rows.size == 0:
        return None
    names = model.predictor_names()
    overlaps = {name: 0.0 for name in names}
    images, labels = cache.images("target"), cache.labels("target")
    for start in range(0, rows.size, batch_size):
        chunk = rows[start : start + batch_size]
        batch = tf.constant(np.asarray(images[chunk])[..., None])
        truth = np.asarray(labels[chunk])
        for name in names:
            predicted = np.argmax(model.predict_probabilities(batch, name).numpy(), axis=-1)
            overlaps[name] = overlaps[name] + metrics.class_overlaps(predicted, truth, cache.num_classes)
    return {name: metrics.dice_of_overlaps(counts)[1:].tolist() for name, counts in overlaps.items()}


def check_finite(logs: dict[str, float], epoch: int, step: int) -> None:
    """Stop with one line when a loss is NaN or infinite."""
    for name, value in logs.items():
        if not math.isfinite(value):
            raise MkdError(
                f"training diverged: loss '{name}' is {value} at epoch {epoch + 1}, step {step + 1}; "
                "lower the learning rates or check the input data"
            )


@dataclass
class Progress:
    """Where training stands: ``done`` steps over the run; inside an unfinished epoch, the loss sums and
    seconds of its steps so far (from a step checkpoint)."""

    done: int = 0
    totals: dict | None = None
    seconds: float = 0.0


class Trainer:
    """Runs a built model's steps over the epochs of its schedule, checkpointing into a run folder.

    Args:
        model: the method's model, built with its optimizers inside ``strategy.scope()``.
        strategy: the distribution strategy.
        folder: the run folder (``folder.chief``: this process writes it).
        cache: the slice cache (validation Dice, the class names).
        schedule: the ``schedule`` settings (epochs, steps_per_epoch, validation_batch, select_by).
        streams: ``(epoch, start) -> (iterator, dataset or None)``: the epoch's batches from step ``start``
            on, and the undistributed dataset behind them when there is one (its first batch is the
            TensorBoard panels' batch).
        panel_streams: ``epoch -> dataset`` of the epoch's undistributed batches (the panels' batch otherwise).
        checkpoint_every: seconds between step checkpoints inside an epoch (0: epoch ends only).
        jit_compile: XLA-compile the steps.
        shared: several workers: the chief's restored state is broadcast to all.
        verbose: 1 prints progress, 0 nothing.

    Example (what :func:`mkd_tf.training.train` does, after building the model in the strategy's scope):
        >>> trainer = Trainer(model, strategy, folder, cache, config["schedule"], streams, panel_streams)  # doctest: +SKIP
        >>> best = trainer.fit(trainer.share(trainer.resume()))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: CrossModalityModel,
        strategy: tf.distribute.Strategy,
        folder: RunFolder,
        cache: SliceCache,
        schedule: dict[str, Any],
        streams: Callable[[int, int], tuple[Iterator, tf.data.Dataset | None]],
        panel_streams: Callable[[int], tf.data.Dataset],
        checkpoint_every: float = 0.0,
        jit_compile: bool = False,
        shared: bool = False,
        verbose: int = 0,
    ):
        self.model, self.strategy, self.folder, self.cache = model, strategy, folder, cache
        self.streams, self.panel_streams, self.shared, self.verbose = streams, panel_streams, shared, verbose
        self.epochs, self.steps = int(schedule["epochs"]), int(schedule["steps_per_epoch"])
        self.validation_batch, self.select_by = int(schedule["validation_batch"]), schedule.get("select_by")
        self.checkpoint_every = float(checkpoint_every)
        with strategy.scope():
            self.epoch_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.state = training_state(model, self.epoch_counter)
            self.checkpoint = tf.train.Checkpoint(**self.state)
        self.checkpoint.save_counter  # noqa: B018  created now, the same way on every worker
        self.pretrain_step, self.train_step = step_functions(strategy, model, jit_compile)
        self.history = folder.load_history()
        self.last_save = time.monotonic()
        self.panel_batch = None

    # --- resume -----------------------------------------------------------------------------------
    def resume(self) -> Progress:
        """Restore the furthest checkpoint: the last epoch's, or a step checkpoint inside the next epoch."""
        candidates = []
        latest = self.folder.latest_epoch_checkpoint()
        if latest:
            candidates.append((int(latest.rsplit("-", 1)[1]) * self.steps, latest, None))
        latest_step = self.folder.latest_step_checkpoint()  # (path, steps done, the epoch's progress)
        if latest_step:
            path, done, partial_epoch = latest_step
            candidates.append((done, path, partial_epoch))
        if not candidates:
            return Progress()
        done, path, partial_epoch = max(candidates, key=lambda candidate: candidate[0])
        restore_checkpoint(self.checkpoint, path, self.folder.path, saved=True)
        if partial_epoch is None or partial_epoch.get("epoch") != done // self.steps:
            return Progress(done)
        return Progress(done, dict(partial_epoch["totals"]), float(partial_epoch["seconds"]))

    def share(self, progress: Progress) -> Progress:
        """Several workers: the chief alone read the checkpoint, every worker takes its state and step."""
        if not self.shared:
            return progress
        with self.strategy.scope():
            done = tf.Variable(progress.done, dtype=tf.int64, trainable=False, name="global_step")
        cluster.broadcast_from_chief(self.strategy, [*self.state.values(), done])
        return Progress(int(done.numpy()), progress.totals, progress.seconds)

    # --- the loop ---------------------------------------------------------------------------------
    def fit(self, progress: Progress) -> dict[str, Any]:
        """Train from ``progress`` to the end of the schedule; returns the history's ``best``."""
        first_epoch, skip = divmod(progress.done, self.steps)
        self.history["epochs"] = [e for e in self.history["epochs"] if e["epoch"] <= first_epoch]
        if self.verbose and progress.done:
            where = f"at epoch {first_epoch + 1}, step {skip + 1} (from a step checkpoint)" if skip else ""
            print(f"resuming {self.folder.path} {where or f'after epoch {first_epoch}'}")
        for epoch in range(first_epoch, self.epochs):
            start = skip if epoch == first_epoch else 0
            earlier = progress if start and progress.totals is not None else Progress()
            means, seconds = self.run_epoch(epoch, start, dict(earlier.totals or {}), earlier.seconds)
            if self.folder.chief:
                self.end_epoch(epoch, means, seconds)
            self.epoch_counter.assign(epoch + 1)
            self.folder.save_epoch(self.checkpoint, epoch + 1)
            self.last_save = time.monotonic()
        self.folder.flush()
        return self.history["best"]

    def run_epoch(self, epoch: int, start: int, totals: dict, earlier_seconds: float) -> tuple[dict, float]:
        """Steps ``start`` to the end of ``epoch``, adding each step's losses to ``totals``; returns the mean
        losses of the epoch and its seconds (``earlier_seconds``: before an interruption)."""
        iterator, dataset = self.streams(epoch, start)
        if self.folder.chief and self.panel_batch is None:  # TensorBoard panels: the first batch of the epoch
            self.panel_batch = next(iter(dataset if dataset is not None and not start else self.panel_streams(epoch)))
        progress_bar = keras.utils.Progbar(self.steps, verbose=self.verbose, unit_name="step") if self.verbose else None
        if self.verbose:
            print(f"epoch {epoch + 1}/{self.epochs}")
        started = time.perf_counter()
        for step in range(start, self.steps):
            global_step = epoch * self.steps + step
            if global_step == self.model.pretrain_steps > 0:
                self.model.end_pretraining()
            step_function = self.pretrain_step if global_step < self.model.pretrain_steps else self.train_step
            result, votes = step_function(next(iterator), tf.constant(1.0 if self.checkpoint_due(step) else 0.0))
            logs = {name: float(value) for name, value in result.items()}
            check_finite(logs, epoch, step)
            for name, value in logs.items():
                totals[name] = totals.get(name, 0.0) + value
            if progress_bar:
                progress_bar.update(step + 1, list(logs.items()))
            if float(votes) > 0:  # every worker, in the same step
                seconds = earlier_seconds + time.perf_counter() - started
                self.folder.save_step(
                    self.checkpoint, global_step + 1, {"epoch": epoch, "totals": totals, "seconds": seconds}
                )
                self.last_save = time.monotonic()
        seconds = earlier_seconds + time.perf_counter() - started
        return {name: value / self.steps for name, value in totals.items()}, seconds

    def checkpoint_due(self, step: int) -> bool:
        """The chief asks for a step checkpoint when ``checkpoint_every`` has passed since the last one (not
        on an epoch's last step: the epoch's end saves anyway)."""
        elapsed = time.monotonic() - self.last_save
        return self.folder.chief and 0 < self.checkpoint_every <= elapsed and step < self.steps - 1

    # --- the end of an epoch (chief only) ---------------------------------------------------------
    def end_epoch(self, epoch: int, means: dict[str, float], seconds: float) -> None:
        """Validation, TensorBoard, the best weights and the history record of a finished epoch."""
        with self.model.averaged_weights():
            dice = validation_dice(self.model, self.cache, self.validation_batch)
            # For learning curves only (`mkd compare` plots them); never used to select a checkpoint.
            test_dice = validation_dice(self.model, self.cache, self.validation_batch, split="test")
        steps_per_second = self.steps / seconds
        record = {"epoch": epoch + 1, "losses": means, "steps_per_second": steps_per_second}
        record.update({"val_dice": dice, "test_dice": test_dice})
        global_step = (epoch + 1) * self.steps
        main = self.select_by or self.model.main_predictor()
        # The log shows a predictor that trains in the epoch's phase (MKD's warm start: S_syn, not the
        # ensemble, whose S_real target statistics are set only when the warm start ends); `best/` is still
        # chosen by `main`.
        phase, training = self.model.training_phase(global_step)
        shown = main if main in training else training[0]
        if phase is not None:
            record["phase"] = phase
        if dice is not None:
            record["val_dice_mean"] = float(np.mean(dice[main]))
            record["shown"] = {"predictor": shown, "val_dice_mean": float(np.mean(dice[shown]))}
        self.write_summaries(record, global_step, shown)
        self.keep_if_best(record, main)
        # History after the best weights: a kill between the two leaves a record newer than the checkpoint,
        # which resume drops and trains again; the other order would lose the epoch's record for good.
        self.history["epochs"].append(record)
        self.folder.write_history(self.history)
        if self.verbose:
            self.print_epoch(record, phase)

    def write_summaries(self, record: dict, global_step: int, shown: str) -> None:
        """The epoch's losses, speed, panels and validation Dice for TensorBoard."""
        with self.folder.summary_writer("train").as_default():
            for name, value in record["losses"].items():
                tf.summary.scalar(f"loss/{name}", value, step=global_step)
            tf.summary.scalar("steps_per_second", record["steps_per_second"], step=global_step)
            for name, images in self.model.image_panels(self.panel_batch).items():
                tf.summary.image(f"panels/{name}", images, step=global_step, max_outputs=4)
        if record["val_dice"] is not None:
            with self.folder.summary_writer("validation").as_default():
                for name, values in record["val_dice"].items():
                    for structure, value in zip(self.cache.classes[1:], values):
                        tf.summary.scalar(f"dice_{name}/{structure}", value, step=global_step)
                    tf.summary.scalar(f"dice_{name}/mean", float(np.mean(values)), step=global_step)
                tf.summary.scalar("dice_training_predictor/mean", record["shown"]["val_dice_mean"], step=global_step)
                phase = record.get("phase") or "training"
                tf.summary.text("phase", f"{phase}: val Dice of {shown}", step=global_step)
        self.folder.flush()

    def keep_if_best(self, record: dict, main: str) -> None:
        """Save the averaged weights as ``best/`` when the epoch's validation Dice of ``main`` is the best yet.
        Without validation data the last epoch is "best": a negative score (no Dice to show) that grows with
        the epoch (-epoch would keep the first epoch and score it 0, i.e. a Dice)."""
        score = record.get("val_dice_mean", -1.0 / record["epoch"])
        best = self.history["best"]
        if best is None or score > best["score"]:
            with self.model.averaged_weights():
                self.folder.save_best(model_state(self.model))
            self.history["best"] = {"epoch": record["epoch"], "score": score, "predictor": main}

    def print_epoch(self, record: dict, phase: str | None) -> None:
        shown = record.get("shown")
        dice = f", val Dice ({shown['predictor']}) {shown['val_dice_mean']:.3f}" if shown else ""
        print(
            f"epoch {record['epoch']}{f' [{phase}]' if phase else ''}: {record['steps_per_second']:.2f} steps/s{dice}"
        )
        earlier = self.history["epochs"][-2].get("phase") if len(self.history["epochs"]) > 1 else None
        if phase and earlier != phase:
            note = self.model.phase_note(phase)  # once, when the phase first shows
            if note:
                print(note)
