"""Method commands: train, evaluate, predict, compare, demo."""

import click

from mkd_cli.main import FiniteFloatRange, main
from mkd_tf import registry
from mkd_tf.config import METHODS, PRECISIONS, STRATEGIES
from mkd_tf.errors import MkdError


def shared_training_options(command):
    """The options `train` and `compare` share: one name, help text and default for each.

    They reach the command as keyword arguments; :func:`shared_overrides` turns them into config overrides.
    """
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(),
            default=None,
            help="YAML with any hyper-parameter (see mkd_tf/config.py).",
        ),
        click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs [config default: 20]."),
        click.option(
            "--steps-per-epoch", type=click.IntRange(1), default=None, help="Steps per epoch [config default: 100]."
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(1),
            default=None,
            help="Slices per stream per step, all replicas [config default: 8].",
        ),
        click.option(
            "--target-labelled",
            "--target-labeled",
            "target_labelled",
            type=click.IntRange(0),
            default=None,
            help="Use labels of only N of the cache's labelled target training volumes [default: all].",
        ),
        click.option(
            "--base-filters", type=click.IntRange(1), default=None, help="Segmentor base filters [config default: 32]."
        ),
        click.option(
            "--depth", type=click.IntRange(1), default=None, help="Segmentor U-Net depth [config default: 4]."
        ),
        click.option(
            "--deterministic/--no-deterministic",
            default=None,
            help="Bit-reproducible training: deterministic kernels, no Grappler graph rewrites "
            "[config default: False].",
        ),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def shared_overrides(epochs, steps_per_epoch, batch_size, target_labelled, base_filters, depth, deterministic):
    """Config overrides from :func:`shared_training_options` (None = keep the config's value)."""
    return {
        "deterministic": deterministic,
        "data": {"batch_size": batch_size, "target_labelled": target_labelled},
        "schedule": {"epochs": epochs, "steps_per_epoch": steps_per_epoch},
        "segmentor": {"base_filters": base_filters, "depth": depth},
    }


@main.command()
@click.argument("cache", type=click.Path())
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Run folder (created; the same command resumes it; a folder that is not a run is refused).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=None,
    help="Method to train [config default: mkd]: "
    + "; ".join(f"{m.name} = {m.summary}" for m in registry.METHODS.values())
    + ".",
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default=None,
    help="auto = multi-worker when TF_CONFIG names several workers, else MirroredStrategy over all "
    "GPUs, default strategy on CPU; multi-worker = MultiWorkerMirroredStrategy on TF_CONFIG "
    "[config default: auto].",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Keras mixed-precision policy (outputs and losses stay float32; float16 adds loss scaling) "
    "[config default: float32].",
)
@click.option(
    "--jit-compile/--no-jit-compile", default=None, help="XLA-compile the distributed step [config default: False]."
)
@click.option(
    "--checkpoint-every",
    type=FiniteFloatRange(0),
    default=None,
    help="Minutes between step checkpoints inside an epoch; 0 = epoch ends only [config default: 10.0].",
)
@click.option(
    "--worker-timeout",
    type=FiniteFloatRange(0, min_open=True),
    default=None,
    help="Multi-worker: seconds to wait for the cluster and for one collective before stopping "
    "[config default: 600.0].",
)
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=None,
    help="Seed of initialisation, shuffling, augmentation [config default: 0].",
)
@click.option("--no-augment", is_flag=True, default=None, help="Turn augmentation off.")
@click.option(
    "--no-iam", is_flag=True, default=None, help="Ablation: no image alignment (S_syn sees raw assistant images)."
)
@click.option("--no-kd-s2r", is_flag=True, default=None, help="Ablation: no S_syn -> S_real distillation.")
@click.option("--no-kd-r2s", is_flag=True, default=None, help="Ablation: no S_real -> S_syn distillation.")
@shared_training_options
def train(
    cache,
    out,
    method,
    strategy,
    precision,
    jit_compile,
    checkpoint_every,
    worker_timeout,
    seed,
    no_augment,
    no_iam,
    no_kd_s2r,
    no_kd_r2s,
    config_path,
    quiet,
    **shared,
):
    """Train a method on a slice CACHE into --out (flags override --config, which overrides defaults).

    Multi-worker: run the same command on every machine with its own TF_CONFIG; the chief writes --out.
    """
    from mkd_tf.training import train as run_training

    overrides = shared_overrides(**shared)
    overrides["data"]["augment"] = False if no_augment else None
    overrides |= {
        "method": method,
        "seed": seed,
        "strategy": strategy,
        "precision": precision,
        "jit_compile": jit_compile,
        "checkpoint_every": checkpoint_every,
        "worker_timeout": worker_timeout,
        "ablation": {
            "iam": False if no_iam else None,
            "kd_s2r": False if no_kd_s2r else None,
            "kd_r2s": False if no_kd_r2s else None,
        },
    }
    result = run_training(cache, out, config_path, overrides, verbose=0 if quiet else 1)
    if not result.get("chief", True):
        click.echo(f"worker done: the chief wrote {result['run']}")
        return
    best = result["best"]
    click.echo(
        f"run: {result['run']}  best epoch {best['epoch']} ({best['predictor']} val Dice {best['score']:.3f})"
        if best and best["score"] >= 0
        else f"run: {result['run']}"
    )
    click.echo(f"tensorboard --logdir {result['logs']}")


