"""Scale-out: sharded input, a real 2-worker `mkd train` on 127.0.0.1 (update, run folder, fault, resume),
step checkpoints, precision and XLA switches, and the one-line errors of a bad cluster.

Multi-worker jobs run as subprocesses (collectives must be configured before TensorFlow's context is
used, which pytest's process already did); their runs are tiny (32 x 32 slices, 4 base filters).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf.config import load_config
from mkd_tf.data.cache import SliceCache
from mkd_tf.errors import MkdError
from mkd_tf.run_folder import RunFolder
from mkd_tf.training import load_run, train, training_streams
from tests.scripts import tiny_runs

SCRIPTS = Path(__file__).parent / "scripts"
MKD_EXECUTABLE = Path(sys.executable).with_name("mkd")


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return tiny_runs.tiny_cache(tmp_path_factory)[1]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_config(ports, index):
    return json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    )


def worker_env(ports, index, tmp_dir):
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(Path(__file__).parents[1]),
        TF_CONFIG=tf_config(ports, index),
        TMPDIR=str(tmp_dir),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    return env


def launch(command, ports, root, name):
    """One process per worker of a 2-worker cluster on ``ports``; each has its own TMPDIR under ``root``."""
    return [
        subprocess.Popen(
            command,
            env=worker_env(ports, i, root / f"{name}-tmp{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(len(ports))
    ]


def finish(processes, timeout=900):
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        outputs.append((process.returncode, out, err))
    return outputs


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# --- sharded input -----------------------------------------------------------------------------------


def test_the_shards_of_a_step_are_the_unsharded_batch_and_start_skips_whole_steps(cache_path):
    cache = SliceCache(cache_path)
    config = load_config(overrides=tiny_runs.tiny_overrides(data={"batch_size": 4}))
    whole = list(training_streams(cache, config, epoch=1).take(3))
    shards = [list(training_streams(cache, config, epoch=1, shard=(i, 2)).take(3)) for i in range(2)]
    for step, batch in enumerate(whole):
        for stream, values in batch.items():
            for key, value in values.items():
                joined = np.concatenate([shards[0][step][stream][key].numpy(), shards[1][step][stream][key].numpy()])
                np.testing.assert_array_equal(joined, value.numpy(), err_msg=f"{step} {stream} {key}")
    resumed = next(iter(training_streams(cache, config, epoch=1, start=2)))
    for stream, values in resumed.items():
        np.testing.assert_array_equal(values["image"].numpy(), whole[2][stream]["image"].numpy())
    with pytest.raises(MkdError, match="--batch-size: 4 slices cannot be split into 3 equal shards"):
        training_streams(cache, config, epoch=1, shard=(0, 3))


# --- a real 2-worker update ----------------------------------------------------------------------------


def test_two_worker_update_equals_the_single_process_update(tmp_path, cache_path):
    """One MKD step on 2 workers (2 slices each) == one step in one process on the 4 slices."""
    ports = free_ports(2)
    command = [sys.executable, str(SCRIPTS / "multi_worker_update.py"), str(tmp_path / "out"), str(cache_path)]
    for code, _, err in finish(launch(command, ports, tmp_path, "update"), timeout=600):
        assert code == 0, err[-3000:]
    reference = np.load(tmp_path / "out" / "reference.npz")
    workers = [np.load(tmp_path / "out" / f"worker{i}.npz") for i in range(2)]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["replicas"] == 2
    count = report["variables"]

    def largest(a, b, keys):
        return max(float(np.max(np.abs(a[key_a] - b[key_b]))) for key_a, key_b in keys)

    after_vs_single = largest(workers[0], reference, [(f"after_{k}", f"single_{k}") for k in range(count)])
    in_sync = largest(workers[0], workers[1], [(f"after_{k}", f"after_{k}") for k in range(count)])
    after_vs_wrong = largest(workers[0], reference, [(f"after_{k}", f"wrong_{k}") for k in range(count)])
    change = largest(
        reference, reference, [(f"single_{k}", f"initial_{k}") for k in range(count) if reference[f"trainable_{k}"]]
    )
    assert after_vs_single < 1e-5, after_vs_single  # every model and optimizer variable, float round-off
    assert in_sync == 0.0
    assert change > 1e-2 and after_vs_wrong > 1000 * 1e-5  # a per-worker loss scaling would be caught
    losses = {k: v for k, v in report["losses_multi_worker"].items() if not k.startswith("__")}
    assert losses == pytest.approx(report["losses_single"], rel=1e-5, abs=1e-6)
    # The data path of `mkd train`: the two workers' first batches are the single-process batch.
    config = load_config(overrides={"data": {"batch_size": 4}})
    first = next(iter(training_streams(SliceCache(cache_path), config, epoch=0)))
    for stream, values in first.items():
        joined = np.concatenate([workers[0][f"batch_{stream}"], workers[1][f"batch_{stream}"]])
        np.testing.assert_array_equal(joined, values["image"].numpy())


# --- a real 2-worker job: fault, resume, one run folder, evaluate ------------------------------------


@pytest.mark.benchmark  # ~14 min on a loaded 2-core machine (200 two-worker steps): not part of make test
def test_two_worker_job_survives_a_dead_worker_resumes_and_evaluates(tmp_path, cache_path):
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.TINY)
    run = tmp_path / "run"
    command = [
        str(MKD_EXECUTABLE),
        "train",
        str(cache_path),
        "--out",
        str(run),
        "--config",
        str(config),
        "--method",
        "target-only",
        "--strategy",
        "multi-worker",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "100",
        "--batch-size",
        "4",
        "--worker-timeout",
        "60",
    ]
    first = launch(command, free_ports(2), tmp_path, "first")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and all(p.poll() is None for p in first):
        if (run / "checkpoints" / "checkpoint").exists():
            break
        time.sleep(0.05)
    assert (run / "checkpoints" / "checkpoint").exists(), [p.poll() for p in first]
    first[1].send_signal(signal.SIGKILL)  # the non-chief dies in epoch 2
    killed = time.monotonic()
    code, _, err = finish(first[:1], timeout=300)[0]
    stopped_after = time.monotonic() - killed
    first[1].wait()
    assert code == 2, err[-3000:]
    assert stopped_after < 120
    lines = error_lines(err)
    assert len(err.strip().splitlines()) == 1 and "worker 0: lost the cluster" in lines[0], err[-3000:]
    assert "Relaunch every worker with the same command" in lines[0]
    assert "Traceback" not in err

    # The same command on both workers resumes from the chief's checkpoint and finishes.
    second = launch(command, free_ports(2), tmp_path, "second")
    outcomes = finish(second)
    for code, out, err in outcomes:
        assert code == 0, err[-3000:]
    assert f"resuming {run} after epoch 1" in outcomes[0][1]
    assert outcomes[1][1].strip() == f"worker done: the chief wrote {run}"
    assert outcomes[1][2].strip() == ""  # TensorFlow's native log went to a file, deleted at the end
    history = json.loads((run / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    reader = tf.train.load_checkpoint(str(run / "checkpoints"))
    assert int(reader.get_tensor("step_counter/.ATTRIBUTES/VARIABLE_VALUE")) == 200
    # Written once, by the chief: TensorBoard files carry the writer's pid, and the non-chief's
    # temporary checkpoints are gone.
    chiefs = {str(first[0].pid), str(second[0].pid)}
    for events in (run / "logs").rglob("events.out.tfevents.*"):
        assert events.name.split(".")[-3] in chiefs, events.name  # events.out.tfevents.TIME.HOST.PID.N.v2
    for name in ("first-tmp1", "second-tmp1"):
        assert not list((tmp_path / name).glob("mkd-worker-checkpoint-*"))
    assert list((tmp_path / "second-tmp1").iterdir()) == []
    outcome = CliRunner().invoke(cli, ["evaluate", str(run)], catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    assert (run / "metrics.json").exists()


# --- bad clusters --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, strategy, problem",
    [
        ("{not json", "multi-worker", "TF_CONFIG: is not valid JSON"),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
            "multi-worker",
            'TF_CONFIG: task index 3 is not in [0, 1) for "worker"',
        ),
        (
            '{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
            "auto",
            'TF_CONFIG: address \'localhost\' of "worker" is not "host:port"',
        ),
        (
            '{"cluster": {"ps": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}',
            "multi-worker",
            "TF_CONFIG: cluster job 'ps' is not supported by mkd train",
        ),
        (None, "multi-worker", "--strategy: multi-worker needs TF_CONFIG"),
    ],
)
def test_a_bad_tf_config_is_one_line_and_writes_nothing(tmp_path, cache_path, monkeypatch, value, strategy, problem):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if value is not None:
        monkeypatch.setenv("TF_CONFIG", value)
    run = tmp_path / "run"
    outcome = CliRunner().invoke(cli, ["train", str(cache_path), "--out", str(run), "--strategy", strategy, "--quiet"])
    assert outcome.exit_code == 2, outcome.output
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {problem}"), outcome.stderr
    assert not run.exists()


def test_a_cluster_after_tensorflow_already_ran_is_one_line():
    """The cluster is configured at TensorFlow's start-up: in a process that already ran TensorFlow (a notebook,
    this test process) multi-worker training stops with one line, before it diverts TensorFlow's log."""
    from mkd_tf import cluster

    tf.constant(1.0).numpy()  # the context is initialised
    parsed = cluster.read_tf_config({"TF_CONFIG": tf_config(free_ports(2), 1)})
    with pytest.raises(MkdError, match=r"^TF_CONFIG: worker 1: multi-worker training must start before") as error:
        cluster.make_multi_worker_strategy(5.0, parsed)
    assert "\n" not in str(error.value) and cluster.NATIVE_LOG["path"] is None


