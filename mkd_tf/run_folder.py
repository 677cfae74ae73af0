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
import re
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from mkd_tf.config import save_config
from mkd_tf.errors import fail
from mkd_tf.files import lock_folder, write_text_atomic
from mkd_tf.run_files import read_history


def _write_json(path, value):
    write_text_atomic(path, json.dumps(value, indent=1))


# What a run folder holds that training writes, replaces or deletes (names matched exactly; these folders
# are real folders, never symbolic links). Any other name in a run folder (metrics.* of `mkd evaluate`, a
# user's notes) is never touched by training and is left alone.
# The files of a checkpoint prefix P: P.index, P.data-K-of-N, and P_temp/ while TensorFlow writes it.
_CHECKPOINT_FILE = r"(\.index|\.data-\d{5}-of-\d{5}|_temp)"
_RUN_FILES = {"config.yaml", "cache.json", "history.json"}
_RUN_FOLDERS = {"logs", "best", ".best.tmp", ".best.old", "checkpoints"}
_INSIDE = {
    "logs": None,
    "best": re.compile(rf"^weights{_CHECKPOINT_FILE}$"),
    ".best.tmp": re.compile(rf"^weights{_CHECKPOINT_FILE}$"),
    ".best.old": re.compile(rf"^weights{_CHECKPOINT_FILE}$"),
    "checkpoints": re.compile(rf"^(checkpoint(\.tmp[0-9a-f]+)?|ckpt-\d+{_CHECKPOINT_FILE}|steps)$"),
    "checkpoints/steps": re.compile(
        rf"^(checkpoint(\.tmp[0-9a-f]+)?|step-\d+{_CHECKPOINT_FILE}|progress\.json|\.progress\.tmp-[0-9a-f]{{8}}\.json)$"
    ),
}
# A run writes cache.json, then config.yaml: a folder without config.yaml holds nothing of a run but
# cache.json and these temporaries.
_BEFORE_CONFIG = re.compile(r"^\.(config|cache)\.tmp-[0-9a-f]{8}\.(yaml|json)$")


def _foreign_entries(folder, relative=""):
    """Paths under ``folder`` (relative, sorted) that `mkd train` did not write where it writes, replaces or
    deletes (``best/`` is replaced as a whole): a symbolic link, a file or folder of the wrong kind, a name
    it never writes inside its folders."""
    allowed = _INSIDE.get(relative) if relative else None
    foreign = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = f"{relative}/{entry.name}" if relative else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if not relative and entry.name not in _RUN_FILES | _RUN_FOLDERS:
                continue  # a name training never writes
            if entry.is_symlink():
                foreign.append(name)
            elif not relative:
                if is_dir != (entry.name in _RUN_FOLDERS):
                    foreign.append(name)
                elif is_dir and _INSIDE[entry.name] is not None:
                    foreign.extend(_foreign_entries(entry.path, entry.name))
            elif not allowed.match(entry.name):
                foreign.append(name)
            elif name == "checkpoints/steps":
                foreign.extend(_foreign_entries(entry.path, name) if is_dir else [name])
            elif name.endswith("_temp") != is_dir:  # a TF staging folder is a folder, everything else a file
                foreign.append(name)
    return foreign


