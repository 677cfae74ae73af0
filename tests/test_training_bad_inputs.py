"""`mkd train` on hostile input: wrong config types and ranges, outputs that cannot be written, and what
a killed run leaves behind. Each bad input is one line, exit status 2, and nothing written."""

from pathlib import Path

import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf import trainer, training
from mkd_tf.training import load_run, train
from tests.scripts import tiny_runs


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return tiny_runs.tiny_cache(tmp_path_factory)[1]


def one_line_error(outcome):
    assert outcome.exit_code == 2, outcome.output
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    return lines[0]


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"schedule": {"epochs": "ten"}}, "setting 'schedule.epochs' must be a whole number, got 'ten'"),
        ({"schedule": {"epochs": 0}}, "setting 'schedule.epochs' must be in [1, inf], got 0"),
        ({"loss": {"temperature": "hot"}}, "setting 'loss.temperature' must be a finite number, got 'hot'"),
        ({"segmentor": {"base_filters": -4}}, "setting 'segmentor.base_filters' must be in [1, inf], got -4"),
        ({"data": {"augment": "yes"}}, "setting 'data.augment' must be true or false, got 'yes'"),
        ({"schedule": {"mkd_pretrain": 1.0}}, "setting 'schedule.mkd_pretrain' must be in [0.0, 1.0), got 1.0"),
        ({"optimizer": {"segmentor_lr": 0}}, "setting 'optimizer.segmentor_lr' must be in (0.0, inf], got 0"),
        (
            {"segmentor": {"norm": "layer"}},
            "setting 'segmentor.norm' must be one of batch, instance, none, got 'layer'",
        ),
    ],
)
def test_config_of_the_wrong_type_or_range_is_one_line_and_writes_nothing(tmp_path, cache_path, settings, problem):
    config = tiny_runs.write_yaml(tmp_path / "cfg.yaml", settings)
    run = tmp_path / "run"
    outcome = CliRunner().invoke(cli, ["train", str(cache_path), "--out", str(run), "--config", str(config), "--quiet"])
    assert one_line_error(outcome) == f"error: {config}: {problem}"
    assert not run.exists()


def test_networks_that_do_not_fit_the_slices_fail_before_writing(tmp_path, cache_path):
    run = tmp_path / "run"
    outcome = CliRunner().invoke(
        cli, ["train", str(cache_path), "--out", str(run), "--depth", "7", "--base-filters", "2", "--quiet"]
    )
    assert "do not fit 32x32 slices" in one_line_error(outcome)
    assert not run.exists()  # the corrected command can use the same --out


def test_out_below_a_regular_file_is_one_line(tmp_path, cache_path):
    (tmp_path / "notes.txt").write_text("mine")
    outcome = CliRunner().invoke(cli, ["train", str(cache_path), "--out", str(tmp_path / "notes.txt" / "run")])
    assert (
        one_line_error(outcome) == f"error: {tmp_path / 'notes.txt' / 'run'}: cannot create the run folder: "
        f"{tmp_path / 'notes.txt'} is a file, not a folder"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_run_resumes_under_another_strategy(tmp_path, cache_path):
    """The strategy says how to run, not what to learn: resume compares only the learning settings."""
    overrides = tiny_runs.tiny_overrides(method="target-only")
    with tiny_runs.eager():
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
        train(cache_path, tmp_path / "run", overrides={**overrides, "strategy": "default"}, verbose=0)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["strategy"] == "default"


def test_a_kill_between_the_renames_of_best_keeps_a_best_checkpoint(tmp_path, cache_path, monkeypatch):
    """Killed after `best/` was retired and before the new one took its place: the run still loads,
    and the next run restores `best/` and removes every staging folder a kill can leave."""
    overrides = tiny_runs.tiny_overrides(method="target-only", schedule={"epochs": 2, "steps_per_epoch": 1})
    run = tmp_path / "run"
    replace = training.os.replace

    def die_before_the_second_rename(source, destination):
        if Path(source).name == ".best.tmp" and (run / ".best.old").exists():
            raise KeyboardInterrupt("killed")
        return replace(source, destination)

    scores = iter([0.1, 0.1, 0.9, 0.9])  # validation, test of epoch 1; of epoch 2: epoch 2 is better

    def rising_dice(model, *args, **kwargs):
        return {name: [next(scores)] * 7 for name in model.predictor_names()}

    monkeypatch.setattr(trainer, "validation_dice", rising_dice)
    monkeypatch.setattr(training.os, "replace", die_before_the_second_rename)
    with tiny_runs.eager(), pytest.raises(KeyboardInterrupt):
        train(cache_path, run, overrides=overrides, verbose=0)
    monkeypatch.setattr(training.os, "replace", replace)
    assert not (run / "best").exists() and (run / ".best.old").is_dir() and (run / ".best.tmp").is_dir()
    load_run(run)  # reads the retired best checkpoint
    (run / "checkpoints" / "ckpt-9_temp").mkdir()  # what a kill inside CheckpointManager.save leaves
    monkeypatch.undo()
    with tiny_runs.eager():
        train(cache_path, run, overrides=overrides, verbose=0)
    assert (run / "best" / "weights.index").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".best")]
    assert not list((run / "checkpoints").glob("*_temp"))


