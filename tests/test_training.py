"""The training loop (`mkd train`): replica scaling, resume after kill -9, divergence, every method.

Runs are tiny (32 x 32 slices, 4 base filters, a few steps) and shared through
:mod:`tests.scripts.tiny_runs`; most are eager (same loop, `distributed_step` not compiled), the main
MKD run is compiled.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf import checkpoints, losses, training
from mkd_tf.config import load_config
from mkd_tf.data.cache import SliceCache
from mkd_tf.data.nifti import load_label
from mkd_tf.errors import MkdError
from mkd_tf.evaluation import evaluate_run
from mkd_tf.metrics import volume_diagonal
from mkd_tf.models.baselines import FinetuneModel
from mkd_tf.training import build_method, load_run, resume_settings, train
from tests.scripts import tiny_runs

SCRIPTS = Path(__file__).parent / "scripts"
MKD_EXECUTABLE = Path(sys.executable).with_name("mkd")
IAM_TERMS = {"adversarial", "cycle", "structure", "discriminator"}  # loss.structure is on by default
ALL_MKD_TERMS = {"seg_syn", "seg_real", "seg_syn_target", "kd_s2r", "kd_r2s", "kd_s2r_target"} | IAM_TERMS
MKD_DISTILLATION = {"kd_s2r", "kd_r2s", "kd_s2r_target"}  # each with weight 1 in "total"
MKD_SEGMENTATION = {"seg_syn", "seg_real", "seg_syn_target"}  # each with weight 1 in "total"
MKD_PREDICTORS = ["syn", "real", "ensemble"]


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return tiny_runs.tiny_cache(tmp_path_factory)[1]


def subprocess_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def history_of(run):
    return json.loads((Path(run) / "history.json").read_text())


def latest_checkpoint_number(run):
    latest = tf.train.latest_checkpoint(str(Path(run) / "checkpoints"))
    return None if latest is None else int(latest.rsplit("-", 1)[1])


def validation_images(cache):
    rows = cache.indices("target", "val", labelled=True)
    return np.asarray(cache.images("target")[rows])[..., None], np.asarray(cache.labels("target")[rows])


# --- 1. replica scaling ------------------------------------------------------------------------------


@pytest.mark.benchmark  # ~20-30 s: kept out of make test's 6-minute budget; run with -m benchmark
def test_two_replica_update_equals_single_device_update(tmp_path):
    """One MKD step on 2 mirrored CPU replicas (2 slices each) == one step on 1 device with the 4 slices."""
    out = tmp_path / "replicas.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "replica_update.py"), str(out)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["replicas"] == 2
    assert report["replicas_in_sync"] == 0.0
    # Every model and optimizer variable (144 of them, incl. SGD iterations) matches to float round-off ...
    assert report["max_diff_mirrored"] < 1e-5, report
    # ... while the same check would catch a loss divided by the per-replica batch (a 2x update).
    assert report["max_change"] > 1e-2
    assert report["max_diff_wrong"] > 1000 * 1e-5, report
    # Reported losses are summed over replicas: each replica divides by the global batch.
    assert set(report["losses_mirrored"]) == ALL_MKD_TERMS | {"total"}
    for name, value in report["losses_single"].items():
        assert report["losses_mirrored"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


# --- 2. resume ---------------------------------------------------------------------------------------

RESUME_STEPS = 20  # an epoch also rebuilds the input pipeline (~1 s): the kill lands well inside epoch 2


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, cache_path):
    """A target-only run killed with SIGKILL during epoch 2 and resumed by running the same command."""
    root = tmp_path_factory.mktemp("resume")
    config = tiny_runs.write_yaml(root / "tiny.yaml", tiny_runs.TINY)
    run = root / "run"
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
        "--epochs",
        "3",
        "--steps-per-epoch",
        str(RESUME_STEPS),
    ]
    first = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = run / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 600
    while first.poll() is None and time.monotonic() < deadline:
        if state_file.exists() and "ckpt-1" in state_file.read_text():
            os.kill(first.pid, signal.SIGKILL)  # the worst moment: right after the checkpoint is written
            break
        time.sleep(0.01)
    first.wait(timeout=60)
    killed_at = latest_checkpoint_number(run)
    second = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    return {
        "run": run,
        "command": command,
        "config": config,
        "first_returncode": first.returncode,
        "first_stderr": first.stderr.read().decode(),
        "killed_at": killed_at,
        "second": second,
    }


def test_resume_after_kill_trains_each_epoch_once(resumed_run):
    run, second = resumed_run["run"], resumed_run["second"]
    assert resumed_run["first_returncode"] == -signal.SIGKILL, resumed_run["first_stderr"][-2000:]
    assert resumed_run["killed_at"] in (1, 2)  # the kill landed before the last epoch
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming {run} after epoch {resumed_run['killed_at']}" in second.stdout
    assert [e["epoch"] for e in history_of(run)["epochs"]] == [1, 2, 3]
    assert latest_checkpoint_number(run) == 3
    # Optimizer state and step counter came back: 3 epochs of steps in total, not 2 or 1.
    reader = tf.train.load_checkpoint(str(run / "checkpoints"))
    keys = reader.get_variable_to_shape_map()
    assert int(reader.get_tensor("optimizer.Ssegmentors.Siteration/.ATTRIBUTES/VARIABLE_VALUE")) == 3 * RESUME_STEPS
    assert int(reader.get_tensor("step_counter/.ATTRIBUTES/VARIABLE_VALUE")) == 3 * RESUME_STEPS
    assert int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 3


def test_running_a_finished_run_again_trains_nothing(resumed_run, monkeypatch):
    run = resumed_run["run"]
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    history = (run / "history.json").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr("mkd_tf.models.baselines.TargetOnlyModel.train_step", no_training)
    outcome = CliRunner().invoke(cli, resumed_run["command"][1:], catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    assert f"resuming {run} after epoch 3" in outcome.output
    assert "epoch 4" not in outcome.output
    assert (run / "history.json").read_bytes() == history
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_a_different_config_in_the_same_run_fails_in_one_line(resumed_run):
    outcome = CliRunner().invoke(cli, resumed_run["command"][1:] + ["--seed", "1"])
    assert outcome.exit_code == 2
    assert outcome.stdout == ""
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith(f"error: {resumed_run['run']}: holds a run with a different config")
    assert "differs in: seed" in lines[0]


def test_resuming_compares_only_the_loss_settings_the_method_reads():
    """A changed MKD loss default must not make a finished baseline run 'different' (and fail
    `mkd compare` over old runs), while for MKD it does, named by its dotted key."""
    paper = {"loss": {"syn_on_target": 0.0}, "seed": 3}
    for method, differs in (("target-only", []), ("ummkd", []), ("mkd", ["loss.syn_on_target"])):
        before, now = (resume_settings(load_config(overrides={"method": method, **o})) for o in (paper, {"seed": 3}))
        assert sorted(k for k in now if now[k] != before[k]) == differs, method
    # the same for the schedule settings of one method: MKD's warm start, finetune's switch
    for method, differs in (
        ("ummkd", []),
        ("finetune", ["schedule.finetune_switch"]),
        ("mkd", ["schedule.mkd_pretrain"]),
    ):
        other = {"schedule": {"mkd_pretrain": 0.5, "finetune_switch": 0.3}, "seed": 3}
        before, now = (resume_settings(load_config(overrides={"method": method, **o})) for o in (other, {"seed": 3}))
        assert sorted(k for k in now if now[k] != before.get(k)) == differs, method
    # and for the IAM's settings, which only MKD reads
    for method, differs in (("finetune", []), ("ummkd", []), ("mkd", ["alignment.skip_kernel"])):
        other = {"alignment": {"skip_kernel": 3}, "seed": 3}
        before, now = (resume_settings(load_config(overrides={"method": method, **o})) for o in (other, {"seed": 3}))
        assert sorted(k for k in now if now[k] != before.get(k)) == differs, method
    ummkd = resume_settings(load_config(overrides={"method": "ummkd", "loss": {"ummkd_weight": 2.0}}))
    assert ummkd["loss.ummkd_weight"] == 2.0 and "loss.temperature" not in ummkd and ummkd["segmentor.depth"] == 4


def test_kill_right_after_a_checkpoint_keeps_that_epoch_in_the_history(tmp_path, cache_path, monkeypatch):
    """SIGKILL between the checkpoint and history.json must not lose the epoch's record on resume."""
    saved = tf.train.CheckpointManager.save

    def save_then_die(self, *args, **kwargs):
        path = saved(self, *args, **kwargs)
        if kwargs.get("checkpoint_number") == 2:
            raise KeyboardInterrupt("killed")
        return path

    overrides = tiny_runs.tiny_overrides(method="target-only", schedule={"epochs": 2, "steps_per_epoch": 1})
    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_then_die)
    with tiny_runs.eager(), pytest.raises(KeyboardInterrupt):
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", saved)
    with tiny_runs.eager():
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
    assert [e["epoch"] for e in history_of(tmp_path / "run")["epochs"]] == [1, 2]
    assert latest_checkpoint_number(tmp_path / "run") == 2


