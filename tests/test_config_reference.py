"""docs/configuration.md is generated from mkd_tf.config; it must name every setting and be up to date."""

from pathlib import Path

from mkd_tf import config, config_reference
from mkd_tf.rules import BOOL, NON_NEGATIVE, POSITIVE, Rule, fraction, integer

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_page_is_up_to_date():
    assert PAGE.read_text(encoding="utf-8") == config_reference.render(), (
        "docs/configuration.md is out of date: run python -m mkd_tf.config_reference > docs/configuration.md"
    )


def test_every_setting_has_help_and_no_help_is_stale():
    names = [name for name, _, _ in config_reference.settings()]
    assert config_reference.missing_help() == []
    assert sorted(set(config.HELP) - set(names)) == [], "HELP names settings that do not exist"
    assert "optimizer.segmentor_lr" in names and "segmentor.base_filters" in names and "method" in names


def test_every_setting_is_a_row_with_its_default_and_range():
    page = config_reference.render()
    for name, default, rule in config_reference.settings():
        row = f"| `{name}` | `{config_reference._value(default)}` | {config_reference.describe_rule(rule)} |"
        assert row in page, row
    assert "| `schedule.mkd_pretrain` | `0.7` | number in [0, 1) |" in page
    assert "| `data.target_labelled` | `null` | whole number in [0, inf], or null |" in page


def test_a_setting_without_help_is_refused(monkeypatch):
    monkeypatch.delitem(config.HELP, "loss.temperature")
    assert config_reference.missing_help() == ["loss.temperature"]
    try:
        config_reference.render()
    except ValueError as error:
        assert "loss.temperature" in str(error)
    else:
        raise AssertionError("render() accepted a setting without help")


def test_describe_rule():
    assert config_reference.describe_rule(integer(1, 8)) == "whole number in [1, 8]"
    assert config_reference.describe_rule(fraction(high_open=True)) == "number in [0, 1)"
    assert config_reference.describe_rule(POSITIVE) == "number in (0, inf]"
    assert config_reference.describe_rule(NON_NEGATIVE) == "number in [0, inf]"
    assert config_reference.describe_rule(BOOL) == "true / false"
    assert config_reference.describe_rule(Rule("choice", choices=("a", "b"), optional=True)) == "one of: a, b, or null"