@main.command()
@click.argument("run", type=click.Path())
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", help="Target split to evaluate.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", help="Which weights to evaluate.")
@click.option("--cache", type=click.Path(), default=None, help="Slice cache [default: the one the run was trained on].")
def evaluate(run, split, checkpoint, cache):
    """Dice, ASSD, HD95 (mm, original grid) of every predictor of RUN; writes metrics.json/.csv/.md."""
    from mkd_tf.evaluation import evaluate_run

    result = evaluate_run(run, split, checkpoint, cache)
    click.echo(result["table"])
    click.echo(f"wrote {run}/metrics.json, metrics.csv, metrics.md")


@main.command()
@click.argument("run", type=click.Path())
@click.argument("image", type=click.Path(), required=False)
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(),
    help="Label map to write (.nii or .nii.gz): input's shape, affine, qform/sform codes, label values.",
)
@click.option(
    "--overlay", type=click.Path(), default=None, help="Also write a PNG (.png) with contours on a few slices."
)
@click.option("--which", default="ensemble", help="Predictor: ensemble, real, syn (or the baseline's name).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", help="Which weights to use.")
@click.option(
    "--force",
    is_flag=True,
    help="Segment even if the image's intensities do not look like the modality the run was trained on "
    "(e.g. no air near -1000 HU for a CT run).",
)
@click.option("--server", default=None, help="Predict on TF Serving over REST: http://HOST:8501/v1/models/NAME.")
@click.option("--grpc", "grpc_target", default=None, help="Predict on TF Serving over gRPC: HOST:8500 (with --model).")
@click.option("--model", "model_name", default=None, help="Model name on the server (--grpc, or a bare --server URL).")
@click.option(
    "--version",
    "model_version",
    type=click.IntRange(1),
    default=None,
    help="Model version on the server [default: its latest].",
)
@click.option(
    "--label",
    "model_label",
    default=None,
    help="Model version label on the server (mkd export --label), instead of --version.",
)
@click.option(
    "--model-dir",
    type=click.Path(),
    default=None,
    help="Remote: local copy of the export (saved_models/NAME/<version>) giving preprocessing and labels instead of RUN.",
)
@click.option("--batch-size", type=click.IntRange(1), default=16, help="Remote: slices per request.")
def predict(
    run,
    image,
    out,
    overlay,
    which,
    checkpoint,
    force,
    server,
    grpc_target,
    model_name,
    model_version,
    model_label,
    model_dir,
    batch_size,
):
    """Segment a target-modality NIfTI IMAGE with a trained RUN.

    Remote: `mkd predict [RUN] IMAGE --server URL | --grpc HOST:PORT --model NAME`; the preprocessing and
    label values come from RUN or from --model-dir (then RUN is omitted). The outputs are written only
    when everything succeeded.
    """
    from mkd_tf.prediction_files import check_output_paths

    if image is None and not (server or grpc_target):
        raise click.UsageError("Missing argument 'IMAGE'.")
    check_output_paths(out, overlay)  # before loading anything
    if server or grpc_target:
        from mkd_tf.export.client import predict_file_remote

        if image is None:  # `mkd predict IMAGE --server ... --model-dir ...`: the one argument is the image
            run, image = None, run
        labels = predict_file_remote(
            image,
            out,
            server=server,
            grpc_target=grpc_target,
            model=model_name,
            version=model_version,
            model_dir=model_dir,
            run=run,
            batch_size=batch_size,
            overlay=overlay,
            label=model_label,
            force=force,
        )
        click.echo(f"wrote {out} ({labels.dtype}, shape {labels.shape})" + (f" and {overlay}" if overlay else ""))
        return
    if model_label is not None:
        raise MkdError(f"--label {model_label}: selects a model version on a server; use it with --server or --grpc")
    from mkd_tf.inference import predict as predict_image

    labels = predict_image(run, image, out, which, checkpoint, overlay, force).labels
    click.echo(f"wrote {out} ({labels.dtype}, shape {labels.shape})" + (f" and {overlay}" if overlay else ""))