# --- 3. divergence -----------------------------------------------------------------------------------


def test_nan_loss_stops_training_naming_the_term_and_the_step(tmp_path, cache_path, monkeypatch):
    calls = {"n": 0}
    original = losses.distillation_loss

    def poisoned(teacher, student, temperature):
        calls["n"] += 1
        value = original(teacher, student, temperature)
        # Three KD terms per step (s2r on aligned images first): call 10 is kd_s2r of epoch 2, step 2.
        return value * np.nan if calls["n"] >= 10 else value

    monkeypatch.setattr(losses, "distillation_loss", poisoned)
    # No warm start: every step distils, so the call count maps to (epoch, step) as above.
    overrides = tiny_runs.tiny_overrides(
        method="mkd", ablation={"iam": False}, schedule={"epochs": 2, "mkd_pretrain": 0.0}
    )
    run = tmp_path / "run"
    with tiny_runs.eager(), pytest.raises(MkdError) as raised:
        train(cache_path, run, overrides=overrides, verbose=0)
    message = str(raised.value)
    assert "\n" not in message
    assert "training diverged: loss 'kd_s2r' is nan at epoch 2, step 2" in message
    # Nothing of the diverged epoch was kept.
    assert latest_checkpoint_number(run) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("ckpt-2")) == []
    assert [e["epoch"] for e in history_of(run)["epochs"]] == [1]
    assert history_of(run)["best"]["epoch"] == 1