def test_evaluation_and_best_use_the_averaged_weights_and_resume_keeps_the_raw_ones(tmp_path, cache_path):
    overrides = tiny_runs.tiny_overrides(
        method="target-only", schedule={"epochs": 1, "steps_per_epoch": 3}, optimizer={"ema_momentum": 0.5}
    )
    with tiny_runs.eager(), tiny_runs.capture_models() as built:
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
    model = built[-1]
    _, variables = model.optimizers()["segmentors"]
    averages = [average.numpy() for _, average in model.weight_averages["segmentors"].pairs()]
    raw = [v.numpy() for v in variables]
    assert max(float(abs(a - r).max()) for a, r in zip(averages, raw)) > 1e-4  # they differ after 3 steps
    best, _, _ = load_run(tmp_path / "run")
    for expected, variable in zip(averages, best.optimizers()["segmentors"][1]):
        assert (variable.numpy() == expected).all()
    last, _, _ = load_run(tmp_path / "run", which="last")  # the averages too, from the resume checkpoint
    for expected, variable in zip(averages, last.optimizers()["segmentors"][1]):
        assert (variable.numpy() == expected).all()
    with model.averaged_weights():
        assert all((v.numpy() == a).all() for v, a in zip(variables, averages))
    assert all((v.numpy() == r).all() for v, r in zip(variables, raw))  # raw values back for training


def test_mkd_warm_start_trains_both_segmentors_on_the_assistant_first(tmp_path, cache_path):
    overrides = tiny_runs.tiny_overrides(schedule={"epochs": 2, "steps_per_epoch": 2, "mkd_pretrain": 0.5})
    with tiny_runs.eager(), tiny_runs.capture_models() as built:
        train(cache_path, tmp_path / "run", overrides=overrides, verbose=0)
    assert built[-1].pretrain_steps == 2
    epochs = tiny_runs_history(tmp_path / "run")
    iam_terms = {"adversarial", "cycle", "structure", "discriminator"}
    assert set(epochs[0]["losses"]) == {"seg_syn", "seg_real", "total"} | iam_terms
    assert {"kd_s2r", "kd_r2s"} <= set(epochs[1]["losses"])
    assert tf.reduce_all(tf.equal(built[-1].step_counter, 4))


def tiny_runs_history(run):
    import json

    return json.loads((Path(run) / "history.json").read_text())["epochs"]


def _invoke_train(cache, run, *options):
    settings = tiny_runs.tiny_overrides(method="target-only", schedule={"epochs": 1, "steps_per_epoch": 1})
    config = tiny_runs.write_yaml(Path(run).parent / "tiny.yaml", settings)
    with tiny_runs.eager():
        return CliRunner().invoke(
            cli, ["train", str(cache), "--out", str(run), "--config", str(config), "--quiet", *options]
        )


