"""Would a weighted ensemble lift MKD above S_real? (run by hand on finished MKD runs; not a test).

    .venv/bin/python benchmarks/ensemble_weights.py RUN [RUN ...] [--out OUT] [--config TEXT] [--trained-at COMMIT]

MKD's ensemble is the mean of S_syn's and S_real's softmax (the paper's). For each run (its best
checkpoint) this scores ``w * p_real + (1 - w) * p_syn`` for several ``w`` on the validation and the test
volumes, with the same mean Dice as ``mkd evaluate`` (original grid, mean over structures, then over
volumes; ``w = 0.5`` reproduces the ``mkd`` row of ``mkd compare`` and ``w = 1`` its ``[real]`` row).
It also scores the honest way to choose ``w``: the one with the best validation Dice, applied to the
test volumes. Writes the record pair OUT.md and OUT.json (the table, also printed).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WEIGHTS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)  # weight of S_real


def volume_probabilities(model, cache, split, predictors=("syn", "real")):
    """Yield `(volume, {predictor: (slices, height, width, classes) softmax}, reference, spacing)` for every
    labelled target volume of ``split``, as ``mkd evaluate`` reads them."""
    import tensorflow as tf

    from mkd_tf.evaluation import labelled_volumes

    for volume, slices, reference, spacing in labelled_volumes(cache, split):
        slices = np.asarray(slices, np.float32)[..., None]
        probabilities = {
            which: np.concatenate(
                [
                    np.asarray(model.predict_probabilities(tf.constant(slices[i : i + 16]), which))
                    for i in range(0, len(slices), 16)
                ]
            )
            for which in predictors
        }
        yield volume, probabilities, reference, spacing


def volume_dice(probabilities, volume, reference, spacing, structures):
    """Mean Dice over the structures of one volume's softmax, on its original grid (as ``mkd evaluate``)."""
    from mkd_tf import metrics
    from mkd_tf.data.preprocess import labels_to_original

    labels = labels_to_original(np.argmax(probabilities, -1).astype(np.uint8), volume["inverse"])
    scores = metrics.evaluate_volume(labels, reference, spacing, structures)
    return float(np.mean([s["dice"] for s in scores.values()]))


def weighted_dice(run, weights=WEIGHTS):
    """`{split: {w: mean Dice}}` of the run's best checkpoint on its cache's labelled target volumes."""
    from mkd_tf.data.cache import SliceCache
    from mkd_tf.evaluation import structure_indices
    from mkd_tf.inference import load_trained

    model, _, record = load_trained(run, "best")
    cache = SliceCache(record["path"])
    structures = structure_indices(cache)
    result = {}
    for split in ("val", "test"):
        per_weight = {w: [] for w in weights}
        for volume, probabilities, reference, spacing in volume_probabilities(model, cache, split):
            for w in weights:
                mixed = w * probabilities["real"] + (1 - w) * probabilities["syn"]
                per_weight[w].append(volume_dice(mixed, volume, reference, spacing, structures))
        result[split] = {w: float(np.mean(values)) for w, values in per_weight.items()}
    return result


def table(results, weights=WEIGHTS):
    lines = [
        "| run | split | " + " | ".join(f"w={w}" for w in weights) + " | w by val → test |",
        "| --- | --- | " + " | ".join("---:" for _ in weights) + " | ---: |",
    ]
    for run, result in results.items():
        chosen = max(weights, key=lambda w: result["val"][w])
        for split in ("val", "test"):
            cells = " | ".join(f"{100 * result[split][w]:.1f}" for w in weights)
            last = f"{100 * result['test'][chosen]:.1f} (w={chosen})" if split == "test" else ""
            lines.append(f"| {run} | {split} | {cells} | {last} |")
    for split in ("val", "test"):
        means = " | ".join(f"{100 * np.mean([r[split][w] for r in results.values()]):.1f}" for w in weights)
        chosen = np.mean([r["test"][max(weights, key=lambda w: r["val"][w])] for r in results.values()])
        lines.append(
            f"| mean | {split} | {means} | {100 * chosen:.1f} |"
            if split == "test"
            else f"| mean | {split} | {means} | |"
        )
    return "\n".join(lines) + "\n"


def score_runs(description, score_run, make_table, default_out):
    """The command line of a script that scores finished MKD runs: ``RUN [RUN ...] [--out OUT] [--config TEXT]
    [--trained-at COMMIT]``; prints ``make_table({run: score_run(run)})`` and writes the record pair OUT.md
    (the standard header, then the table) and OUT.json (the header, then the scores). A bad run folder ends
    it with one ``error:`` line, as the CLI does."""
    from paired_runs import add_record_arguments, write_record

    from mkd_tf.errors import MkdError

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished MKD run folders")
    add_record_arguments(parser, out_default=str(ROOT / "benchmarks" / "results" / default_out))
    args = parser.parse_args()
    try:
        results = {run: score_run(run) for run in args.runs}
    except MkdError as error:
        sys.exit(f"error: {error}")
    text = make_table(results)
    print(text)
    write_record(args.out, args.config, text.splitlines(), {"results": results}, args.trained_at)


def main():
    score_runs(__doc__, weighted_dice, table, "ensemble_weights")


if __name__ == "__main__":
    main()