# --- 4. every method ---------------------------------------------------------------------------------

# name (a run of tiny_runs.RUNS) -> (loss terms besides "total", predictors, the terms "total" sums)
METHODS = {
    "target-only": ({"seg_real"}, ["real"], {"seg_real"}),
    "assistant-only": ({"seg_syn"}, ["syn"], {"seg_syn"}),
    "joint": ({"seg_assistant", "seg_target"}, ["joint"], {"seg_assistant", "seg_target"}),
    "finetune": ({"seg"}, ["finetune"], {"seg"}),
    "ummkd": ({"seg_assistant", "seg_target", "kd"}, ["ummkd"], {"seg_assistant", "seg_target", "kd"}),
    "mkd-no-iam": (ALL_MKD_TERMS - IAM_TERMS, MKD_PREDICTORS, MKD_SEGMENTATION | MKD_DISTILLATION),
    # without S_syn -> S_real distillation neither of its terms (aligned images, target images) runs
    "mkd-no-kd-s2r": (
        ALL_MKD_TERMS - {"kd_s2r", "kd_s2r_target"},
        MKD_PREDICTORS,
        MKD_SEGMENTATION | {"kd_r2s"},
    ),
    "mkd-no-kd-r2s": (
        ALL_MKD_TERMS - {"kd_r2s"},
        MKD_PREDICTORS,
        MKD_SEGMENTATION | {"kd_s2r", "kd_s2r_target"},
    ),
    "mkd": (ALL_MKD_TERMS, MKD_PREDICTORS, MKD_SEGMENTATION | MKD_DISTILLATION),
}


