"""`mkd`: the command-line entry point. Each command parses options, calls one mkd_tf function, prints.

Errors a user can fix (:class:`mkd_tf.errors.MkdError`) become one line on stderr and exit status 2, and so
do click's usage errors (a bad choice or range, a missing argument, an unknown option): `error: --OPTION:
<problem>`. Options are parsed before TensorFlow is imported (only once a command's body runs), so a usage
error is reported at once and `mkd --help` / `mkd CMD --help` stay instant.
"""

import math
import os
import re
import sys

import click

from mkd_tf.errors import MkdError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_tensorflow_quietly():
    """Import TensorFlow and probe its physical devices with the C++ stderr silenced.

    TF 2.21 prints absl/CUDA start-up lines ("All log messages before absl::InitializeLog()...",
    "Could not find cuda drivers...", "failed call to cuInit") straight to file descriptor 2 before
    TF_CPP_MIN_LOG_LEVEL applies. They would bury mkd's one-line errors, so fd 2 goes to a temporary
    file for the import; if the import itself fails, that file is shown. Listing the physical devices
    (CUDA's probe) leaves TensorFlow's context uninitialised, so a command can still configure it
    (logical devices, a multi-worker cluster: :func:`mkd_tf.cluster.make_multi_worker_strategy`).
    """
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def usage_error_line(exc: click.UsageError) -> str:
    """Click's usage error as the project's one line (without `error: `): `--OPTION: <problem>`.

    Args:
        exc: what click raised while parsing (or a command raised for a bad option value).

    Returns:
        The message naming the option, argument or command first, on one line.
    """
    if isinstance(exc, click.MissingParameter):
        name = _parameter_name(exc)
        kind = exc.param_type or (exc.param.param_type_name if exc.param is not None else "parameter")
        line = f"{name}: missing {'argument' if kind == 'argument' else 'required ' + kind}"
    elif isinstance(exc, click.BadParameter):
        name = _parameter_name(exc)
        line = f"{name}: {exc.message}" if name else f"invalid value: {exc.message}"
    elif isinstance(exc, click.NoSuchOption):
        line = f"{exc.option_name}: no such option" + _did_you_mean(exc.possibilities)
    elif isinstance(exc, click.exceptions.NoSuchCommand):
        line = f"{exc.command_name}: no such command" + _did_you_mean(exc.possibilities)
    else:
        line = exc.format_message()
    return " ".join(line.split()).rstrip(".")


def _parameter_name(exc):
    """The name a user typed: the option's first long flag (``--batch-size``) or the argument (``CACHE``)."""
    if isinstance(exc.param_hint, str):
        return exc.param_hint
    if exc.param_hint:
        return exc.param_hint[0]
    param = exc.param
    if param is None:
        return ""
    if isinstance(param, click.Option):
        return next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
    return param.human_readable_name


def _did_you_mean(possibilities):
    return f" (did you mean {' or '.join(possibilities)}?)" if possibilities else ""


def _usage_error_exit(exc):
    click.echo(f"error: {usage_error_line(exc)}", err=True)
    sys.exit(2)


class FiniteFloatRange(click.FloatRange):
    """:class:`click.FloatRange` that refuses nan and inf (click's range lets nan through every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"expected a finite number, got {value!r}", param, ctx)
        return number


class MkdCommand(click.Command):
    """A command whose body runs with TensorFlow loaded (quietly), unless made with ``tensorflow=False``.

    TensorFlow is loaded in :meth:`invoke`, after the options were parsed and checked: a usage error never
    waits the 3-13 s a TensorFlow import takes, and it cannot be buried under TensorFlow's start-up lines.
    """

    def __init__(self, *args, tensorflow: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensorflow = tensorflow

    def invoke(self, ctx):
        if self.tensorflow:
            load_tensorflow_quietly()
        return super().invoke(ctx)


class MkdGroup(click.Group):
    """A click group that turns MkdError, usage errors (and a few OS errors) into one line and exit status 2."""

    command_class = MkdCommand

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:  # bare `mkd`: click prints the help
            raise
        except click.UsageError as exc:  # `mkd --no-such-option`
            _usage_error_exit(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # a command's options (parsed here) or a bad value its body found
            _usage_error_exit(exc)
        except MkdError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except PermissionError as exc:
            click.echo(f"error: {exc.filename}: permission denied", err=True)
            sys.exit(2)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                click.echo(f"error: {exc.filename or 'disk'}: no space left on device", err=True)
                sys.exit(2)
            raise
        except MemoryError as exc:  # numpy's "Unable to allocate 3.6 TiB for an array ..." is one
            click.echo(f"error: out of memory: {_first_line(exc)}; {OUT_OF_MEMORY_HINT}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            # TensorFlow's OOM (a huge --size/--batch-size) is ResourceExhaustedError; matched by name so
            # this module does not import TensorFlow.
            if type(exc).__name__ != "ResourceExhaustedError":
                raise
            click.echo(f"error: out of memory: {_first_line(exc)}; {OUT_OF_MEMORY_HINT}", err=True)
            sys.exit(2)


OUT_OF_MEMORY_HINT = "use a smaller --size, --batch-size or network (segmentor/alignment base_filters)"


def _first_line(exc):
    """The message's first line without TensorFlow's `{{function_node ...}}` / `[Op:...] name:` wrapping."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", line)


@click.group(cls=MkdGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mkd-tf")
def main():
    """mkd-tf: cross-modality segmentation with online Mutual Knowledge Distillation."""


from mkd_cli import data_commands, export_commands, method_commands  # noqa: E402,F401  (register commands on `main`)