def _method_names(ctx, param, text):
    """Click callback: `"a, b"` -> ``["a", "b"]``, each a registered method or variant, at least one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise click.BadParameter(f"no method given in {text!r} (e.g. --methods target-only,mkd)")
    for name in names:
        if name not in registry.names():
            raise click.BadParameter(f"unknown method '{name}' (choose from {', '.join(registry.names())})")
    return names


@main.command()
@click.argument("cache", type=click.Path())
@click.option(
    "--methods",
    default="target-only,joint,finetune,ummkd,mkd",
    callback=_method_names,
    help="Comma-separated methods and registered variants: " + ", ".join(registry.names()) + ".",
)
@click.option("--seeds", type=click.IntRange(1), default=3, help="Seeds per method (0..N-1, or see --first-seed).")
@click.option(
    "--first-seed",
    type=click.IntRange(0),
    default=0,
    help="Use seeds FIRST..FIRST+N-1 (processes with different ranges can train in parallel; a last "
    "run over all seeds only evaluates).",
)
@click.option("--out", required=True, type=click.Path(), help="Folder for the runs, the table and the box plot.")
@click.option(
    "--tune",
    default=None,
    metavar="SETTING=V1,V2,...",
    help="Tune one setting per method, e.g. optimizer.segmentor_lr=5e-4,1e-3,2e-3: train each method at "
    "every value (runs in METHOD/SETTING=VALUE/seedN) and report it at the value with the highest mean "
    "validation Dice over the seeds; a second table lists every value's validation and test Dice.",
)
@shared_training_options
def compare(cache, methods, seeds, first_seed, out, tune, config_path, quiet, **shared):
    """Train and evaluate several methods on the same split and budget; one table + a box plot."""
    from mkd_tf.compare import compare_methods, parse_tune

    overrides = shared_overrides(**shared)
    tune = parse_tune(tune) if tune is not None else None
    result = compare_methods(
        cache,
        methods,
        seeds,
        out,
        config_path,
        overrides,
        verbose=0 if quiet else 1,
        progress=click.echo,
        first_seed=first_seed,
        tune=tune,
    )
    click.echo(result["table"])
    click.echo(f"wrote {result['table_path']} and {result['plot_path']}")


@main.command()
@click.option("--out", default="demo", type=click.Path(), help="Folder for the phantom, cache, run and exports.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Override the demo's epochs (8).")
@click.option(
    "--steps-per-epoch", type=click.IntRange(1), default=None, help="Override the demo's steps per epoch (75)."
)
@click.option(
    "--saved-models",
    default="saved_models",
    type=click.Path(file_okay=False),
    help="Where the demo's SavedModel goes (saved_models/mkd-demo/<next version>).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def demo(out, epochs, steps_per_epoch, saved_models, quiet):
    """Phantom -> prepare -> train MKD briefly -> evaluate -> export -> TFLite, in a few minutes on CPU."""
    from mkd_tf.demo import run_demo

    result = run_demo(
        out, steps_per_epoch, epochs, progress=click.echo, verbose=0 if quiet else 1, saved_models=saved_models
    )
    click.echo(
        f"run: {result['run']}\ntensorboard --logdir {result['logs']}\n"
        f"segmentation: {result['segmentation']} (open with its image in 3D Slicer / ITK-SNAP)\n"
        f"overlay: {result['overlay']}\nSavedModel: {result['savedmodel']}\nTFLite: {result['tflite']}"
    )