@pytest.mark.benchmark  # ~20-30 s: kept out of make test's 6-minute budget; run with -m benchmark
def test_a_chief_that_cannot_be_reached_is_one_line_within_the_timeout(tmp_path, cache_path):
    ports = free_ports(2)  # nothing listens on the chief's port
    run = tmp_path / "run"
    command = [
        str(MKD_EXECUTABLE),
        "train",
        str(cache_path),
        "--out",
        str(run),
        "--strategy",
        "multi-worker",
        "--worker-timeout",
        "5",
        "--quiet",
    ]
    started = time.monotonic()
    done = subprocess.run(
        command, env=worker_env(ports, 1, tmp_path / "tmp"), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert time.monotonic() - started < 240
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TF_CONFIG: worker 1 could not join the cluster"), done.stderr
    assert "within 5 s" in lines[0]
    assert not run.exists()


# --- step checkpoints --------------------------------------------------------------------------------


def test_a_kill_inside_an_epoch_resumes_at_the_step_with_the_uninterrupted_data(tmp_path, cache_path, monkeypatch):
    """Step checkpoints after every step (checkpoint_every ~ 0); killed after global step 3 of 2 x 2: the
    resumed run ends with the weights of an uninterrupted run, so it saw the same batches."""
    overrides = tiny_runs.tiny_overrides(
        method="target-only",
        checkpoint_every=1e-9,
        data={"batch_size": 2},
        schedule={"epochs": 2, "steps_per_epoch": 2},
    )
    with tiny_runs.eager():
        train(cache_path, tmp_path / "whole", overrides=overrides, verbose=0)
    saved = RunFolder.save_step

    def save_then_die(self, checkpoint, global_step, progress):
        path = saved(self, checkpoint, global_step, progress)
        if global_step == 3:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(RunFolder, "save_step", save_then_die)
    with tiny_runs.eager(), pytest.raises(KeyboardInterrupt):
        train(cache_path, tmp_path / "resumed", overrides=overrides, verbose=0)
    monkeypatch.setattr(RunFolder, "save_step", saved)
    assert (tmp_path / "resumed" / "checkpoints" / "steps" / "step-3.index").exists()
    with tiny_runs.eager():
        train(cache_path, tmp_path / "resumed", overrides=overrides, verbose=1)
    whole, resumed = (tf.train.load_checkpoint(str(tmp_path / name / "checkpoints")) for name in ("whole", "resumed"))
    names = [n for n in whole.get_variable_to_shape_map() if "OBJECT_GRAPH" not in n]
    assert set(names) == {n for n in resumed.get_variable_to_shape_map() if "OBJECT_GRAPH" not in n}
    for name in names:
        np.testing.assert_allclose(resumed.get_tensor(name), whole.get_tensor(name), atol=1e-6, err_msg=name)
    histories = [json.loads((tmp_path / n / "history.json").read_text()) for n in ("whole", "resumed")]
    # The resumed epoch's mean losses include the steps before the kill (progress.json).
    assert histories[1]["epochs"][1]["losses"] == pytest.approx(histories[0]["epochs"][1]["losses"], rel=1e-5)
    assert not (tmp_path / "resumed" / "checkpoints" / "steps").exists()  # obsolete after the epoch


def test_a_step_checkpoint_resume_says_where_it_resumes(tmp_path, cache_path, monkeypatch, capsys):
    overrides = tiny_runs.tiny_overrides(
        method="target-only", checkpoint_every=1e-9, schedule={"epochs": 1, "steps_per_epoch": 3}
    )
    saved = RunFolder.save_step

    def save_then_die(self, checkpoint, global_step, progress):
        saved(self, checkpoint, global_step, progress)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(RunFolder, "save_step", save_then_die)
    with tiny_runs.eager(), pytest.raises(KeyboardInterrupt):
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
    monkeypatch.undo()
    with tiny_runs.eager():
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=1)
    assert f"resuming {tmp_path / 'run'} at epoch 1, step 2 (from a step checkpoint)" in capsys.readouterr().out


