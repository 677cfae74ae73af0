"""Tiny phantom cache and tiny training runs shared by the method tests (built once per session).

Training is the expensive part of these tests: tracing the MKD train step into a graph takes
~10-30 s on a shared 2-core machine, while an eager step of the tiny model takes ~0.1-1 s. So:

- :func:`tiny_cache` writes one 3 CT + 2 MRI phantom and its 32 x 32 slice cache per session (shared by
  the xdist workers, :mod:`tests.scripts.session_folders`);
- :func:`trained_run` trains a run once per session and memoises it (path, the in-memory model,
  the value `train` returned), so test_training, test_evaluation and test_inference share runs; the
  compiled main MKD run (:func:`main_mkd_run`, the most expensive) is also shared by the xdist workers;
- runs are eager (``tf.config.run_functions_eagerly``) unless ``graph=True``: the loop code is the
  same, only `distributed_step` is not compiled. The main MKD run is compiled, so the compiled path
  of the loop is covered too (and the finetune switch and replica tests compile their steps).
"""

import contextlib
import warnings
from pathlib import Path

import yaml

from tests.scripts.session_folders import shared_folder

# The brief's tiny networks and budget; every run starts from these.
TINY = {
    "segmentor": {"base_filters": 4, "depth": 2},
    "alignment": {"base_filters": 4, "num_blocks": 1, "disc_filters": 4, "disc_layers": 2},
    "data": {"batch_size": 2},
    "schedule": {"epochs": 1, "steps_per_epoch": 2},
}
# Phantom CT grid 32 x 32 x 16 at 4.8 x 4.8 x 7.5 mm -> 24 x 24 x 12 at this spacing: 32 x 32 slices
# (the body is padded), 12 slices per CT volume, fewer per MRI volume.
SPACING = (6.4, 6.4, 10.0)
SIZE = 32
PHANTOM = {"n_ct": 3, "n_mr": 2, "shape": (32, 32, 16)}

_SESSION = {"root": None, "cache": None, "runs": {}}


def _root(tmp_path_factory):
    if _SESSION["root"] is None:
        _SESSION["root"] = tmp_path_factory.mktemp("method_runs")
    return _SESSION["root"]


def deep_update(base, update):
    """A copy of nested dict ``base`` with ``update`` merged in."""
    merged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in (update or {}).items():
        merged[key] = deep_update(merged.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def tiny_overrides(**update):
    """:data:`TINY` with nested ``update`` merged in (e.g. ``method="joint"``)."""
    return deep_update(TINY, update)


def write_yaml(path, values):
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))
    return Path(path)


def tiny_cache(tmp_path_factory):
    """`(phantom_root, cache_path)`: MM-WHS-layout phantom (CT 1001-1003, MR 1001-1002) and its cache.

    The cache splits the 3 labelled CT volumes into train/val/test (one each); both MRI volumes train.
    Read-only for tests.
    """
    if _SESSION["cache"] is None:
        folder, _ = shared_folder(tmp_path_factory, "tiny_cache", write_tiny_cache)
        _SESSION["cache"] = (folder / "phantom", folder / "cache")
    return _SESSION["cache"]


def write_tiny_cache(root):
    """Write the tiny phantom (``root/phantom``) and its slice cache (``root/cache``); `(phantom, cache)`."""
    from mkd_tf.data.phantom import write_phantom
    from mkd_tf.data.prepare import PrepareOptions, prepare_cache
    from mkd_tf.data.preprocess import PreprocessConfig

    phantom = Path(write_phantom(Path(root) / "phantom", **PHANTOM))
    cache = prepare_cache(
        phantom / "ct_train",
        phantom / "mr_train",
        Path(root) / "cache",
        PrepareOptions(preprocess=PreprocessConfig(spacing=SPACING, size=SIZE)),
    )
    return phantom, Path(cache)


@contextlib.contextmanager
def eager(enabled=True):
    """Run `tf.function`s eagerly inside the block (tf.data functions are unaffected)."""
    import tensorflow as tf

    previous = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(enabled)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Even though the `tf.config.experimental_run_functions_eagerly`")
            yield
    finally:
        tf.config.run_functions_eagerly(previous)


