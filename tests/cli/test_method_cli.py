"""The method commands of the `mkd` CLI: help texts, one-line errors, `mkd compare`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf import compare
from mkd_tf.config import DEFAULTS, load_config, save_config
from tests.scripts import tiny_runs

MKD_EXECUTABLE = Path(sys.executable).with_name("mkd")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# `mkd train` option -> the config entry whose default its help must state.
CONFIG_DEFAULTS = {
    "--method": ("method",),
    "--epochs": ("schedule", "epochs"),
    "--steps-per-epoch": ("schedule", "steps_per_epoch"),
    "--batch-size": ("data", "batch_size"),
    "--strategy": ("strategy",),
    "--seed": ("seed",),
    "--base-filters": ("segmentor", "base_filters"),
    "--depth": ("segmentor", "depth"),
    "--precision": ("precision",),
    "--jit-compile": ("jit_compile",),
    "--deterministic": ("deterministic",),
    "--checkpoint-every": ("checkpoint_every",),
    "--worker-timeout": ("worker_timeout",),
}
FLAGS = ["--no-augment", "--no-iam", "--no-kd-s2r", "--no-kd-r2s", "--quiet"]


def help_entries(command):
    """Option name -> its help entry with the line wrapping undone."""
    outcome = CliRunner().invoke(cli, [command, "--help"])
    assert outcome.exit_code == 0
    options = outcome.output.split("Options:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", "\n" + options)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


def test_train_help_lists_every_option_with_its_default():
    entries = help_entries("train")
    command = cli.commands["train"]
    # an option's first name heads its help entry (an old spelling follows it, e.g. --target-labeled)
    declared = {param.opts[0] for param in command.params if param.opts[0].startswith("--")}
    assert declared <= set(entries) | {"--help"}
    assert set(entries) == declared | {"-h"}
    for option, keys in CONFIG_DEFAULTS.items():
        value = DEFAULTS
        for key in keys:
            value = value[key]
        assert f"[config default: {value}]" in entries[option], entries[option]
    assert "[default: all]" in entries["--target-labelled"]
    assert entries["--target-labelled"].startswith("--target-labelled, --target-labeled ")
    assert "[required]" in entries["--out"]
    # Everything else is a flag (off unless given) or the optional --config file.
    remaining = set(entries) - set(CONFIG_DEFAULTS) - {"--target-labelled", "--out", "--config", "-h"}
    assert remaining == set(FLAGS)
    for flag in FLAGS:
        parameter = next(p for p in command.params if flag in p.opts)
        assert parameter.is_flag


def test_other_method_commands_show_their_defaults():
    assert "[default: test]" in help_entries("evaluate")["--split"]
    assert "[default: best]" in help_entries("evaluate")["--checkpoint"]
    assert "[default: ensemble]" in help_entries("predict")["--which"]
    compare = help_entries("compare")
    methods = compare["--methods"].replace("target- only", "target-only")  # undo click's wrapping at a hyphen
    assert "[default: target-only,joint,finetune,ummkd,mkd]" in methods
    assert "[default: 3; x>=1]" in compare["--seeds"]


def test_a_bad_cache_path_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")  # even with TensorFlow's own logging left on
    done = subprocess.run(
        [str(MKD_EXECUTABLE), "train", str(tmp_path / "no-cache"), "--out", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'no-cache'}: slice cache not found\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--checkpoint-every", "nan", "--checkpoint-every: expected a finite number, got 'nan'"),
        ("--depth", "9", "--depth: setting 'segmentor.depth' must be in [1, 8], got 9"),
    ],
)
def test_a_bad_flag_value_is_blamed_on_the_flag_not_the_config_file(tmp_path_factory, tmp_path, flag, value, message):
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.TINY)
    run = tmp_path / "run"
    arguments = ["train", str(cache), "--out", str(run), "--config", str(config), flag, value, "--quiet"]
    outcome = CliRunner().invoke(cli, arguments)
    assert (outcome.exit_code, outcome.stderr) == (2, f"error: {message}\n"), outcome.output
    assert not run.exists()


def test_a_network_too_large_for_memory_is_one_line_and_writes_no_run(tmp_path_factory, tmp_path):
    """TensorFlow's OOM (3x3x200000x200000 kernels, 1.4 TiB) becomes one line and exit 2, no run folder."""
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)
    config = tiny_runs.write_yaml(tmp_path / "huge.yaml", {"segmentor": {"base_filters": 200000, "depth": 2}})
    result = CliRunner().invoke(
        cli, ["train", str(cache), "--out", str(tmp_path / "run"), "--config", str(config), "--method", "target-only"]
    )
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: out of memory: OOM when allocating tensor with shape[3,3,200000,200000]")
    assert "function_node" not in result.stderr and "use a smaller --size" in result.stderr
    assert not (tmp_path / "run").exists()