def method_run(tmp_path_factory, name):
    if name == "ummkd" and not Path(training.__file__).with_name("models").joinpath("ummkd.py").exists():
        pytest.skip("mkd_tf/models/ummkd.py does not exist yet")
    return tiny_runs.shared_run(tmp_path_factory, name)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_checkpoints_restores_and_evaluates(tmp_path_factory, cache_path, name):
    terms, predictors, in_total = METHODS[name]
    run = method_run(tmp_path_factory, name)
    config = load_config(run.path / "config.yaml")
    epochs = config["schedule"]["epochs"]
    history = history_of(run.path)

    # Losses: exactly the method's terms, finite, non-negative, and "total" = what the segmentors minimise.
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, epochs + 1))
    steps, warm_start = config["schedule"]["steps_per_epoch"], getattr(run.model, "pretrain_steps", 0)
    frozen = getattr(run.model, "freeze_iam_after_warm_start", False)
    for record in history["epochs"]:
        expected = set(terms)
        if frozen and (record["epoch"] - 1) * steps >= warm_start:
            expected -= IAM_TERMS  # an epoch of distillation alone: the IAM is frozen, only G's forward pass runs
        assert set(record["losses"]) == expected | {"total"}
        assert all(math.isfinite(v) and v >= 0 for v in record["losses"].values()), record["losses"]
        assert record["losses"]["total"] == pytest.approx(sum(record["losses"][t] for t in in_total), rel=1e-5)
        assert set(record["val_dice"]) == set(predictors)
        assert all(0.0 <= d <= 1.0 for values in record["val_dice"].values() for d in values)

    # Checkpoints: best/ and the epoch checkpoints; restoring them gives the in-memory model's predictions.
    assert (run.path / "best" / "weights.index").exists()
    assert latest_checkpoint_number(run.path) == epochs
    assert run.model.predictor_names() == predictors
    cache = SliceCache(cache_path)
    images, _ = validation_images(cache)
    best, _, _ = load_run(run.path, "best")  # what evaluate / predict / export use
    restored = {"best": best}
    if epochs > 1:  # 1 epoch: best and last are the same weights; save a model build
        restored["last"] = load_run(run.path, "last")[0]
    for which, model in restored.items():
        for predictor in predictors:
            with run.model.averaged_weights():  # what evaluation and the checkpoints' readers see
                expected = run.model.predict_probabilities(images, predictor).numpy()
            if which == "best" and history["best"]["epoch"] != epochs:
                continue  # the in-memory model is the last epoch's; "last" covers it
            np.testing.assert_allclose(model.predict_probabilities(images, predictor).numpy(), expected, atol=1e-6)

    # Evaluation: the three files, values in range.
    result = evaluate_run(run.path, "test")
    for suffix in ("json", "csv", "md"):
        assert (run.path / f"metrics.{suffix}").stat().st_size > 0
    written = json.loads((run.path / "metrics.json").read_text())
    assert written["method"] == config["method"] and list(written["cases"]) == predictors
    test_volumes = cache.volumes("target", "test")
    structures = cache.classes[1:]
    reference = load_label(test_volumes[0]["label"])
    diagonal = volume_diagonal(reference.data.shape, reference.spacing)  # the largest possible distance
    for predictor in predictors:
        assert sorted(written["cases"][predictor]) == sorted(v["case_id"] for v in test_volumes)
        for case, per_structure in written["cases"][predictor].items():
            assert list(per_structure) == structures
            for values in per_structure.values():
                assert 0.0 <= values["dice"] <= 1.0
                assert 0.0 <= values["assd"] <= diagonal + 1e-6
                assert 0.0 <= values["hd95"] <= diagonal + 1e-6
    rows = (run.path / "metrics.csv").read_text().strip().splitlines()
    assert rows[0] == "predictor,case,structure,dice,assd_mm,hd95_mm"
    assert len(rows) - 1 == len(predictors) * len(test_volumes) * len(structures)
    table = (run.path / "metrics.md").read_text()
    assert table == result["table"]
    assert all(f"{config['method']} — {p} (test, 1 volumes)" in table for p in predictors)


