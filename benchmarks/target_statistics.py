"""Is what a run loses without the IAM its features, or S_syn's batch statistics? (run by hand on finished
MKD runs; not a test)

    .venv/bin/python benchmarks/target_statistics.py RUN [RUN ...] [--out OUT] [--config TEXT] [--trained-at COMMIT]

For each run (its best checkpoint) this scores S_syn, S_real and their ensemble on the CT test volumes
twice, with the same mean Dice as ``mkd evaluate``: as trained, and after recomputing every batch-norm
moving statistic a segmentor uses on CT from the CT training slices (AdaBN, Li et al. 2016): the mean of
its training-mode batch statistics over one epoch of training's own CT stream (augmented, batches of the
run's size), into the segmentor's target set (or its only set when it has one). No weight changes and no
label is read. With one shared set, S_syn's moving statistics mix the aligned MRI and the CT it trained
on; if a run without the IAM recovers here, what the IAM bought it was statistics that fit CT, not
features. Runs are grouped by their parent folder (the method in an ``mkd compare`` folder). Writes
OUT.json and OUT.md (the table, also printed).
"""

from pathlib import Path

import numpy as np
from ensemble_weights import score_runs, volume_dice, volume_probabilities  # also puts the project on sys.path

PREDICTORS = ("syn", "real", "ensemble")
BATCHES = 100  # one epoch of the benchmark


def recompute_target_statistics(model, batches):
    """Set each segmentor's CT moving statistics to the mean of its batch statistics over ``batches``
    (target image batches `(batch, height, width, 1)`, as training draws them)."""
    import keras

    from mkd_tf.models.cross_modality import TARGET_DOMAIN

    for segmentor in model.segmentors().values():
        # every layer at any depth (Keras 3's `layers` lists only the top level)
        layers = [layer for layer in segmentor._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
        momenta = [layer.momentum for layer in layers]
        for count, images in enumerate(batches):
            for layer in layers:
                layer.momentum = count / (count + 1)  # moving = running mean of the batch statistics
            # with one set per domain only the target set's layers run, so only they change
            segmentor(images, training=True, domain=model.domain_of(segmentor, TARGET_DOMAIN))
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def mean_test_dice(model, cache):
    """`{predictor: mean Dice}` on the test volumes."""
    from mkd_tf.evaluation import structure_indices

    structures = structure_indices(cache)
    scores = {name: [] for name in PREDICTORS}
    for volume, probabilities, reference, spacing in volume_probabilities(model, cache, "test"):
        # MKD's ensemble is the mean of the two softmaxes: computed here, not by a third pair of forward passes
        probabilities["ensemble"] = (probabilities["syn"] + probabilities["real"]) / 2
        for name in PREDICTORS:
            scores[name].append(volume_dice(probabilities[name], volume, reference, spacing, structures))
    return {name: float(np.mean(values)) for name, values in scores.items()}


def run_scores(run):
    """`{"trained": {predictor: Dice}, "target_statistics": {predictor: Dice}}` of one MKD run."""
    from mkd_tf.data.cache import SliceCache
    from mkd_tf.errors import fail
    from mkd_tf.inference import load_trained
    from mkd_tf.training import training_streams

    model, config, record = load_trained(run, "best")
    if config["method"] != "mkd":
        fail(run, f"is a {config['method']} run; this measures MKD's two segmentors")
    cache = SliceCache(record["path"])
    # training's target stream (all CT training slices, augmented, batch size as trained), one epoch
    stream = training_streams(cache, config, epoch=0)
    batches = [batch["target"]["image"] for batch in stream.take(BATCHES)]
    trained = mean_test_dice(model, cache)
    recompute_target_statistics(model, batches)
    return {"trained": trained, "target_statistics": mean_test_dice(model, cache)}


def table(results):
    header = " | ".join(f"{name} | {name}, CT statistics" for name in PREDICTORS)
    lines = [f"| run | {header} |", "| --- |" + " ---: |" * (2 * len(PREDICTORS))]
    for run, scores in results.items():
        cells = " | ".join(
            f"{100 * scores['trained'][n]:.1f} | {100 * scores['target_statistics'][n]:.1f}" for n in PREDICTORS
        )
        lines.append(f"| {run} | {cells} |")
    groups = {}
    for run, scores in results.items():
        groups.setdefault(Path(run).parent.name, []).append(scores)
    for group, members in groups.items():
        cells = []
        for name in PREDICTORS:
            for kind in ("trained", "target_statistics"):
                values = [100 * scores[kind][name] for scores in members]
                cells.append(f"{np.mean(values):.1f} ± {np.std(values):.1f}")
        lines.append(f"| **{group}** (mean ± std of {len(members)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    score_runs(__doc__, run_scores, table, "target_statistics")


if __name__ == "__main__":
    main()
