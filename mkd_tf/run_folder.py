"""The run folder's writer: the one place that knows which process writes what.

In a multi-worker job every worker runs the training loop, but only the chief writes the run folder
(config, cache record, history, TensorBoard, `best/`, checkpoints). Checkpoint saving is a call every
worker makes in step (collective under MultiWorkerMirroredStrategy): a non-chief worker saves the same
checkpoint into a temporary folder of its own and deletes it at once. A single-process run is its own chief.

Layout::

    RUN/config.yaml, RUN/cache.json, RUN/history.json, RUN/logs/{train,validation}
    RUN/best/weights.*              model weights with the best validation score
    RUN/checkpoints/ckpt-E.*        state after epoch E (the last two epochs)
    RUN/checkpoints/steps/step-S.*  state after global step S inside an unfinished epoch (the last one);
    RUN/checkpoints/steps/progress.json   the partial epoch's loss sums and seconds at step S
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from mkd_tf.config import save_config
from mkd_tf.files import write_text_atomic
from mkd_tf.run_files import read_history


def _write_json(path, value):
    write_text_atomic(path, json.dumps(value, indent=1))


class RunFolder:
    """Reads and writes one run folder; on a non-chief worker every write is a no-op or goes to a
    temporary folder that is deleted (see the module docstring).

    Args:
        path: the run folder.
        chief: whether this process writes it.
    """

    def __init__(self, path, chief=True):
        self.path = Path(path)
        self.chief = bool(chief)
        self.history_path = self.path / "history.json"
        self.checkpoints = self.path / "checkpoints"
        self.steps = self.checkpoints / "steps"
        self._writers = None

    # --- start ---------------------------------------------------------------------------------------
    def prepare(self, config, cache_record):
        """Create the folder, finish what a killed run left half-done, write config.yaml and cache.json."""
        if not self.chief:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.clean_stale_staging()
        save_config(config, self.path / "config.yaml")
        _write_json(self.path / "cache.json", cache_record)

    def clean_stale_staging(self):
        """Finish or remove what a killed run left half-done in its own folder.

        - a kill between the two renames of :meth:`save_best` leaves ``.best.old`` and no ``best/``:
          the old best comes back (history.json still names its epoch);
        - ``.best.tmp`` (a best checkpoint being written) and ``*_temp`` folders (TF's staging of a
          checkpoint being saved) are incomplete and removed.
        """
        run = self.path
        retired = run / ".best.old"
        if retired.is_dir() and not (run / "best").exists():
            os.replace(retired, run / "best")
        stale = [run / ".best.tmp", retired, *self.checkpoints.glob("ckpt-*_temp"), *self.steps.glob("step-*_temp")]
        for folder in stale:
            if folder.is_dir():
                shutil.rmtree(folder)

    def load_history(self):
        if self.chief and self.history_path.exists():
            return read_history(self.history_path)  # a garbage file is one line, before any training
        return {"epochs": [], "best": None}

    def write_history(self, history):
        if self.chief:
            _write_json(self.history_path, history)

    # --- TensorBoard ---------------------------------------------------------------------------------
    def summary_writer(self, name):
        """A TensorBoard writer of ``logs/<name>`` (a no-op writer off the chief)."""
        if self._writers is None:
            self._writers = {}
        if name not in self._writers:
            self._writers[name] = (
                tf.summary.create_file_writer(str(self.path / "logs" / name))
                if self.chief
                else tf.summary.create_noop_writer()
            )
        return self._writers[name]

    def flush(self):
        for writer in (self._writers or {}).values():
            writer.flush()

    # --- best weights --------------------------------------------------------------------------------
    def save_best(self, state):
        """Model-only checkpoint of ``state`` (name -> variable) in RUN/best, replaced atomically (written
        aside, then renamed). Chief only: it is a plain write of the chief's copy, no collective."""
        if not self.chief:
            return
        run = self.path
        staging = run / ".best.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        tf.train.Checkpoint(**state).write(str(staging / "weights"))
        retired = run / ".best.old"
        shutil.rmtree(retired, ignore_errors=True)
        if (run / "best").exists():
            os.replace(run / "best", retired)
        os.replace(staging, run / "best")
        shutil.rmtree(retired, ignore_errors=True)

    # --- checkpoints ---------------------------------------------------------------------------------
    def latest_epoch_checkpoint(self):
        return tf.train.latest_checkpoint(str(self.checkpoints)) if self.chief else None

    def latest_step_checkpoint(self):
        """`(prefix, global step, progress dict or None)` of the step checkpoint, or None."""
        if not self.chief:
            return None
        prefix = tf.train.latest_checkpoint(str(self.steps))
        if prefix is None:
            return None
        step = int(prefix.rsplit("-", 1)[1])
        progress = None
        try:
            progress = json.loads((self.steps / "progress.json").read_text())
        except (OSError, ValueError):
            pass
        if not progress or progress.get("global_step") != step:
            progress = None  # a kill between the checkpoint and its record: the partial sums are lost
        return prefix, step, progress

    def _save(self, checkpoint, folder, name, number, max_to_keep):
        """Every worker calls this in step: the chief saves into ``folder``, the others into a temporary
        folder they delete right away."""
        if self.chief:
            return tf.train.CheckpointManager(
                checkpoint, str(folder), max_to_keep=max_to_keep, checkpoint_name=name
            ).save(checkpoint_number=number)
        scratch = tempfile.mkdtemp(prefix="mkd-worker-checkpoint-")
        try:
            tf.train.CheckpointManager(checkpoint, scratch, max_to_keep=1, checkpoint_name=name).save(
                checkpoint_number=number
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None

    def save_epoch(self, checkpoint, epoch):
        """State after ``epoch`` epochs (the last two kept); the step checkpoints of it are obsolete."""
        path = self._save(checkpoint, self.checkpoints, "ckpt", epoch, max_to_keep=2)
        if self.chief:
            shutil.rmtree(self.steps, ignore_errors=True)
        return path

    def save_step(self, checkpoint, global_step, progress):
        """State after ``global_step`` steps inside an epoch, then (chief) the epoch's partial record."""
        path = self._save(checkpoint, self.steps, "step", global_step, max_to_keep=1)
        if self.chief:
            _write_json(self.steps / "progress.json", dict(progress, global_step=int(global_step)))
        return path