@pytest.mark.parametrize("method", ["target-only", "joint", "finetune", "ummkd"])
def test_methods_needing_target_labels_fail_clearly_without_them(tmp_path, cache_path, method):
    run = tmp_path / "run"
    overrides = tiny_runs.tiny_overrides(method=method, data={"target_labelled": 0})
    with pytest.raises(MkdError) as raised:
        train(cache_path, run, overrides=overrides, verbose=0)
    message = str(raised.value)
    assert "\n" not in message
    assert f"method '{method}' needs labelled target training volumes" in message
    # Nothing written: the corrected command can use the same --out.
    assert not (run / "config.yaml").exists()


def test_target_labelled_beyond_the_cache_fails_before_writing(tmp_path, cache_path):
    with pytest.raises(MkdError, match="--target-labelled 2 but the cache has 1 labelled target training volumes"):
        train(cache_path, tmp_path / "run", overrides=tiny_runs.tiny_overrides(data={"target_labelled": 2}), verbose=0)
    assert not (tmp_path / "run" / "config.yaml").exists()


# --- finetune ----------------------------------------------------------------------------------------


def test_finetune_switch_step_is_the_configured_fraction_of_the_budget():
    config = load_config(
        overrides=tiny_runs.tiny_overrides(
            method="finetune", schedule={"epochs": 3, "steps_per_epoch": 10, "finetune_switch": 0.4}
        )
    )
    assert build_method(config, 8).switch_step == 12


@pytest.mark.parametrize(
    "method, phase_starts", [("mkd", [0, 12]), ("finetune", [0, 9]), ("ummkd", [0]), ("target-only", [0])]
)
def test_a_cosine_learning_rate_restarts_at_each_phase_of_the_method(method, phase_starts):
    """``optimizer.lr_schedule: cosine``: the segmentors' Adam decays from ``segmentor_lr`` within each of the
    method's phases (MKD's warm start and distillation, finetune's assistant and target) and restarts."""
    schedule = {"epochs": 3, "steps_per_epoch": 10, "mkd_pretrain": 0.4, "finetune_switch": 0.3}
    config = load_config(
        overrides=tiny_runs.tiny_overrides(method=method, schedule=schedule, optimizer={"lr_schedule": "cosine"})
    )
    optimizer = build_method(config, 8).segmentor_optimizer
    assert optimizer.use_ema  # the average is kept as with a constant rate
    rates = {}
    for step in range(30):
        optimizer.iterations.assign(step)
        rates[step] = float(optimizer.learning_rate)
    ends = phase_starts[1:] + [30]
    for start, end in zip(phase_starts, ends):
        assert rates[start] == pytest.approx(1e-3)
        assert all(rates[t] > rates[t + 1] for t in range(start, end - 1))  # decays within the phase
        assert rates[end - 1] < 0.05e-3

    constant = load_config(overrides=tiny_runs.tiny_overrides(method=method, schedule=schedule))
    optimizer = build_method(constant, 8).segmentor_optimizer
    optimizer.iterations.assign(25)
    assert float(optimizer.learning_rate) == pytest.approx(1e-3)


