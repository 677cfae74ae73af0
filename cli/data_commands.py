"""Data commands: phantom, prepare, info.

A bad option value is one line on stderr, `error: --OPTION: <problem>`, and exit status 2, found while
the options are parsed, so before anything is read or written (:class:`mkd_cli.main.MkdGroup` turns
click's own checks, ranges and choices, into the same single line). These commands never load TensorFlow.
"""

import math
from functools import partial

import click
from mkd_cli.main import main

from mkd_tf.rules import MIN_SPACING_MM, spacing_too_fine


def _floats(text, count, name):
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}", param_hint=name)
    if len(values) == 1 and count > 1:
        values = values * count
    if len(values) != count:
        raise click.BadParameter(f"expected {count} numbers, got {len(values)}", param_hint=name)
    if not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"expected finite numbers, got {text!r}", param_hint=name)
    return values


def _spacing(values):
    if not all(v > 0 for v in values):
        return "every voxel size must be > 0 mm"
    if min(values) < MIN_SPACING_MM:
        return spacing_too_fine(values)


def _ct_window(values):
    if not values[0] < values[1]:
        return "expected low,high HU with low < high (otherwise every voxel becomes one value)"


def _percentiles(values):
    if not 0 <= values[0] < values[1] <= 100:
        return "expected low,high with 0 <= low < high <= 100 (otherwise every voxel becomes one value)"


def _split(values):
    if not all(v >= 0 for v in values):
        return "fractions must be >= 0"
    if abs(sum(values) - 1.0) > 0.01 + 1e-9:
        return f"the train,val,test fractions must add up to 1, not {sum(values):g}"


def _numbers(count, check, ctx, param, text):
    """Click callback: `"a,b,c"` -> a tuple of ``count`` finite floats that pass ``check``."""
    name = param.opts[0]
    values = _floats(text, count, name)
    problem = check(values) if check else None
    if problem:
        raise click.BadParameter(f"{problem}, got {text!r}", param_hint=name)
    return values


