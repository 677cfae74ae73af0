"""Configuration: defaults <- YAML file <- command-line flags; strict keys; safe YAML only."""

import copy
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mkd_cli.main import main as cli
from mkd_tf.config import DEFAULTS, load_config, save_config
from mkd_tf.errors import MkdError
from tests.scripts import tiny_runs


def write(path, text):
    Path(path).write_text(text)
    return Path(path)


def resolved(method="mkd"):
    """DEFAULTS as load_config returns them for ``method``: domain_norm (null) becomes the method's default,
    syn_domain_norm is recorded as domain_norm except for mkd with domain_norm."""
    config = copy.deepcopy(DEFAULTS)
    config["method"] = method
    segmentor = config["segmentor"]
    segmentor["domain_norm"] = method in ("mkd", "joint")
    if method != "mkd":
        segmentor["syn_domain_norm"] = segmentor["domain_norm"]
    return config


def test_defaults_are_returned_as_an_independent_copy():
    config = load_config()
    assert config == resolved()
    assert DEFAULTS["segmentor"]["domain_norm"] is None
    config["schedule"]["epochs"] = 1
    assert DEFAULTS["schedule"]["epochs"] == 20 and load_config()["schedule"]["epochs"] == 20


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = write(
        tmp_path / "cfg.yaml",
        "method: joint\nschedule:\n  epochs: 7\n  steps_per_epoch: 11\nloss:\n  temperature: 3.5\n",
    )
    from_file = load_config(path)
    assert from_file["method"] == "joint" and from_file["loss"]["temperature"] == 3.5
    assert from_file["schedule"] == {**DEFAULTS["schedule"], "epochs": 7, "steps_per_epoch": 11}
    expected = resolved("joint")
    expected["schedule"].update(epochs=7, steps_per_epoch=11)
    expected["loss"]["temperature"] = 3.5
    assert from_file == expected

    # Flags win over the file; flags left unset (None) do not override anything.
    merged = load_config(
        path, {"method": "mkd", "schedule": {"epochs": 2, "steps_per_epoch": None}, "data": {"batch_size": None}}
    )
    expected.update(method="mkd")
    expected["segmentor"].update(domain_norm=True, syn_domain_norm=DEFAULTS["segmentor"]["syn_domain_norm"])
    expected["schedule"]["epochs"] = 2
    assert merged == expected


def test_train_command_flags_reach_the_config_over_the_yaml(tmp_path, monkeypatch):
    """`mkd train --config cfg.yaml --epochs 3 --no-kd-r2s` resolves flags > YAML > defaults."""
    captured = {}

    def fake_train(cache, out, config_path, overrides, verbose):
        captured.update(config=load_config(config_path, overrides), verbose=verbose)
        return {"run": out, "best": None, "logs": f"{out}/logs"}

    monkeypatch.setattr("mkd_tf.training.train", fake_train)
    path = write(
        tmp_path / "cfg.yaml",
        "schedule: {epochs: 9, steps_per_epoch: 4}\nsegmentor: {base_filters: 6}\n"
        "data: {augment: true, batch_size: 3}\n",
    )
    outcome = CliRunner().invoke(
        cli,
        [
            "train",
            "cache",
            "--out",
            str(tmp_path / "run"),
            "--config",
            str(path),
            "--epochs",
            "3",
            "--no-kd-r2s",
            "--no-augment",
            "--depth",
            "2",
            "--quiet",
        ],
    )
    assert outcome.exit_code == 0, outcome.output
    config = captured["config"]
    assert config["schedule"]["epochs"] == 3  # flag over YAML
    assert config["schedule"]["steps_per_epoch"] == 4  # YAML over default
    assert config["segmentor"] == {**DEFAULTS["segmentor"], "base_filters": 6, "depth": 2, "domain_norm": True}
    assert config["data"] == {"batch_size": 3, "augment": False, "target_labelled": None}
    assert config["ablation"] == {"iam": True, "kd_s2r": True, "kd_r2s": False}
    assert captured["verbose"] == 0
    assert outcome.output == f"run: {tmp_path / 'run'}\ntensorboard --logdir {tmp_path / 'run'}/logs\n"


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            "schedule:\n  epoch: 3\n",
            "unknown setting 'epoch' (known: epochs, finetune_switch, mkd_pretrain, select_by, steps_per_epoch, validation_batch)",
        ),
        (
            "learning_rate: 0.1\n",
            "unknown setting 'learning_rate' (known: ablation, alignment, checkpoint_every, data, "
            "deterministic, jit_compile, loss, method, optimizer, precision, schedule, seed, segmentor, strategy, "
            "worker_timeout)",
        ),
        ("schedule: 5\n", "setting 'schedule' must be a mapping"),
        ("- 1\n- 2\n", "config must be a mapping"),
        ("schedule: {epochs: [1\n", "invalid YAML (while parsing a flow sequence)"),
    ],
)
def test_bad_config_files_fail_in_one_line_naming_the_file(tmp_path, text, problem):
    path = write(tmp_path / "cfg.yaml", text)
    with pytest.raises(MkdError) as raised:
        load_config(path)
    assert str(raised.value) == f"{path}: {problem}"