# --- precision and XLA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, jit", [("mixed_float16", False), ("mixed_bfloat16", False), ("float32", True)])
def test_precision_and_xla_train_and_lower_the_loss(tmp_path, cache_path, precision, jit):
    """Compiled tiny runs (CPU): the loss falls, weights stay float32, the run loads and predicts in float32."""
    import keras

    overrides = tiny_runs.tiny_overrides(
        method="target-only", precision=precision, jit_compile=jit, schedule={"epochs": 2, "steps_per_epoch": 6}
    )
    from tensorflow.python.framework import config as tf_framework_config

    deterministic = tf_framework_config.is_op_determinism_enabled()
    if jit:  # conftest enables op determinism; XLA has no deterministic MaxPool gradient
        tf_framework_config.disable_op_determinism()
    try:
        with tiny_runs.capture_models() as built:
            train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
    finally:
        if deterministic:
            tf.config.experimental.enable_op_determinism()
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after training
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    totals = [e["losses"]["total"] for e in history["epochs"]]
    assert all(np.isfinite(totals)) and totals[1] < totals[0], totals
    model = built[-1]
    segmentor = model.segmentors()["real"]
    expected_compute = "float32" if precision == "float32" else precision.split("_")[1]
    assert segmentor.encoder_blocks[0].dtype_policy.compute_dtype == expected_compute
    assert all(v.dtype == "float32" for v in model.weights if v.dtype.startswith("float"))
    images = tf.zeros((1, 32, 32, 1))
    assert segmentor(images).dtype == tf.float32  # logits (what the losses see) stay float32
    keys = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints")).get_variable_to_shape_map()
    assert any("loss_scale" in k for k in keys) == (precision == "mixed_float16")
    loaded, _, _ = load_run(tmp_path / "run", "last")
    assert loaded.predict_probabilities(images, "real").dtype == tf.float32


def test_xla_that_cannot_compile_the_step_is_one_line(tmp_path, cache_path):
    """Under op determinism (on in these tests) XLA has no MaxPool gradient kernel: one line, exit 2."""
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.tiny_overrides(method="target-only"))
    outcome = CliRunner().invoke(
        cli,
        ["train", str(cache_path), "--out", str(tmp_path / "run"), "--config", str(config), "--jit-compile", "--quiet"],
    )
    assert outcome.exit_code == 2, outcome.output
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --jit-compile: XLA cannot compile the training step"), (
        outcome.stderr
    )


def test_precision_is_a_learning_setting_and_jit_a_runtime_one(tmp_path, cache_path):
    overrides = tiny_runs.tiny_overrides(method="target-only", schedule={"epochs": 1, "steps_per_epoch": 1})
    with tiny_runs.eager():
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
        train(
            cache_path,
            tmp_path / "run",
            verbose=0,
            overrides={**overrides, "jit_compile": True, "checkpoint_every": 0, "worker_timeout": 5},
        )
        with pytest.raises(MkdError, match="differs in: precision"):
            train(cache_path, tmp_path / "run", overrides={**overrides, "precision": "mixed_bfloat16"}, verbose=0)