def not_a_run_folder(path):
    """Why ``path`` is not a folder `mkd train` may write into, or `None` when it may.

    It may when it does not exist, is empty, or is a run folder: a real folder holding a ``config.yaml`` and
    the ``cache.json`` record written before it, where every name training writes, replaces or deletes
    (:data:`_RUN_FILES`, :data:`_RUN_FOLDERS` and their contents) is what training wrote there, so that a
    run never deletes or overwrites a file it did not create. A folder without ``config.yaml`` may hold
    only what a run writes before it (its ``cache.json`` record and their temporaries).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return None
    if not path.exists():
        return "it is a broken symbolic link"
    if not path.is_dir():
        return "it is a file, not a folder"
    try:
        names = sorted(entry.name for entry in os.scandir(path))
        has_config, has_record = ((path / name).is_file() for name in ("config.yaml", "cache.json"))
        if has_record and not _is_cache_record(path / "cache.json"):
            return "its cache.json is not a run's record of its slice cache"
        if not has_config:
            others = [name for name in names if not (_BEFORE_CONFIG.match(name) or name == "cache.json")]
            return f"it holds {others[0]} but no config.yaml" if others else None
        if not has_record:  # a run writes cache.json before config.yaml: this config.yaml is someone else's
            return "it holds config.yaml but no cache.json"
        foreign = _foreign_entries(path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return f"it holds {foreign[0]}{more}, which a run folder does not"
    return None


def _is_cache_record(path):
    """Whether ``path`` reads as the ``cache.json`` a run writes (:func:`mkd_tf.training.cache_record`)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"path", "classes", "preprocess"} <= set(record)


def _lock_holder(folder):
    """The pid holding a ``flock`` on ``folder`` according to Linux's /proc/locks, or `None` if unknown."""
    try:
        inode = os.stat(folder).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


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
        self._lock = None

    # --- start ---------------------------------------------------------------------------------------
    def started(self):
        """Whether the run got as far as its first best checkpoint, history record or checkpoint: before
        that, the folder holds only config.yaml and cache.json and may be started again with another config."""
        run = self.path
        return (
            self.history_path.exists()
            or any((run / name / "weights.index").exists() for name in ("best", ".best.old"))
            or any(self.checkpoints.glob("ckpt-*.index"))
            or any(self.steps.glob("step-*.index"))
        )

    def check_not_in_use(self):
        """Fail with one line, writing nothing, when another `mkd train` holds the folder's lock."""
        if self.chief and self.path.is_dir() and self._lock is None:
            descriptor = lock_folder(self.path)
            if descriptor is None:
                self._refuse_in_use()
            os.close(descriptor)

    def _refuse_in_use(self):
        holder = _lock_holder(self.path)
        fail(
            self.path,
            "another mkd train is using this run folder"
            + (f" (pid {holder})" if holder else "")
            + "; wait for it to finish or use another --out",
        )

    def lock(self):
        """Create the folder and hold an exclusive lock on it until :meth:`unlock` (or the process ends:
        the kernel releases it, so a killed run never blocks the next one). A second `mkd train` of the same
        folder fails with one line. Chief only: the other workers of a job share the chief's folder."""
        if not self.chief or self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(self.path)
        if self._lock is None:
            self._refuse_in_use()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.unlock()
        return False

    def unlock(self):
        """Release the lock of :meth:`lock` (if held)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def prepare(self, config, cache_record, check=None):
        """Lock the folder (:meth:`lock`), run ``check()`` again under the lock (the folder may have changed
        since the caller's first check), finish what a killed run left half-done, write config.yaml and
        cache.json."""
        if not self.chief:
            return
        self.lock()
        if check is not None:
            check()
        self.clean_stale_staging()
        _write_json(self.path / "cache.json", cache_record)  # first: see not_a_run_folder
        save_config(config, self.path / "config.yaml")

    def clean_stale_staging(self):
        """Finish or remove what a killed run left half-done in its own folder.

        - a kill between the two renames of :meth:`save_best` leaves ``.best.old`` and no ``best/``:
          the old best comes back (history.json still names its epoch);
        - ``.best.tmp`` (a best checkpoint being written) and ``*_temp`` folders (TF's staging of a
          checkpoint being saved) are incomplete and removed.
        """
        run = self.path
        retired = run / ".best.old"
        if retired.is_dir() and not retired.is_symlink() and not (run / "best").exists():
            os.replace(retired, run / "best")
        stale = [run / ".best.tmp", retired, *self.checkpoints.glob("ckpt-*_temp"), *self.steps.glob("step-*_temp")]
        for folder in stale:
            if folder.is_dir() and not folder.is_symlink():  # a link is never followed into a deletion
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