@contextlib.contextmanager
def capture_models():
    """Record every model `mkd_tf.training.build_method` builds (the in-memory model of a run)."""
    from mkd_tf import training

    built, original = [], training.build_method

    def recording(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(model)
        return model

    training.build_method = recording
    try:
        yield built
    finally:
        training.build_method = original


class Run:
    """A finished tiny run: ``path``, the in-memory ``model`` at the end of training, ``result``."""

    def __init__(self, path, model, result):
        self.path, self.model, self.result = Path(path), model, result


def trained_run(tmp_path_factory, name, overrides=None, cli_args=None, graph=False, path=None):
    """Train (once per session) a tiny run called ``name``.

    Args:
        name: memo key and folder name.
        overrides: nested config overrides merged over :data:`TINY` (API path, `training.train`).
        cli_args: instead, extra `mkd train` arguments (CLI path, in-process through click); the tiny
            settings then come from a `--config` YAML.
        graph: compile the train step (`tf.function`) instead of running it eagerly.
        path: the run folder (default: ``runs/<name>`` in this worker's temporary folder).
    """
    if name in _SESSION["runs"]:
        return _SESSION["runs"][name]
    from mkd_tf.training import train

    _, cache = tiny_cache(tmp_path_factory)
    path = path or _root(tmp_path_factory) / "runs" / name
    with capture_models() as built, eager(not graph):
        if cli_args is None:
            result = train(cache, path, overrides=tiny_overrides(**(overrides or {})), verbose=0)
        else:
            from click.testing import CliRunner

            from mkd_cli.main import main

            config = write_yaml(_root(tmp_path_factory) / f"{name}.yaml", tiny_overrides(**(overrides or {})))
            outcome = CliRunner().invoke(
                main,
                ["train", str(cache), "--out", str(path), "--config", str(config), "--quiet", *cli_args],
                catch_exceptions=False,
            )
            assert outcome.exit_code == 0, outcome.output
            result = outcome.output
    run = Run(path, built[-1], result)
    _SESSION["runs"][name] = run
    return run


# The shared runs: name -> (overrides over TINY, extra `mkd train` CLI arguments or None, compiled).
RUNS = {
    # The full MKD method, compiled, 2 epochs x 10 steps (the one graph-mode run): 5 warm-start steps,
    # then distillation, so both compiled step functions run and every epoch logs every MKD term.
    "mkd": ({"method": "mkd", "schedule": {"epochs": 2, "steps_per_epoch": 10, "mkd_pretrain": 0.25}}, None, True),
    "target-only": ({"method": "target-only"}, None, False),
    "assistant-only": ({"method": "assistant-only"}, None, False),
    "joint": ({"method": "joint"}, None, False),
    "finetune": ({"method": "finetune"}, None, False),
    "ummkd": ({"method": "ummkd"}, None, False),
    # The ablations go through the CLI flags (tiny settings from a --config YAML).
    "mkd-no-iam": ({}, ["--no-iam"], False),
    "mkd-no-kd-s2r": ({}, ["--no-kd-s2r"], False),
    "mkd-no-kd-r2s": ({}, ["--no-kd-r2s"], False),
}


def shared_run(tmp_path_factory, name):
    """One of :data:`RUNS`, trained once per session."""
    if name == "mkd":
        return main_mkd_run(tmp_path_factory)
    overrides, cli_args, graph = RUNS[name]
    return trained_run(tmp_path_factory, name, overrides, cli_args, graph)


def main_mkd_run(tmp_path_factory):
    """The compiled full-MKD run (2 epochs x 10 steps) shared by several test files.

    It is trained once per session by whichever xdist worker needs it first; that worker keeps the
    in-memory model and also writes its whole state (weights, optimizer moments and moving averages) to
    ``in_memory/``, from which the other worker rebuilds the same in-memory model. So a check of the
    run's checkpoints against the in-memory model stays a check of what `train` wrote, in both workers.
    """
    if "mkd" in _SESSION["runs"]:
        return _SESSION["runs"]["mkd"]
    overrides, cli_args, graph = RUNS["mkd"]

    def build(folder):
        run = trained_run(tmp_path_factory, "mkd", overrides, cli_args, graph, path=folder / "run")
        _in_memory_checkpoint(run.model).write(str(folder / "in_memory" / "state"))

    folder, built = shared_folder(tmp_path_factory, "main_mkd_run", build)
    if not built:
        _SESSION["runs"]["mkd"] = Run(folder / "run", _restore_in_memory(folder), None)
    return _SESSION["runs"]["mkd"]


def _in_memory_checkpoint(model):
    import tensorflow as tf

    from mkd_tf.checkpoints import training_state

    return tf.train.Checkpoint(**training_state(model, tf.Variable(0, dtype=tf.int64, trainable=False)))


def _restore_in_memory(folder):
    """The model `train` held at the end of the shared main run, rebuilt from its ``in_memory/`` state."""
    from mkd_tf.config import load_config
    from mkd_tf.files import read_json
    from mkd_tf.training import build_method

    config = load_config(folder / "run" / "config.yaml", recorded=True)
    record = read_json(folder / "run" / "cache.json")
    model = build_method(config, len(record["classes"]))
    size = int(record["preprocess"]["size"])
    model.build_for((size, size, 1))
    model.build_optimizers()
    _in_memory_checkpoint(model).read(str(folder / "in_memory" / "state")).assert_consumed()
    return model