def _tree(folder):
    """Every path under ``folder`` with the bytes of each file (symbolic links as their target)."""
    return {
        str(p.relative_to(folder)): (str(p.readlink()) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
        for p in sorted(Path(folder).rglob("*"))
    }


@pytest.mark.parametrize(
    "files, problem",
    [
        ({"best/cat.jpg": b"meow", "cache.json": b"{}"}, "its cache.json is not a run's record of its slice cache"),
        ({"best/cat.jpg": b"meow"}, "it holds best but no config.yaml"),
        ({"config.yaml": b"method: mkd\n"}, "it holds config.yaml but no cache.json"),
        ({"notes.txt": b"mine"}, "it holds notes.txt but no config.yaml"),
    ],
)
def test_train_refuses_a_folder_that_is_not_a_run_and_touches_nothing(tmp_path, cache_path, files, problem):
    run = tmp_path / "mine"
    for name, content in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(content)
    before = _tree(run)
    outcome = _invoke_train(cache_path, run)
    assert one_line_error(outcome) == f"error: {run}: not a run folder of mkd train ({problem}); choose another --out"
    assert _tree(run) == before


def test_train_refuses_a_run_folder_in_use_and_a_killed_holder_does_not_block(tmp_path, cache_path):
    import os
    import signal
    import subprocess
    import sys

    from mkd_tf.files import lock_folder

    run = tmp_path / "run"
    run.mkdir()
    descriptor = lock_folder(run)  # what a running `mkd train` of this folder holds
    try:
        outcome = _invoke_train(cache_path, run)
    finally:
        os.close(descriptor)
    assert one_line_error(outcome) == (
        f"error: {run}: another mkd train is using this run folder (pid {os.getpid()}); "
        "wait for it to finish or use another --out"
    )
    assert not list(run.iterdir())
    # A holder killed with -9 leaves no stale lock: the kernel releases a flock with its process.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from mkd_tf.files import lock_folder; d = lock_folder({str(run)!r}); print(d, flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() != "None"
    assert "(pid " + str(holder.pid) + ")" in one_line_error(_invoke_train(cache_path, run))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    outcome = _invoke_train(cache_path, run)
    assert outcome.exit_code == 0, outcome.output
    assert (run / "best" / "weights.index").exists()


def test_a_run_that_diverged_before_its_first_checkpoint_restarts_with_another_config(
    tmp_path, cache_path, monkeypatch
):
    run = tmp_path / "run"

    def diverge(logs, epoch, step):
        raise training.MkdError(f"training diverged: loss 'total' is nan at epoch {epoch + 1}, step {step + 1}")

    monkeypatch.setattr(trainer, "check_finite", diverge)
    assert "training diverged" in one_line_error(_invoke_train(cache_path, run, "--seed", "1"))
    assert sorted(p.name for p in run.iterdir()) == ["cache.json", "config.yaml"]
    monkeypatch.undo()
    outcome = _invoke_train(cache_path, run, "--seed", "2")  # the corrected command, same --out
    assert outcome.exit_code == 0, outcome.output
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 2
    # Once a checkpoint exists the run is resumable: another config is refused, the run untouched.
    before = _tree(run)
    assert "holds a run with a different config (differs in: seed)" in one_line_error(
        _invoke_train(cache_path, run, "--seed", "3")
    )
    assert _tree(run) == before


def test_resuming_from_a_truncated_checkpoint_or_a_planted_link_is_one_line(tmp_path, cache_path):
    run = tmp_path / "run"
    assert _invoke_train(cache_path, run).exit_code == 0
    # A link named like TensorFlow's staging folder of a checkpoint: never followed into a deletion.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("mine")
    (run / "checkpoints" / "ckpt-9_temp").symlink_to(precious, target_is_directory=True)
    assert one_line_error(_invoke_train(cache_path, run)) == (
        f"error: {run}: not a run folder of mkd train (it holds checkpoints/ckpt-9_temp, which a run folder "
        "does not); choose another --out"
    )
    assert (precious / "data.txt").read_text() == "mine"
    (run / "checkpoints" / "ckpt-9_temp").unlink()
    (data,) = (run / "checkpoints").glob("ckpt-1.data-*")
    data.write_bytes(data.read_bytes()[:100])
    line = one_line_error(_invoke_train(cache_path, run))
    assert line.startswith(
        f"error: {data}: cannot read the checkpoint to resume from: truncated or corrupt weights file"
    )


def test_a_cache_without_target_training_slices_is_refused_before_anything_is_written(tmp_path, cache_path):
    from mkd_tf.data.prepare import PrepareOptions, prepare_cache
    from mkd_tf.data.preprocess import PreprocessConfig

    split = tmp_path / "split.json"
    split.write_text('{"target": {"val": ["ct_train_1001"], "test": ["ct_train_1002", "ct_train_1003"]}}')
    phantom = Path(cache_path).parent / "phantom"
    options = PrepareOptions(
        split_file=str(split), preprocess=PreprocessConfig(spacing=tiny_runs.SPACING, size=tiny_runs.SIZE)
    )
    no_target_training = prepare_cache(phantom / "ct_train", phantom / "mr_train", tmp_path / "cache", options)
    run = tmp_path / "run"
    for labelled in ("1", "0"):  # the unsupervised setting needs target training slices too
        outcome = _invoke_train(no_target_training, run, "--method", "mkd", "--target-labelled", labelled)
        assert one_line_error(outcome) == (
            f"error: {no_target_training}: has no target slices in the train split; training needs them "
            "(prepare another split)"
        )
        assert not run.exists()


def test_unsupervised_training_without_target_labels_still_runs(tmp_path, cache_path):
    run = tmp_path / "run"
    outcome = _invoke_train(cache_path, run, "--method", "mkd", "--target-labelled", "0")
    assert outcome.exit_code == 0, outcome.output
    assert (run / "best" / "weights.index").exists()


def test_a_run_folder_may_hold_other_files_training_never_touches(tmp_path, cache_path):
    """metrics.* of `mkd evaluate RUN` (written into the run by default) or a user's notes do not make a
    run foreign: training never writes, replaces or deletes those names."""
    run = tmp_path / "run"
    assert _invoke_train(cache_path, run).exit_code == 0
    (run / "metrics.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    outcome = _invoke_train(cache_path, run)  # the finished run, as `mkd compare` calls it again
    assert outcome.exit_code == 0, outcome.output
    assert (run / "notes.txt").read_text() == "mine"
    (run / "best" / "cat.jpg").write_text("meow")  # inside best/, which a better epoch replaces as a whole
    assert "it holds best/cat.jpg, which a run folder does not" in one_line_error(_invoke_train(cache_path, run))
    assert (run / "best" / "cat.jpg").read_text() == "meow"