def _shape(ctx, param, text):
    """Click callback: `"x,y,z"` (or one value for all three) -> three integers >= 8; `None` stays `None`."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 8:
        raise click.BadParameter(
            f"expected three integers >= 8 separated by commas, got {text!r}", param_hint=param.opts[0]
        )
    return values


@main.command(tensorflow=False)
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--anatomy",
    type=click.Choice(["cardiac", "abdomen"]),  # mkd_tf.data.phantoms.ANATOMIES
    default="cardiac",
    help="cardiac: MM-WHS 2017 layout (ct_train/, mr_train/); abdomen: two nnU-Net v2 raw datasets "
    "(liver, kidneys, spleen; CT vs T2 MRI, label ids differing between them).",
)
@click.option("--ct", "n_ct", type=click.IntRange(1), default=6, help="Number of CT cases.")
@click.option("--mr", "n_mr", type=click.IntRange(1), default=6, help="Number of MRI cases.")
@click.option(
    "--shape",
    default=None,
    callback=_shape,
    help="CT array shape x,y,z, integers >= 8 (MRI shape follows from its spacing); default 96,96,48 "
    "(cardiac) or 96,80,32 (abdomen).",
)
@click.option("--seed", type=click.IntRange(0), default=0, help="Random seed; the same seed writes the same data.")
def phantom(out, anatomy, n_ct, n_mr, shape, seed):
    """Write a synthetic cross-modality phantom (cardiac: MM-WHS 2017 layout; abdomen: nnU-Net v2) to OUT."""
    from mkd_tf.data.cache import check_parent_folders
    from mkd_tf.data.phantoms import write_phantom_dataset

    check_parent_folders(out, "the phantom")
    path, folders = write_phantom_dataset(anatomy, out, n_ct=n_ct, n_mr=n_mr, shape=shape, seed=seed)
    click.echo(f"phantom: {n_ct} CT + {n_mr} MRI cases in {path} ({folders[0]}/, {folders[1]}/)")


@main.command(tensorflow=False)
@click.option(
    "--target",
    required=True,
    type=click.Path(),
    help="Target-modality dataset (MM-WHS folder/root or nnU-Net v2 raw folder).",
)
@click.option("--assistant", required=True, type=click.Path(), help="Assistant-modality dataset (same layouts).")
@click.option("--out", required=True, type=click.Path(), help="Slice cache folder to create.")
@click.option("--target-modality", default="ct", help="Folder to read under an MM-WHS root for the target (ct_train/).")
@click.option(
    "--assistant-modality", default="mr", help="Folder to read under an MM-WHS root for the assistant (mr_train/)."
)
@click.option(
    "--structures",
    type=click.Choice(["all", "7", "4"]),
    default="all",
    help="MM-WHS: 7 structures, or 4 (MYO, LA, LV, AA as in SIFA/UMMKD; others become background).",
)
@click.option(
    "--ignore-unmatched", is_flag=True, help="Drop structures present in only one modality instead of failing."
)
@click.option(
    "--spacing",
    default="1.5",
    callback=partial(_numbers, 3, _spacing),
    help="Target voxel spacing in mm (> 0): one value or x,y,z (RAS order).",
)
@click.option(
    "--size",
    type=click.IntRange(8),
    default=256,
    help="Slice height and width after crop/pad around the body; a window that cuts off labelled voxels "
    "is an error unless --allow-crop.",
)
@click.option(
    "--allow-crop",
    is_flag=True,
    help="Accept a --size window that cuts off labelled voxels (reported per case and in the manifest); "
    "without it such a window is an error.",
)
@click.option("--axis", type=click.Choice(["axial", "coronal", "sagittal"]), default="axial", help="Slicing direction.")
@click.option(
    "--ct-window",
    default="-200,800",
    callback=partial(_numbers, 2, _ct_window),
    help="CT: HU range low,high (low < high) clipped and scaled to [-1, 1].",
)
@click.option(
    "--percentiles",
    default="0.5,99.5",
    callback=partial(_numbers, 2, _percentiles),
    help="Other modalities: clip percentiles low,high (0 <= low < high <= 100) before z-scoring.",
)
@click.option(
    "--split",
    default="0.6,0.2,0.2",
    callback=partial(_numbers, 3, _split),
    help="Target patient-level train,val,test fractions (>= 0, adding up to 1).",
)
@click.option(
    "--split-file",
    type=click.Path(),
    default=None,
    help='JSON {"target": {"train": [...], "val": [...], "test": [...], "exclude": [...]}, "assistant": {...}} '
    "(overrides --split); a role it names must list each of its cases, under exclude to leave one out.",
)
@click.option(
    "--target-labelled",
    "--target-labeled",
    "target_labelled",
    type=click.IntRange(0),
    default=None,
    help="Keep labels of only N target training cases (0 = unsupervised); default: all.",
)
@click.option("--seed", type=int, default=0, help="Seed of the split and of --target-labelled's choice.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing slice cache (only once the new one is complete); a folder that is not a "
    "slice cache is never replaced.",
)
def prepare(
    target,
    assistant,
    out,
    target_modality,
    assistant_modality,
    structures,
    ignore_unmatched,
    spacing,
    size,
    allow_crop,
    axis,
    ct_window,
    percentiles,
    split,
    split_file,
    target_labelled,
    seed,
    overwrite,
):
    """Preprocess TARGET and ASSISTANT datasets into a verified slice cache."""
    from mkd_tf.data.cache import SliceCache
    from mkd_tf.data.prepare import PrepareOptions, cache_summary, prepare_cache
    from mkd_tf.data.preprocess import PreprocessConfig

    options = PrepareOptions(
        target_modality=target_modality,
        assistant_modality=assistant_modality,
        structures=None if structures == "all" else int(structures),
        ignore_unmatched=ignore_unmatched,
        split=split,
        split_file=split_file,
        target_labelled=target_labelled,
        seed=seed,
        overwrite=overwrite,
        allow_crop=allow_crop,
        preprocess=PreprocessConfig(
            spacing=spacing,
            size=size,
            axis={"sagittal": 0, "coronal": 1, "axial": 2}[axis],
            ct_window=ct_window,
            percentiles=percentiles,
        ),
    )
    path = prepare_cache(target, assistant, out, options, progress=click.echo)
    click.echo(cache_summary(SliceCache(path)))


@main.command(tensorflow=False)
@click.argument("cache", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip SHA-256 verification (sizes are still checked).")
def info(cache, no_verify):
    """Print the summary of a slice cache: cases per split and modality, structures, voxel counts."""
    from mkd_tf.data.cache import SliceCache
    from mkd_tf.data.prepare import cache_summary

    click.echo(cache_summary(SliceCache(cache, verify=not no_verify)))