def test_compare_two_methods_one_seed_from_a_chosen_first_seed(tmp_path_factory, tmp_path):
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.TINY)
    out = tmp_path / "comparison"
    with tiny_runs.eager():
        outcome = CliRunner().invoke(
            cli,
            [
                "compare",
                str(cache),
                "--methods",
                "target-only,assistant-only",
                "--seeds",
                "1",
                "--first-seed",
                "1",
                "--out",
                str(out),
                "--config",
                str(config),
                "--quiet",
            ],
            catch_exceptions=False,
        )
    assert outcome.exit_code == 0, outcome.output
    assert f"wrote {out / 'comparison.md'} and {out / 'comparison.png'}" in outcome.output

    table = (out / "comparison.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| method | myocardium Dice |")
    assert lines[0].endswith("| mean Dice | ASSD (mm) | HD95 (mm) |")
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["target-only", "assistant-only"]
    assert "mean ± std over 1 seed(s) of the mean over target test volumes" in table

    data = json.loads((out / "comparison.json").read_text())
    assert list(data) == ["target-only", "assistant-only"]
    for method in data:
        assert sorted(p.name for p in (out / method).iterdir()) == ["seed1"]  # seed 1 only
        assert load_config(out / method / "seed1" / "config.yaml")["seed"] == 1
        metrics = json.loads((out / method / "seed1" / "metrics.json").read_text())
        summary = metrics["summary"][list(metrics["summary"])[-1]]
        for key, entry in data[method].items():
            structure, metric = key.split("/")
            assert entry["seeds"] == [pytest.approx(summary[structure][metric]["mean"])]
            assert entry["std"] == 0.0
        dice = data[method]["overall/dice"]["mean"]
        assert f"| {method} |" in table and f"{100 * dice:.1f} ± 0.0" in table
    assert (out / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    steps, validation, test = compare.learning_curve(out / "target-only" / "seed1")
    assert steps.tolist() == [2] and 0.0 <= validation[0] <= 1.0 and 0.0 <= test[0] <= 1.0
    assert "paired differences" not in table  # no MKD entry to compare against


def test_paired_differences_are_per_seed_and_signed():
    def row(*seeds):
        return {"overall/dice": {"seeds": list(seeds)}}

    data = {"finetune": row(0.80, 0.70), "mkd": row(0.85, 0.69), "mkd [syn]": row(0.5, 0.5)}
    text, values = compare._paired_differences(data)
    assert values["finetune"]["seeds"] == pytest.approx([5.0, -1.0])
    assert values["finetune"]["mean"] == pytest.approx(2.0) and values["finetune"]["std"] == pytest.approx(3.0)
    assert "| finetune | +5.0, -1.0 | +2.0 ± 3.0 |" in text
    assert "| mkd [syn] | +35.0, +19.0 | +27.0 ± 8.0 |" in text


def test_learning_curves_of_more_than_ten_methods_stay_distinguishable(tmp_path, monkeypatch):
    runs = {}
    for number in range(12):
        run = tmp_path / f"method{number}" / "seed0"
        run.mkdir(parents=True)
        save_config(load_config(overrides={"schedule": {"steps_per_epoch": 5}}), run / "config.yaml")
        epochs = [
            {
                "epoch": e,
                "losses": {"seg": 1.0},
                "steps_per_second": 10.0,
                "val_dice": {"ensemble": [0.1 * e]},
                "test_dice": {"ensemble": [0.1]},
            }
            for e in (1, 2)
        ]
        (run / "history.json").write_text(json.dumps({"epochs": epochs, "best": None}))
        runs[f"method{number}"] = [run]
    drawn = {}

    def keep_lines(figure, path):
        drawn.update({line.get_label(): (line.get_color(), line.get_linestyle()) for line in figure.axes[0].lines})

    monkeypatch.setattr(compare, "_save_figure", keep_lines)
    compare._learning_curves(runs, tmp_path / "curves.png")
    assert len(drawn) == 12 and len(set(drawn.values())) == 12  # the colour cycle has only 10 colours
    assert drawn["method10 (1 seeds)"][1] == "--"


def test_compare_rejects_an_unknown_method_before_training_anything(tmp_path_factory, tmp_path):
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.TINY)  # bounds the cost if it did train
    with tiny_runs.eager():
        outcome = CliRunner().invoke(
            cli,
            [
                "compare",
                str(cache),
                "--methods",
                "target-only,sifa",
                "--config",
                str(config),
                "--out",
                str(tmp_path / "c"),
                "--quiet",
            ],
        )
    assert outcome.exit_code == 2
    assert outcome.stderr.startswith("error: --methods: unknown method 'sifa' (choose from mkd, target-only,")
    assert outcome.stderr.count("\n") == 1
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["--methods", "mkd,finetune", "--target-labelled", "0"],
            (
                "{cache}: method 'finetune' needs labelled target training volumes; the cache (or --target-labelled) "
                "leaves none"
            ),
        ),
        (
            ["--methods", "mkd", "--target-labelled", "5"],
            "{cache}: --target-labelled 5 but the cache has 1 labelled target training volumes",
        ),
        (
            ["--methods", "mkd-no-iam,finetune", "--tune", "data.target_labelled=1,0"],
            (
                "--tune: value 0: method 'finetune' needs labelled target training volumes; the cache (or "
                "--target-labelled) leaves none"
            ),
        ),
        (["--methods", "target-only", "--tune", "segmentor.depth=2,9"], "--tune: value 9: setting 'segmentor.depth'"),
    ],
)
def test_compare_checks_every_method_and_value_against_the_cache_before_training(
    tmp_path_factory, tmp_path, monkeypatch, arguments, message
):
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)

    def must_not_train(*arguments, **keywords):
        raise AssertionError("compare trained before checking every method and value")

    monkeypatch.setattr(compare, "train", must_not_train)
    outcome = CliRunner().invoke(cli, ["compare", str(cache), "--out", str(tmp_path / "c"), "--quiet", *arguments])
    assert outcome.exit_code == 2, (outcome.output, outcome.exception)
    assert outcome.stderr.startswith(f"error: {message.format(cache=cache)}"), outcome.stderr
    assert outcome.stderr.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_compare_tunes_a_setting_per_method_and_reports_it_at_its_best_validation_value(tmp_path_factory, tmp_path):
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.TINY)
    out = tmp_path / "tuned"
    arguments = ["compare", str(cache), "--methods", "target-only", "--seeds", "1", "--out", str(out)]
    arguments += ["--tune", "optimizer.segmentor_lr=1e-3,5e-2", "--config", str(config), "--quiet"]
    with tiny_runs.eager():
        outcome = CliRunner().invoke(cli, arguments, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output

    runs = {value: out / "target-only" / f"segmentor_lr={value}" / "seed0" for value in ("1e-3", "5e-2")}
    assert sorted(p.name for p in (out / "target-only").iterdir()) == sorted(p.parent.name for p in runs.values())
    assert [load_config(run / "config.yaml")["optimizer"]["segmentor_lr"] for run in runs.values()] == [1e-3, 5e-2]
    validation = {value: float(np.nanmax(compare.learning_curve(run)[1])) for value, run in runs.items()}
    data = json.loads((out / "comparison.json").read_text())
    tuning = data["tuning"]["methods"]["target-only"]
    assert data["tuning"]["setting"] == "optimizer.segmentor_lr"
    assert {value: record["validation"] for value, record in tuning["values"].items()} == {
        value: [pytest.approx(dice)] for value, dice in validation.items()
    }
    chosen = tuning["chosen"]
    assert chosen == max(validation, key=validation.get)  # the first value on a tie
    metrics = json.loads((runs[chosen] / "metrics.json").read_text())
    test_dice = metrics["summary"]["real"]["overall"]["dice"]["mean"]
    assert data["target-only"]["overall/dice"]["seeds"] == [pytest.approx(test_dice)]
    assert tuning["values"][chosen]["test"] == [pytest.approx(test_dice)]
    table = (out / "comparison.md").read_text()
    assert "`optimizer.segmentor_lr` tuned per method" in table and "| method | 1e-3 | 5e-2 |" in table
    assert f"**{100 * validation[chosen]:.1f} ({100 * test_dice:.1f})**" in table
    assert (out / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_compare_reports_each_method_at_the_value_with_the_best_mean_validation_dice(tmp_path, monkeypatch):
    # validation Dice per (value, seed); the test result only carries which run it came from
    validation = {("1e-3", 0): 0.70, ("1e-3", 1): 0.74, ("4e-3", 0): 0.80, ("4e-3", 1): 0.66, ("2e-3", 0): 0.71}
    validation[("2e-3", 1)] = 0.75  # mean 0.73 beats 1e-3's 0.72 and 4e-3's 0.73 - 1e-9: no test Dice involved

    def fake_run(cache, run, config_path, name, seed, overrides, path, value, progress, verbose):
        written = run.parent.name.split("=")[1]
        test = {"overall": {"dice": {"mean": 0.5 + seed / 10}, "assd": {"mean": 1.0}, "hd95": {"mean": 2.0}}}
        result = {
            "main_predictor": "real",
            "summary": {"real": test},
            "cases": {"real": {"case": {"overall": {"dice": 0.5}}}},
        }
        return validation[(written, seed)] - (1e-9 if written == "4e-3" else 0.0), result, run

    monkeypatch.setattr(compare, "_train_and_evaluate", fake_run)
    monkeypatch.setattr(compare, "_learning_curves", lambda runs, path: None)
    monkeypatch.setattr(compare, "_box_plot", lambda rows, path: None)
    monkeypatch.setattr(compare, "load_config", lambda *arguments: None)
    monkeypatch.setattr(compare, "usable_target_volumes", lambda cache, config: [0])
    monkeypatch.setattr(
        compare, "SliceCache", lambda path, verify=True: type("Cache", (), {"volumes": lambda *a: [{"label": 1}]})
    )
    tune = compare.parse_tune("optimizer.segmentor_lr=1e-3,4e-3,2e-3")
    assert tune == (("optimizer", "segmentor_lr"), [("1e-3", 1e-3), ("4e-3", 4e-3), ("2e-3", 2e-3)])
    result = compare.compare_methods("cache", ["target-only"], 2, tmp_path, tune=tune)
    assert result["data"]["tuning"]["methods"]["target-only"]["chosen"] == "2e-3"
    assert "| target-only | 72.0 (55.0) | 73.0 (55.0) | **73.0 (55.0)** |" in result["table"]


@pytest.mark.parametrize(
    "tune, message",
    [
        ("optimizer.segmentor_lr=1e-3", "expected SETTING=VALUE,VALUE[,...] with two or more different values"),
        ("optimizer.segmentor_lr=1e-3,1e-3", "expected SETTING=VALUE,VALUE[,...] with two or more different values"),
        ("optimizer.segmentor_lr=1e-3,-1", "value -1: setting 'optimizer.segmentor_lr' must be"),
        ("optimizer.learning_rate=1e-3,2e-3", "value 1e-3: unknown setting 'learning_rate'"),
        ("seed=1,2", "'seed' is chosen by --methods / --seeds, not tuned"),
    ],
)
def test_compare_rejects_a_bad_tune_before_training_anything(tmp_path_factory, tmp_path, tune, message):
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)
    config = tiny_runs.write_yaml(tmp_path / "tiny.yaml", tiny_runs.TINY)
    arguments = ["compare", str(cache), "--methods", "target-only", "--out", str(tmp_path / "c"), "--tune", tune]
    outcome = CliRunner().invoke(cli, arguments + ["--config", str(config), "--quiet"])
    assert outcome.exit_code == 2, outcome.output
    assert outcome.stderr.startswith("error: --tune: ") and message in outcome.stderr, outcome.stderr
    assert outcome.stderr.count("\n") == 1
    assert not (tmp_path / "c").exists()