def test_finetune_trains_on_the_assistant_then_on_the_target():
    """Compiled step: the stream is picked from the step counter at run time, not at trace time."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def stream(offset, only_background=False):
        labels = rng.integers(0, 3, (2, 16, 16)).astype(np.int32) * (not only_background)
        images = (labels[..., None] + offset + rng.normal(0, 0.1, (2, 16, 16, 1))).astype(np.float32)
        return {"image": tf.constant(images), "label": tf.constant(labels), "has_label": tf.ones(2)}

    # The two labelled streams must give clearly different losses on an untrained U-Net, whose softmax is
    # near uniform (cross-entropy ~ln 3 for any labels): an all-background assistant batch against a
    # three-class target batch differs in its soft Dice by 0.07-0.80 over init seeds 0-9, where two
    # random-label batches differed by 0.0005 in one order of the suite (the test was order-dependent).
    batch = {"assistant": stream(-3.0, only_background=True), "target": stream(0.0), "target_labelled": stream(5.0)}
    # A zero learning rate keeps the weights, so each stream's loss is the same at every step.
    model = FinetuneModel(3, 2, {"base_filters": 4, "depth": 1}, keras.optimizers.SGD(0.0), switch_step=2)
    model.build_for((16, 16, 1))
    model.build_optimizers()

    def loss_on(stream_name):
        logits = model.segmentor(batch[stream_name]["image"], training=True)
        per_example = losses.segmentation_loss(batch[stream_name]["label"], tf.nn.softmax(logits))
        return float(tf.reduce_mean(per_example))

    on_assistant, on_target = loss_on("assistant"), loss_on("target_labelled")
    assert abs(on_assistant - on_target) > 0.05
    step = tf.function(model.train_step)
    reported = [float(step(batch)["seg"]) for _ in range(4)]
    assert reported == pytest.approx([on_assistant, on_assistant, on_target, on_target], rel=1e-5)


# --- the compiled main run ---------------------------------------------------------------------------


def test_main_run_validation_dice_best_epoch_and_tensorboard(tmp_path_factory, cache_path):
    run = tiny_runs.main_mkd_run(tmp_path_factory)
    history = history_of(run.path)
    cache = SliceCache(cache_path)
    images, labels = validation_images(cache)

    # Validation Dice of the last epoch, recomputed independently from the in-memory model's averaged weights.
    for predictor in MKD_PREDICTORS:
        with run.model.averaged_weights():
            predicted = np.argmax(run.model.predict_probabilities(images, predictor).numpy(), axis=-1)
        expected = []
        for c in range(1, cache.num_classes):
            total = (predicted == c).sum() + (labels == c).sum()
            expected.append(2.0 * ((predicted == c) & (labels == c)).sum() / total if total else 1.0)
        assert history["epochs"][-1]["val_dice"][predictor] == pytest.approx(expected, abs=1e-9)
    scores = [e["val_dice_mean"] for e in history["epochs"]]
    assert scores[-1] == pytest.approx(np.mean(history["epochs"][-1]["val_dice"]["ensemble"]))
    assert history["best"] == {"epoch": int(np.argmax(scores)) + 1, "score": max(scores), "predictor": "ensemble"}

    # TensorBoard: every loss term per epoch, equal to the history's epoch means.
    logged = {}
    for event_file in (run.path / "logs" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                if value.tag.startswith("loss/"):
                    logged[(value.tag[5:], event.step)] = float(tf.make_ndarray(value.tensor))
    steps = load_config(run.path / "config.yaml")["schedule"]["steps_per_epoch"]
    for record in history["epochs"]:
        for name, value in record["losses"].items():
            assert logged[(name, record["epoch"] * steps)] == pytest.approx(value, rel=1e-6)
    validation = list((run.path / "logs" / "validation").glob("events.out.tfevents.*"))
    assert validation and validation[0].stat().st_size > 0


def test_select_by_ranks_epochs_by_that_predictor(tmp_path, cache_path):
    """The IAM-only variant selects its checkpoint by S_syn's validation Dice, not by the ensemble."""
    from mkd_tf.registry import variant_overrides

    overrides = tiny_runs.deep_update(
        variant_overrides("iam-only"),
        tiny_runs.tiny_overrides(method="mkd", schedule={"epochs": 3, "steps_per_epoch": 1}),
    )
    assert overrides["schedule"]["select_by"] == "syn" and overrides["method"] == "mkd"
    with tiny_runs.eager():
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
    history = history_of(tmp_path / "run")
    scores = [float(np.mean(e["val_dice"]["syn"])) for e in history["epochs"]]
    assert [e["val_dice_mean"] for e in history["epochs"]] == pytest.approx(scores, abs=1e-12)
    assert history["best"] == {"epoch": int(np.argmax(scores)) + 1, "score": max(scores), "predictor": "syn"}


