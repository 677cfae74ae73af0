"""`mkd train` on hostile input: wrong config types and ranges, outputs that cannot be written, and what
a killed run leaves behind. Each bad input is one line, exit status 2, and nothing written."""

from pathlib import Path

import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf import training
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

    monkeypatch.setattr(training, "validation_dice", rising_dice)
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
    optimizer, variables = model.optimizers()["segmentors"]
    averages = [a.numpy() for a in optimizer._model_variables_moving_average]
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
