"""Data commands: phantom, prepare, info."""

import click

from mkd_cli.main import main


def _floats(text, count, name):
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}", param_hint=name)
    if len(values) == 1 and count > 1:
        values = values * count
    if len(values) != count:
        raise click.BadParameter(f"expected {count} numbers, got {len(values)}", param_hint=name)
    return values


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--ct", "n_ct", type=click.IntRange(1), default=6, help="Number of CT cases.")
@click.option("--mr", "n_mr", type=click.IntRange(1), default=6, help="Number of MRI cases.")
@click.option("--shape", default="96,96,48", help="CT array shape x,y,z (MRI shape follows from its spacing).")
@click.option("--seed", type=int, default=0, help="Random seed; the same seed writes the same data.")
def phantom(out, n_ct, n_mr, shape, seed):
    """Write the synthetic cross-modality cardiac phantom (MM-WHS 2017 layout) to OUT."""
    from mkd_tf.data.phantom import write_phantom

    shape = tuple(int(v) for v in _floats(shape, 3, "--shape"))
    path = write_phantom(out, n_ct=n_ct, n_mr=n_mr, shape=shape, seed=seed)
    click.echo(f"phantom: {n_ct} CT + {n_mr} MRI cases in {path} (ct_train/, mr_train/)")


@main.command()
@click.option("--target", required=True, type=click.Path(), help="Target-modality dataset (MM-WHS folder/root or nnU-Net v2 raw folder).")
@click.option("--assistant", required=True, type=click.Path(), help="Assistant-modality dataset (same layouts).")
@click.option("--out", required=True, type=click.Path(), help="Slice cache folder to create.")
@click.option("--target-modality", default="ct", help="Folder to read under an MM-WHS root for the target (ct_train/).")
@click.option("--assistant-modality", default="mr", help="Folder to read under an MM-WHS root for the assistant (mr_train/).")
@click.option("--structures", type=click.Choice(["all", "7", "4"]), default="all",
              help="MM-WHS: 7 structures, or 4 (MYO, LA, LV, AA as in SIFA/UMMKD; others become background).")
@click.option("--ignore-unmatched", is_flag=True, help="Drop structures present in only one modality instead of failing.")
@click.option("--spacing", default="1.5", help="Target voxel spacing in mm: one value or x,y,z (RAS order).")
@click.option("--size", type=click.IntRange(8), default=256, help="Slice height and width after crop/pad around the body.")
@click.option("--axis", type=click.Choice(["axial", "coronal", "sagittal"]), default="axial", help="Slicing direction.")
@click.option("--ct-window", default="-200,800", help="CT: HU range clipped and scaled to [-1, 1].")
@click.option("--percentiles", default="0.5,99.5", help="Other modalities: clip percentiles before z-scoring.")
@click.option("--split", default="0.6,0.2,0.2", help="Target patient-level train,val,test fractions.")
@click.option("--split-file", type=click.Path(), default=None,
              help='JSON {"target": {"train": [...], "val": [...], "test": [...]}, "assistant": {...}} (overrides --split).')
@click.option("--target-labeled", type=click.IntRange(0), default=None,
              help="Keep labels of only N target training cases (0 = unsupervised); default: all.")
@click.option("--seed", type=int, default=0, help="Seed of the split and of --target-labeled's choice.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache (only once the new one is complete).")
def prepare(target, assistant, out, target_modality, assistant_modality, structures, ignore_unmatched, spacing,
            size, axis, ct_window, percentiles, split, split_file, target_labeled, seed, overwrite):
    """Preprocess TARGET and ASSISTANT datasets into a verified slice cache."""
    from mkd_tf.data.cache import SliceCache
    from mkd_tf.data.prepare import PrepareOptions, cache_summary, prepare_cache
    from mkd_tf.data.preprocess import PreprocessConfig

    options = PrepareOptions(
        target_modality=target_modality, assistant_modality=assistant_modality,
        structures=None if structures == "all" else int(structures), ignore_unmatched=ignore_unmatched,
        split=_floats(split, 3, "--split"), split_file=split_file, target_labeled=target_labeled, seed=seed,
        overwrite=overwrite,
        preprocess=PreprocessConfig(spacing=_floats(spacing, 3, "--spacing"), size=size,
                                    axis={"sagittal": 0, "coronal": 1, "axial": 2}[axis],
                                    ct_window=_floats(ct_window, 2, "--ct-window"),
                                    percentiles=_floats(percentiles, 2, "--percentiles")))
    path = prepare_cache(target, assistant, out, options, progress=click.echo)
    click.echo(cache_summary(SliceCache(path)))


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip SHA-256 verification (sizes are still checked).")
def info(cache, no_verify):
    """Print the summary of a slice cache: cases per split and modality, structures, voxel counts."""
    from mkd_tf.data.cache import SliceCache
    from mkd_tf.data.prepare import cache_summary

    click.echo(cache_summary(SliceCache(cache, verify=not no_verify)))