def test_without_validation_data_the_last_epoch_is_best(tmp_path, tmp_path_factory):
    """A cache with no target val split: no Dice to rank by, so best/ follows the latest epoch."""
    from mkd_tf.data.prepare import PrepareOptions, prepare_cache
    from mkd_tf.data.preprocess import PreprocessConfig

    phantom, _ = tiny_runs.tiny_cache(tmp_path_factory)
    cache = prepare_cache(
        phantom / "ct_train",
        phantom / "mr_train",
        tmp_path / "cache",
        PrepareOptions(split=(2, 0, 1), preprocess=PreprocessConfig(spacing=tiny_runs.SPACING, size=tiny_runs.SIZE)),
    )
    assert SliceCache(cache).volumes("target", "val") == []
    config = tiny_runs.write_yaml(
        tmp_path / "tiny.yaml",
        tiny_runs.tiny_overrides(method="target-only", schedule={"epochs": 2, "steps_per_epoch": 1}),
    )
    with tiny_runs.capture_models() as built, tiny_runs.eager():
        outcome = CliRunner().invoke(
            cli,
            ["train", str(cache), "--out", str(tmp_path / "run"), "--config", str(config), "--quiet"],
            catch_exceptions=False,
        )
    assert outcome.exit_code == 0, outcome.output
    assert outcome.output.splitlines()[0] == f"run: {tmp_path / 'run'}"  # no validation Dice claimed
    history = history_of(tmp_path / "run")
    assert history["best"]["epoch"] == 2 and history["best"]["score"] < 0
    assert all(e["val_dice"] is None and "val_dice_mean" not in e for e in history["epochs"])
    best, _, _ = load_run(tmp_path / "run", "best")
    images = np.asarray(SliceCache(cache).images("target")[:4])[..., None]
    with built[-1].averaged_weights():
        expected = built[-1].predict_probabilities(images, "real").numpy()
    np.testing.assert_allclose(best.predict_probabilities(images, "real").numpy(), expected, atol=1e-6)


# --- reproducibility ---------------------------------------------------------------------------------


def assert_two_tiny_mkd_trainings_agree(root, cache_path, eager, schedule=None, **settings):
    """Train one tiny MKD run twice (by default one warm-start step, then one distillation step) and check that
    both trainings log the same losses and validation Dice to the last bit and end with the same weights."""
    schedule = schedule or {"epochs": 1, "steps_per_epoch": 2, "mkd_pretrain": 0.5}
    overrides = tiny_runs.tiny_overrides(method="mkd", schedule=schedule, **settings)
    logged, weights = [], []
    for name in ("first", "second"):
        with tiny_runs.capture_models() as built, tiny_runs.eager(eager):
            train(cache_path, root / name, overrides=overrides, verbose=0)
        logged.append([{key: e[key] for key in ("losses", "val_dice")} for e in history_of(root / name)["epochs"]])
        weights.append([variable.numpy() for variable in built[-1].weights])
    assert logged[-1][-1]["losses"]["kd_r2s"] > 0 and logged[-1][-1]["losses"]["kd_s2r"] > 0  # distillation ran
    assert logged[0] == logged[1]
    assert len(weights[0]) == len(weights[1]) > 0
    for first, second in zip(*weights):
        np.testing.assert_array_equal(first, second)


def test_an_eager_mkd_training_is_bit_reproducible(tmp_path, cache_path):
    """Two eager trainings of one tiny MKD run, through the warm start and into mutual distillation, log the
    same losses and validation Dice to the last bit and end with the same weights (conftest enables op
    determinism). Compiled trainings do not always: their distillation steps differ now and then in the
    seventh digit (`benchmarks/determinism.py`, README "How much of a margin is the machine")."""
    assert_two_tiny_mkd_trainings_agree(tmp_path, cache_path, eager=True)


def test_a_deterministic_compiled_mkd_training_is_bit_reproducible(tmp_path, cache_path):
    """``deterministic: true`` (``mkd train --deterministic``): the compiled step, as `mkd` runs it, gives the
    same losses, validation Dice and weights in two trainings; without it the same pair differed on its first
    trial, and 3 of 4 such runs differ from the first in `benchmarks/determinism.py`. The differences were in
    the distillation step, so the trainings here are two distillation steps (no warm start: one graph to
    build per training instead of two). Grappler's rewrites are restored afterwards."""
    schedule = {"epochs": 1, "steps_per_epoch": 2, "mkd_pretrain": 0.0}
    assert_two_tiny_mkd_trainings_agree(tmp_path, cache_path, eager=False, schedule=schedule, deterministic=True)
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)


