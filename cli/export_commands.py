"""Deployment commands: export (TF Serving SavedModel) and tflite (LiteRT flatbuffer with a parity check)."""

import click
from mkd_cli.main import FiniteFloatRange, main

from mkd_tf.export import DEFAULT_MIN_AGREEMENT, QUANTIZATIONS


@main.command()
@click.argument("run", type=click.Path())
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Model folder saved_models/NAME (NAME is the TF Serving model name); versions go below it.",
)
@click.option(
    "--version",
    "model_version",
    type=click.IntRange(1),
    default=None,
    help="Version number [default: the next free integer]; an existing version is never overwritten.",
)
@click.option("--which", default="ensemble", help="Predictor: ensemble, real, syn (baselines: their one segmentor).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", help="Which weights to export.")
@click.option(
    "--serving-root",
    default="/models",
    help="Where saved_models/ is mounted in the server: base_path prefix in saved_models/models.config.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="LABEL",
    help="TF Serving version label for the new version, e.g. stable (repeatable); written to "
    "models.config as version_labels, moving the label if another version had it.",
)
def export(run, out, model_version, which, checkpoint, serving_root, labels):
    """Export a trained RUN as a TF Serving SavedModel (signatures serving_default, labels_only, segment_slices).

    saved_models/models.config lists every exported version of every model (model_version_policy
    specific), so a new version never unloads an older one; address a version with /versions/N or
    a label (--label) with /labels/LABEL.
    """
    from mkd_tf.export.serving import export_run

    result = export_run(run, out, model_version, which, checkpoint, serving_root, labels)
    click.echo(
        f"exported {result['method']} predictor '{result['predictor']}' to {result['path']} "
        f"(model '{result['name']}', version {result['version']})"
    )
    for label in labels:
        was = result["moved"].get(label)
        click.echo(f"label '{label}' -> version {result['version']}" + (f" (was version {was})" if was else ""))
    click.echo(f"updated {result['models_config']}")


@main.command()
@click.argument("savedmodel", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .tflite file to write (atomically).")
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZATIONS),
    default="none",
    help="none: float32; float16: fp16 weights; dynamic: int8 weights; int8: full integer "
    "(calibrated on the cache's target training slices, float input/outputs).",
)
@click.option(
    "--cache",
    type=click.Path(),
    default=None,
    help="Slice cache for the parity check and int8 calibration [default: the export's recorded cache].",
)
@click.option(
    "--min-agreement",
    type=FiniteFloatRange(0, 1),
    default=None,
    help="Dice agreement with the SavedModel below which nothing is written [default: "
    + "; ".join(f"{threshold} for {mode}" for mode, threshold in DEFAULT_MIN_AGREEMENT.items())
    + "].",
)
@click.option(
    "--parity-slices",
    type=click.IntRange(1),
    default=200,
    help="Compare on at most this many target test slices (evenly spaced).",
)
def tflite(savedmodel, out, quantize, cache, min_agreement, parity_slices):
    """Convert an exported SAVEDMODEL version folder to TFLite (builtin ops only) and check parity."""
    from mkd_tf.export.tflite import convert_to_tflite

    result = convert_to_tflite(savedmodel, out, quantize, cache, min_agreement, parity_slices, report=click.echo)
    click.echo(f"wrote {result['path']} ({result['bytes'] / 1024:.1f} KiB, ops: {', '.join(result['ops'])})")
