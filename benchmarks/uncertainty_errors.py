"""Are the uncertain voxels of `mkd predict --uncertainty` where the errors are? (run by hand; not a test)

    .venv/bin/python benchmarks/uncertainty_errors.py RUN [--cache CACHE] [--split test] [--checkpoint best]

Each labelled target volume of the split (the cache the run was trained on by default) is predicted
from its own NIfTI file as `mkd predict` does (:func:`mkd_tf.inference.predict_volume`, ensemble), on
the file's grid, and compared voxel by voxel with its label file. Counted region: the voxels within
``--margin`` voxels (default 2) of the reference's or the prediction's foreground (26-connected
dilation), i.e. the heart and its surroundings: outside it nearly every voxel is air or body that any
predictor calls background, and they would inflate "the rest" with easy voxels. In that region the
voxels are split at the 90th percentile of the uncertainty (pooled over the split's volumes) and the
error rate (prediction != reference) is printed for the top decile and for the rest, with the share
of all errors the top decile holds. Three measures are compared: the one `--uncertainty` writes
(entropy of the ensemble's mean softmax), the segmentors' disagreement alone (Jensen-Shannon
divergence between S_syn and S_real) and S_real's own entropy. ``--whole-volume`` counts every voxel.
"""

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from mkd_tf.data.cache import SliceCache
from mkd_tf.data.nifti import load_image
from mkd_tf.data.preprocess import PreprocessConfig, labels_to_original, preprocess_image
from mkd_tf.evaluation import labelled_volumes
from mkd_tf.files import read_json
from mkd_tf.inference import load_trained, predict_volume, predictive_entropy


def measures(model, slices, batch_size=16):
    """Per-pixel class indices of the ensemble and three uncertainty measures on preprocessed slices."""
    indices, shipped, disagreement, real_entropy = [], [], [], []
    for start in range(0, len(slices), batch_size):
        batch = np.asarray(slices[start : start + batch_size, ..., None], np.float32)
        syn = np.asarray(model.predict_probabilities(batch, "syn"), np.float64)
        real = np.asarray(model.predict_probabilities(batch, "real"), np.float64)
        mean = (syn + real) / 2.0
        indices.append(np.argmax(mean, axis=-1))
        shipped.append(predictive_entropy(mean))
        disagreement.append(predictive_entropy(mean) - (predictive_entropy(syn) + predictive_entropy(real)) / 2.0)
        real_entropy.append(predictive_entropy(real))
    return [np.concatenate(parts) for parts in (indices, shipped, disagreement, real_entropy)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--cache", default=None, help="slice cache [default: the run's]")
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--margin", type=int, default=2, help="dilation of the foreground, in voxels (>= 0)")
    parser.add_argument("--whole-volume", action="store_true", help="count every voxel instead")
    args = parser.parse_args()
    model, _, record = load_trained(args.run, args.checkpoint)
    cache = SliceCache(args.cache or read_json(Path(args.run) / "cache.json")["path"])
    config = PreprocessConfig.from_dict(record["preprocess"])
    names = ("entropy of the ensemble (--uncertainty)", "S_syn/S_real disagreement (JSD)", "S_real entropy")
    pooled = {name: [] for name in names}
    errors, volumes = [], 0
    for volume, _, reference, _ in labelled_volumes(cache, args.split):
        image = load_image(volume["image"])
        slices, params = preprocess_image(image, record["target_intensity"], config)
        indices, *maps = measures(model, slices)
        prediction = labels_to_original(indices.astype(np.uint8), params)
        on_grid = [labels_to_original(m.astype(np.float32), params) for m in maps]
        if volumes == 0:  # the measure shipped is exactly what `mkd predict --uncertainty` writes
            _, written = predict_volume(model, image, record, "ensemble", uncertainty=True)
            np.testing.assert_allclose(written, on_grid[0], atol=1e-5)
        region = (reference > 0) | (prediction > 0)
        if args.whole_volume:
            region = np.ones_like(region)
        elif args.margin > 0:  # (scipy dilates until nothing changes with iterations=0)
            region = ndimage.binary_dilation(region, structure=np.ones((3, 3, 3)), iterations=args.margin)
        errors.append((prediction != reference)[region])
        for name, values in zip(names, on_grid):
            pooled[name].append(values[region])
        volumes += 1
    wrong = np.concatenate(errors)
    print(f"{volumes} {args.split} volumes, {wrong.size} voxels in the region, overall error rate {wrong.mean():.4f}")
    print("| measure | error rate, top 10% uncertain | error rate, other 90% | ratio | errors in the top 10% |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        values = np.concatenate(pooled[name])
        # Ties at the threshold (e.g. many exact zeros) are broken by a stable rank, so the top decile is 10%.
        order = np.argsort(-values, kind="stable")
        top = np.zeros(values.size, bool)
        top[order[: max(1, values.size // 10)]] = True
        high, rest = wrong[top].mean(), wrong[~top].mean()
        share = wrong[top].sum() / max(wrong.sum(), 1)
        print(f"| {name} | {high:.4f} | {rest:.4f} | {high / max(rest, 1e-12):.1f}x | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