# --- moving averages in older run folders --------------------------------------------------------------


def test_a_run_whose_optimizer_kept_the_moving_averages_loads_and_resumes(tmp_path, cache_path, monkeypatch, capsys):
    """Run folders from before the model kept the ``use_ema`` averages hold them as Keras' optimizer kept
    them. Such a checkpoint (written from a model whose optimizer keeps its own averages, as every run was
    trained then) restores every value, evaluates with those averages, and resumes."""
    overrides = tiny_runs.tiny_overrides(
        method="target-only", schedule={"epochs": 2, "steps_per_epoch": 2}, optimizer={"ema_momentum": 0.5}
    )
    run = tmp_path / "run"
    saved = tf.train.CheckpointManager.save

    def save_then_die(self, *args, **kwargs):
        path = saved(self, *args, **kwargs)
        if kwargs.get("checkpoint_number") == 1:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_then_die)
    with tiny_runs.eager(), pytest.raises(KeyboardInterrupt):
        train(cache_path, run, overrides=overrides, verbose=0)
    monkeypatch.undo()

    # The model of the code before: its optimizers built directly, so Keras keeps the averages inside them.
    config, cache = load_config(run / "config.yaml", recorded=True), SliceCache(cache_path)
    old = build_method(config, cache.num_classes)
    old.build_for((cache.size, cache.size, 1))
    for optimizer, variables in old.optimizers().values():
        optimizer.build(variables)
    assert not old.weight_averages
    checkpoint = tf.train.Checkpoint(**checkpoints.training_state(old, tf.Variable(0, dtype=tf.int64)))
    checkpoint.restore(tf.train.latest_checkpoint(str(run / "checkpoints"))).assert_consumed()  # one layout
    old.train_step(next(iter(training.training_streams(cache, config, epoch=1))))  # moves weights and averages
    tf.train.CheckpointManager(checkpoint, run / "checkpoints", max_to_keep=1).save(checkpoint_number=1)
    optimizer, variables = old.optimizers()["segmentors"]
    raw = [v.numpy() for v in variables]
    optimizer.finalize_variable_values(variables)  # Keras' public way to read its averages: into the weights
    averaged = [v.numpy() for v in variables]
    assert max(float(np.abs(a - r).max()) for a, r in zip(averaged, raw)) > 1e-5

    loaded, _, _ = load_run(run, "last")  # the raw weights and the averages, the averages swapped in
    for variable, expected in zip(loaded.optimizers()["segmentors"][1], averaged):
        np.testing.assert_array_equal(variable.numpy(), expected)
    with tiny_runs.eager():
        train(cache_path, run, overrides=overrides, verbose=1)
    assert f"resuming {run} after epoch 1" in capsys.readouterr().out
    assert [e["epoch"] for e in history_of(run)["epochs"]] == [1, 2]


def test_mixed_precision_keeps_every_networks_output_in_float32():
    """``float32_outputs`` reaches every network of MKD through the public ``Model.layers`` (the model, its two
    segmentors, the IAM, its two generators and two discriminators): each one and its output layer run in
    float32, the layers inside in the policy's 16-bit type."""
    import keras

    config = load_config(overrides=tiny_runs.tiny_overrides(method="mkd", precision="mixed_bfloat16"))
    with training.precision_policy("mixed_bfloat16"):
        model = build_method(config, 4)
        training.float32_outputs(model)
    networks = list(training.nested_models(model))
    assert len({id(network) for network in networks}) == len(networks) == 8
    assert sorted(type(network).__name__ for network in networks) == [
        "ImageAlignmentModule",
        "MKDModel",
        "PatchDiscriminator",
        "PatchDiscriminator",
        "ResnetGenerator",
        "ResnetGenerator",
        "Segmentor",
        "Segmentor",
    ]
    for network in networks:
        assert network.dtype_policy.name == "float32", network.name
        head = getattr(network, "output_layer_name", None)
        if head:
            assert getattr(network, head).dtype_policy.name == "float32", network.name
            inner = [layer for layer in network.layers if layer.name != getattr(network, head).name]
            assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in inner), network.name
    assert keras.mixed_precision.global_policy().name == "float32"
