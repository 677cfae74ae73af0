"""Usage errors of every `mkd` command: one `error: --OPTION: <problem>` line and exit 2, before TensorFlow.

The cases run in one child process that never imports TensorFlow itself (pytest's own process may have
imported it for other tests), and that reports whether anything `mkd` did imported it.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from mkd_cli.main import usage_error_line

# (arguments, the stderr line without "error: ", or its start if it ends in "..."); every case exits with status 2
USAGE_ERRORS = [
    (
        ["train", "CACHE", "--out", "r", "--precision", "float8"],
        "--precision: 'float8' is not one of 'float32', 'mixed_float16', 'mixed_bfloat16'",
    ),
    (["train", "CACHE", "--out", "r", "--batch-size", "0"], "--batch-size: 0 is not in the range x>=1"),
    (["train", "CACHE", "--out", "r", "--epochs", "two"], "--epochs: 'two' is not a valid integer range"),
    (
        ["train", "CACHE", "--out", "r", "--checkpoint-every", "nan"],
        "--checkpoint-every: expected a finite number, got 'nan'",
    ),
    (
        ["train", "CACHE", "--out", "r", "--worker-timeout", "inf"],
        "--worker-timeout: expected a finite number, got 'inf'",
    ),
    (["train", "CACHE", "--out", "r", "--seed", "-1"], "--seed: -1 is not in the range x>=0"),
    (["train", "CACHE", "--out", "r", "--target-labeled", "-1"], "--target-labelled: -1 is not in the range x>=0"),
    (
        ["train", "CACHE", "--out", "r", "--method", "sifa"],
        "--method: 'sifa' is not one of 'mkd', 'target-only', 'assistant-only', 'joint', 'finetune', 'ummkd'",
    ),
    (["train", "CACHE", "--out", "r", "--no-such-flag"], "--no-such-flag: no such option"),
    (["train", "CACHE", "--out", "r", "--epoch", "3"], "--epoch: no such option (did you mean --epochs..."),
    (["train", "--out", "r"], "CACHE: missing argument"),
    (["train", "CACHE"], "--out: missing required option"),
    (["train", "CACHE", "--out"], "Option '--out' requires an argument"),
    (["train", "CACHE", "EXTRA", "--out", "r"], "Got unexpected extra argument (EXTRA)"),
    (["compare", "CACHE", "--out", "c", "--seeds", "0"], "--seeds: 0 is not in the range x>=1"),
    (
        ["compare", "CACHE", "--out", "c", "--methods", ","],
        "--methods: no method given in ',' (e.g. --methods target-only,mkd)",
    ),
    (
        ["compare", "CACHE", "--out", "c", "--methods", "mkd, ,sifa"],
        "--methods: unknown method 'sifa' (choose from mkd, target-only, ...",
    ),
    (["evaluate", "RUN", "--split", "all"], "--split: 'all' is not one of 'test', 'val', 'train'"),
    (["predict", "RUN", "IMAGE", "-o", "x.nii.gz", "--version", "0"], "--version: 0 is not in the range x>=1"),
    (["predict", "RUN", "IMAGE"], "--out: missing required option"),
    (["export", "RUN", "--out", "sm/m", "--checkpoint", "first"], "--checkpoint: 'first' is not one of 'best', 'last'"),
    (
        ["tflite", "SM", "--out", "a.tflite", "--quantize", "int4"],
        "--quantize: 'int4' is not one of 'none', 'float16', 'dynamic', 'int8'",
    ),
    (
        ["tflite", "SM", "--out", "a.tflite", "--min-agreement", "nan"],
        "--min-agreement: expected a finite number, got 'nan'",
    ),
    (
        ["tflite", "SM", "--out", "a.tflite", "--min-agreement", "1.5"],
        "--min-agreement: 1.5 is not in the range 0<=x<=1",
    ),
    (["demo", "--epochs", "0"], "--epochs: 0 is not in the range x>=1"),
    (["phantom", "P", "--ct", "0"], "--ct: 0 is not in the range x>=1"),
    (["info"], "CACHE: missing argument"),
    (["trian", "CACHE"], "trian: no such command (did you mean train?)"),
    (["--no-such-flag"], "--no-such-flag: no such option"),
]

CHILD = textwrap.dedent(
    """
    import json, sys
    from click.testing import CliRunner
    from mkd_cli.main import main
    results = []
    for arguments in json.loads(sys.argv[1]):
        outcome = CliRunner().invoke(main, arguments)
        results.append([outcome.exit_code, outcome.stdout, outcome.stderr, repr(outcome.exception)])
    print(json.dumps({"results": results, "tensorflow": "tensorflow" in sys.modules}))
    """
)


def _run_without_tensorflow(cases, cwd):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True, cwd=cwd, timeout=900
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_usage_error_is_one_line_exit_2_and_imports_no_tensorflow(tmp_path):
    report = _run_without_tensorflow([arguments for arguments, _ in USAGE_ERRORS], tmp_path)
    for (arguments, expected), (status, stdout, stderr, exception) in zip(USAGE_ERRORS, report["results"]):
        assert (status, stdout) == (2, ""), (arguments, stderr, exception)
        if expected.endswith("..."):
            assert stderr.count("\n") == 1 and stderr.startswith(f"error: {expected[:-3]}"), (arguments, stderr)
        else:
            assert stderr == f"error: {expected}\n", (arguments, stderr)
    assert report["tensorflow"] is False
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_help_of_every_command_imports_no_tensorflow(tmp_path):
    commands = ["train", "evaluate", "predict", "compare", "demo", "export", "tflite", "phantom", "prepare", "info"]
    report = _run_without_tensorflow([["--help"]] + [[command, "--help"] for command in commands], tmp_path)
    for arguments, (status, stdout, stderr, _) in zip([["--help"]] + commands, report["results"]):
        assert status == 0 and stdout.startswith("Usage: ") and stderr == "", (arguments, stderr)
    assert report["tensorflow"] is False


def test_a_command_body_runs_with_tensorflow_loaded(tmp_path):
    """Past the options, a TensorFlow command gets TensorFlow (quietly): here its one-line error comes after."""
    report = _run_without_tensorflow([["evaluate", str(tmp_path / "no-run")]], tmp_path)
    status, _, stderr, _ = report["results"][0]
    assert (status, stderr) == (2, f"error: {tmp_path / 'no-run'}: not a training run (no config.yaml)\n")
    assert report["tensorflow"] is True


@pytest.mark.parametrize(
    "hint, line",
    [("--spacing", "--spacing: too small"), (["--a", "--b"], "--a: too small"), (None, "invalid value: too small")],
)
def test_usage_error_line_names_the_option_a_callback_gave(hint, line):
    import click

    assert usage_error_line(click.BadParameter("too small.", param_hint=hint)) == line
