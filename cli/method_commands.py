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
    help="Label map to write (.nii or .nii.gz): input's shape, affine, qform/sform codes, label values. "
    "With a folder IMAGE: the folder for CASE.nii.gz per input (created if missing).",
)
@click.option(
    "--overlay",
    type=click.Path(),
    default=None,
    help="Also write a PNG (.png) with contours on a few slices (with --uncertainty: the most uncertain "
    "10% of voxels shaded). With a folder IMAGE: a folder for CASE.png per input.",
)
@click.option(
    "--uncertainty",
    type=click.Path(),
    default=None,
    help="Also write a float32 per-voxel uncertainty map (.nii/.nii.gz) on the input's grid: the entropy "
    "(nats) of the predictor's softmax. For MKD's ensemble that is S_syn's and S_real's own entropy plus "
    "their disagreement (Jensen-Shannon divergence); for a one-segmentor method its entropy. "
    "With a folder IMAGE: a folder for CASE.nii.gz per input. Local prediction only.",
)
@click.option("--which", default="ensemble", help="Predictor: ensemble, real, syn (or the baseline's name).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", help="Which weights to use.")
@click.option(
    "--force",
    is_flag=True,
    help="Segment even if the image's intensities do not look like the modality the run was trained on "
    "(e.g. no air near -1000 HU for a CT run).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="With a folder IMAGE: replace outputs that already exist in the output folders (without it, an "
    "existing CASE output is refused before any work).",
)
@click.option("--quiet", is_flag=True, help="With a folder IMAGE: no progress bar.")
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
@click.pass_context
def predict(
    ctx,
    run,
    image,
    out,
    overlay,
    uncertainty,
    which,
    checkpoint,
    force,
    overwrite,
    quiet,
    server,
    grpc_target,
    model_name,
    model_version,
    model_label,
    model_dir,
    batch_size,
):
    """Segment a target-modality NIfTI IMAGE, or every .nii/.nii.gz in a folder IMAGE, with a trained RUN.

    Folder: `mkd predict RUN FOLDER -o OUT_FOLDER` loads the model once and writes OUT_FOLDER/CASE.nii.gz
    per input, CASE being the file name without .nii.gz/.nii and without nnU-Net's channel-0 suffix
    (CASE_0000.nii.gz -> CASE.nii.gz, as nnU-Net names its predictions); a file that fails is reported
    on one `error:` line and skipped, the others go on, and the exit status is 2 if any failed.
    OUT_FOLDER may not be the input folder or inside it; existing outputs need --overwrite. (A single
    IMAGE's -o names its file explicitly and is replaced.)

    Remote: `mkd predict [RUN] IMAGE --server URL | --grpc HOST:PORT --model NAME`; the preprocessing and
    label values come from RUN or from --model-dir (then RUN is omitted). The outputs of a volume are
    written only when everything succeeded, and together or not at all; an output that is (or links
    to) the input is refused.
    """
    from pathlib import Path

    from mkd_tf.prediction_files import check_output_paths, folder_cases

    remote = bool(server or grpc_target)
    if image is None and not remote:
        raise click.UsageError("Missing argument 'IMAGE'.")
    if remote and image is None:  # `mkd predict IMAGE --server ... --model-dir ...`: the one argument is the image
        run, image = None, run
    if remote and uncertainty is not None:
        raise MkdError(
            f"--uncertainty {uncertainty}: needs the segmentors' probabilities, which a served model does not "
            "return; predict locally with the RUN"
        )
    if model_label is not None and not remote:
        raise MkdError(f"--label {model_label}: selects a model version on a server; use it with --server or --grpc")
    # Every output is checked before anything is loaded.
    folder = Path(image).is_dir()
    if folder:
        cases = folder_cases(image, out, overlay, uncertainty, overwrite)
    else:
        check_output_paths(out, overlay, uncertainty, inputs=[image])

    if remote:
        from mkd_tf.export.client import GrpcClient, check_remote, open_remote, predict_case_remote

        client, info = open_remote(server, grpc_target, model_name, model_version, model_dir, run, label=model_label)
        try:
            if not folder:
                labels = predict_case_remote(client, info, image, out, overlay, force, batch_size)
                click.echo(
                    f"wrote {out} ({labels.dtype}, shape {labels.shape})" + (f" and {overlay}" if overlay else "")
                )
                return
            check_remote(client, info)  # an unreachable server or a wrong model: one line, before any case

            def predict_case(case_image, case_out, case_overlay, _):
                predict_case_remote(client, info, case_image, case_out, case_overlay, force, batch_size)

            _predict_folder(ctx, cases, predict_case, image, out, quiet)
        finally:
            if isinstance(client, GrpcClient):
                client.close()
        return

    from mkd_tf.inference import load_trained, predict, predict_file, predictor_name

    if not folder:  # the library's one-volume predict (mkd_tf.predict), as a notebook calls it
        labels = predict(run, image, out, which, checkpoint, overlay, force, uncertainty).labels
        also = [path for path in (overlay, uncertainty) if path]
        click.echo(
            f"wrote {out} ({labels.dtype}, shape {labels.shape})" + (f" and {' and '.join(also)}" if also else "")
        )
        return
    model, _, record = load_trained(run, checkpoint)
    which = predictor_name(model, which)

    def predict_case(case_image, case_out, case_overlay, case_uncertainty):
        predict_file(model, record, case_image, case_out, which, case_overlay, force, case_uncertainty)

    _predict_folder(ctx, cases, predict_case, image, out, quiet)


def _predict_folder(ctx, cases, predict_case, folder, out, quiet):
    """Run a folder's cases, one `error:` line per failing file, a summary; exit status 2 if any failed."""
    from mkd_tf.inference import predict_folder

    written, failed = predict_folder(
        cases, predict_case, lambda line: click.echo(f"error: {line}", err=True), verbose=0 if quiet else 1
    )
    click.echo(
        f"segmented {len(written)} of {len(cases)} volumes in {folder} into {out}"
        + (f"; {len(failed)} failed (see the error lines)" if failed else "")
    )
    if failed:
        ctx.exit(2)


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
