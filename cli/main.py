"""`mkd`: the command-line entry point. Each command parses options, calls one mkd_tf function, prints.

Errors a user can fix (:class:`mkd_tf.errors.MkdError`) become one line on stderr and exit status 2.
TensorFlow is imported lazily inside commands so `mkd --help` stays instant.
"""

import os
import re
import sys

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Commands that never load TensorFlow (data preparation is numpy/nibabel only).
NO_TENSORFLOW = {"phantom", "prepare", "info"}


def load_tensorflow_quietly():
    """Import TensorFlow and initialise its devices with the C++ stderr silenced.

    TF 2.21 prints absl/CUDA start-up lines ("All log messages before absl::InitializeLog()...",
    "Could not find cuda drivers...", "failed call to cuInit") straight to file descriptor 2 before
    TF_CPP_MIN_LOG_LEVEL applies. They would bury mkd's one-line errors, so fd 2 goes to a temporary
    file for the import; if the import itself fails, that file is shown.
    """
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_logical_devices()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class MkdGroup(click.Group):
    """A click group that turns MkdError (and a few OS errors) into one line and exit status 2."""

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if name not in NO_TENSORFLOW and not {"--help", "-h"} & set(rest):
            load_tensorflow_quietly()
        return name, command, rest

    def invoke(self, ctx):
        from mkd_tf.errors import MkdError

        try:
            return super().invoke(ctx)
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