def test_exponent_numbers_without_a_dot_are_numbers_and_whole_floats_are_ints(tmp_path):
    # PyYAML alone (YAML 1.1) reads 4e-3 as the text '4e-3'; Python, YAML 1.2 and the command line read a number
    assert yaml.safe_load("lr: 4e-3") == {"lr": "4e-3"}
    path = write(
        tmp_path / "cfg.yaml",
        "optimizer: {segmentor_lr: 4e-3, generator_lr: 2E-4}\nschedule: {epochs: 2.0, steps_per_epoch: 1e2}\n",
    )
    config = load_config(path)
    assert config["optimizer"]["segmentor_lr"] == 0.004 and config["optimizer"]["generator_lr"] == 0.0002
    assert config["schedule"]["epochs"] == 2 and type(config["schedule"]["epochs"]) is int
    assert config["schedule"]["steps_per_epoch"] == 100 and type(config["schedule"]["steps_per_epoch"]) is int
    for text, problem in [
        ("optimizer: {segmentor_lr: 4e-3x}\n", "setting 'optimizer.segmentor_lr' must be a finite number, got '4e-3x'"),
        ('optimizer: {segmentor_lr: "4e-3"}\n', "setting 'optimizer.segmentor_lr' must be a finite number, got '4e-3'"),
        ("schedule: {epochs: 2.5}\n", "setting 'schedule.epochs' must be a whole number, got 2.5"),
    ]:
        with pytest.raises(MkdError) as raised:
            load_config(write(path, text))
        assert str(raised.value) == f"{path}: {problem}"


def test_unknown_flag_values_and_missing_files(tmp_path):
    with pytest.raises(MkdError, match="^--method: unknown method 'sifa' \\(choose from mkd, target-only, "):
        load_config(overrides={"method": "sifa"})
    with pytest.raises(MkdError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    """A flag's bad value names the flag, the file's the file, even when both are given."""
    path = write(tmp_path / "tiny.yaml", "checkpoint_every: 5\nschedule: {epochs: 0}\n")
    with pytest.raises(MkdError) as raised:
        load_config(path, {"checkpoint_every": float("nan"), "schedule": {"epochs": 3}})
    assert str(raised.value) == "--checkpoint-every: setting 'checkpoint_every' must be a finite number, got nan"
    with pytest.raises(MkdError) as raised:
        load_config(path, {"segmentor": {"depth": 2}})
    assert str(raised.value) == f"{path}: setting 'schedule.epochs' must be in [1, inf], got 0"
    path.write_text("segmentor: {depth: 3}\n")
    with pytest.raises(MkdError) as raised:
        load_config(path, {"segmentor": {"depth": 9}})
    assert str(raised.value) == "--depth: setting 'segmentor.depth' must be in [1, 8], got 9"
    with pytest.raises(MkdError) as raised:  # an override no flag sets (compare's --tune, a library caller)
        load_config(path, {"loss": {"temperature": -1.0}})
    assert str(raised.value).startswith("command line: setting 'loss.temperature' must be in (0.0, inf]")


def test_a_config_that_is_a_folder_or_not_utf8_is_one_line(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(MkdError) as raised:
        load_config(tmp_path / "folder.yaml")
    assert str(raised.value) == f"{tmp_path / 'folder.yaml'}: config is not a file"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# r\xe9glages\nseed: 1\n".encode("latin-1"))
    with pytest.raises(MkdError) as raised:
        load_config(latin1)
    assert str(raised.value) == f"{latin1}: config is not UTF-8 text (byte 3: invalid continuation byte)"


def test_python_object_tags_are_rejected_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = write(tmp_path / "evil.yaml", f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(MkdError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: invalid YAML (could not determine a constructor for the tag")
    assert "\n" not in message
    assert not marker.exists()


def test_save_config_round_trips_and_writes_atomically(tmp_path):
    config = load_config(overrides={"method": "finetune", "loss": {"cycle": 5.0}})
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config
    assert load_config(tmp_path / "config.yaml") == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_the_resolved_config_is_saved_in_the_run(tmp_path_factory):
    """A CLI run (`--config tiny.yaml --no-iam`): RUN/config.yaml is the full resolved config."""
    run = tiny_runs.shared_run(tmp_path_factory, "mkd-no-iam")
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    expected = load_config(overrides=tiny_runs.tiny_overrides(ablation={"iam": False}))
    assert saved == expected
    assert saved["ablation"]["iam"] is False and saved["segmentor"]["base_filters"] == 4


def _old_run_config(tmp_path, **changes):
    """A run's config.yaml as the first version wrote it: every setting of then, none added since."""
    from mkd_tf.config import ADDED_SINCE, DEFAULTED_SINCE

    values = copy.deepcopy(DEFAULTS)
    for section, key in (*ADDED_SINCE, *DEFAULTED_SINCE):
        (values if section is None else values[section]).pop(key)
    values["data"]["target_labeled"] = values["data"].pop("target_labelled")
    for section, settings in changes.items():
        values[section].update(settings)
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_old_spellings_and_settings_added_since_load(tmp_path):
    from mkd_tf.config import load_config

    old = tmp_path / "config.yaml"
    old.write_text("method: mkd\ndata: {target_labeled: 1}\nsegmentor: {base_filters: 4, depth: 2}\n")
    # a user's file: the renamed key is read, domain_norm takes the method's registered default
    config = load_config(old)
    old = _old_run_config(tmp_path, data={"target_labeled": 1}, segmentor={"base_filters": 4, "depth": 2})
    assert config["data"]["target_labelled"] == 1 and "target_labeled" not in config["data"]
    assert config["segmentor"]["domain_norm"] is True and config["segmentor"]["kind"] == "unet"
    # a run written before domain_norm existed trained without it
    assert load_config(old, recorded=True)["segmentor"]["domain_norm"] is False
    # ... and one written before loss.syn_on_target existed without S_syn's target supervision
    old = _old_run_config(tmp_path)
    assert load_config(old, recorded=True)["loss"]["syn_on_target"] == 0.0
    assert load_config(old)["loss"]["syn_on_target"] == 1.0
    # a run written before syn_domain_norm existed kept per-domain sets in S_syn too
    old = _old_run_config(tmp_path, segmentor={"domain_norm": True})
    assert load_config(old, recorded=True)["segmentor"]["syn_domain_norm"] is True
    # only mkd reads syn_domain_norm, only with domain_norm: any other run records what its segmentors do
    for method, domain_norm in (("joint", True), ("finetune", False), ("mkd", False)):
        settings = {"method": method, "segmentor": {"domain_norm": domain_norm, "syn_domain_norm": not domain_norm}}
        assert load_config(overrides=settings)["segmentor"]["syn_domain_norm"] is domain_norm
    # methods that ignore the setting record false; a baseline's default is off
    assert load_config(overrides={"method": "ummkd"})["segmentor"]["domain_norm"] is False
    assert load_config(overrides={"method": "finetune"})["segmentor"]["domain_norm"] is False


def test_an_even_skip_kernel_fails_in_one_line():
    with pytest.raises(MkdError) as raised:
        load_config(overrides={"alignment": {"skip_kernel": 4}})
    assert str(raised.value) == "config: setting 'alignment.skip_kernel' must be odd, got 4"


def test_select_by_must_be_a_predictor_of_the_method(tmp_path):
    path = write(tmp_path / "cfg.yaml", "method: finetune\nschedule: {select_by: syn}\n")
    with pytest.raises(MkdError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}: setting 'schedule.select_by' must be one of finetune for method finetune, got 'syn'"
    )


def test_removed_switches_load_off_are_refused_on_and_block_only_a_resume(tmp_path, tmp_path_factory):
    """MKD's removed switches (mkd_tf.config_migrations.REMOVED): a file that has them off (as every run's
    config.yaml written before did) loads without them; one that turns one on is refused in one line; a
    run trained with one on still loads for evaluation, but is not resumed under today's step."""
    from mkd_tf.config_migrations import REMOVED
    from mkd_tf.training import check_run_folder

    off = {key: value for (_, key), value in REMOVED.items() if value is not None}
    path = write(tmp_path / "cfg.yaml", yaml.safe_dump({"loss": {**off, "pseudo_label_threshold": 0.9}}))
    assert not set(REMOVED) & {("loss", key) for key in load_config(path)["loss"]}
    for key, value in (("pseudo_labels", 1.0), ("average_teachers", True)):
        path = write(tmp_path / "on.yaml", yaml.safe_dump({"loss": {key: value}}))
        with pytest.raises(MkdError) as raised:
            load_config(path)
        assert str(raised.value) == (
            f"{path}: setting 'loss.{key}' was removed (it did not beat the default MKD: benchmarks/README.md)"
        )
    with pytest.raises(MkdError, match="^command line: setting 'loss.real_on_aligned' was removed"):
        load_config(overrides={"loss": {"real_on_aligned": 1.0}})
    run = tmp_path / "run"
    shutil.copytree(tiny_runs.shared_run(tmp_path_factory, "mkd-no-iam").path, run)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    recorded["loss"]["pseudo_labels"] = 1.0
    (run / "config.yaml").write_text(yaml.safe_dump(recorded))
    config = load_config(run / "config.yaml", recorded=True)  # evaluate, predict, export read it so
    assert "pseudo_labels" not in config["loss"]
    with pytest.raises(MkdError) as raised:
        check_run_folder(run, config)
    assert str(raised.value) == (
        f"{run}: was trained with 'loss.pseudo_labels', which mkd-tf no longer has: it cannot be resumed; use a new --out"
    )


def test_the_iam_cost_settings_are_checked_in_one_line():
    config = load_config(overrides={"alignment": {"discriminator_every": 3, "target_cycle": False}})
    assert (config["alignment"]["discriminator_every"], config["alignment"]["target_cycle"]) == (3, False)
    with pytest.raises(MkdError) as raised:
        load_config(overrides={"alignment": {"discriminator_every": 0}})
    assert str(raised.value).startswith("command line: setting 'alignment.discriminator_every' must be")
    # the defaults: the cheaper IAM, its discriminators' period chosen when the model knows its strategy
    defaults = load_config()["alignment"]
    assert (defaults["target_cycle"], defaults["discriminator_every"], defaults["freeze_after_warm_start"]) == (
        False,
        None,
        True,
    )
    assert load_config(overrides={"strategy": "mirrored"})["alignment"]["discriminator_every"] is None
    with pytest.raises(MkdError) as raised:
        load_config(overrides={"alignment": {"discriminator_every": 2}, "strategy": "mirrored"})
    assert str(raised.value) == (
        "config: setting 'alignment.discriminator_every' > 1 needs strategy default or auto, got 'mirrored' "
        "(a distribution strategy cannot skip the discriminators' update on some steps)"
    )


def test_every_setting_is_one_typed_field_with_its_default_rule_and_help():
    """DEFAULTS, RULES and HELP are the settings dataclasses' fields (the segmentor kind's own settings are its
    registration's), so there is one home for each setting."""
    from dataclasses import asdict

    from mkd_tf import registry
    from mkd_tf.config import HELP, RULES, MKDLossSettings, TrainingSettings, method_defaults

    defaults = copy.deepcopy(DEFAULTS)
    kind = registry.SEGMENTORS[defaults["segmentor"]["kind"]]
    for name in kind.defaults:
        defaults["segmentor"].pop(name)
    assert asdict(TrainingSettings()) == defaults
    dotted = {f"{key}.{name}" for key, rule in RULES.items() if isinstance(rule, dict) for name in rule}
    dotted |= {key for key, rule in RULES.items() if not isinstance(rule, dict)}
    assert dotted | {f"segmentor.{name}" for name in kind.defaults} == set(HELP)
    assert all(HELP[name].strip() for name in HELP)
    # a method's own settings are a section of their own, with the same defaults
    assert asdict(MKDLossSettings()).items() <= DEFAULTS["loss"].items()
    assert method_defaults("mkd")["segmentor"]["domain_norm"] is True  # the method's registered default
    assert method_defaults("mkd") is not method_defaults("mkd")  # a fresh copy: a caller may change it
