"""How far a trained IAM moves the assistant's appearance towards the target's (run by hand; not a test).

    .venv/bin/python benchmarks/alignment_gap.py CACHE RUN [RUN ...] [--judge CT_RUN] [--out OUT --config TEXT]

For every structure (the cache's classes, background included) prints the mean intensity, and the
standard deviation within the structure (noise, bias field), of the network inputs: the assistant's
slices (MRI), the same slices through the run's generator G (aligned) and the target's slices (CT),
all from the cache, and how much of the assistant-target gap G closes on each structure's mean,
``1 - |aligned - target| / |assistant - target|`` (1: aligned looks like CT on average; 0: G changed
nothing; negative: further away), then that fraction averaged over the foreground structures (the
background is most of the pixels and the easiest to align). A run without an IAM is refused.

``--judge CT_RUN``: a run trained on the target (CT) only, e.g. ``target-only`` on a cache with every CT
training volume labelled. Its main predictor segments the assistant's slices, raw and through G, and its
mean foreground Dice against the assistant's labels is printed: how CT-like G's images are *to a CT
segmentor* -- anatomy kept and appearance converted together, which per-structure means cannot show
(a G that moves a boundary or keeps MRI's texture scores low here).

``--out OUT``: also write the record pair OUT.md / OUT.json with the standard header (``--config``: the
runs' settings; ``--trained-at``: the commit they were trained at).
"""

import argparse

import numpy as np
from paired_runs import add_record_arguments, write_record

from mkd_tf import metrics
from mkd_tf.data.cache import SliceCache
from mkd_tf.training import load_run


def structure_statistics(images, labels, num_classes):
    """Per class: (mean, std within the class) of ``images`` over ``labels == class``."""
    stats = []
    for value in range(num_classes):
        pixels = images[labels == value]
        stats.append((float(pixels.mean()), float(pixels.std())) if pixels.size else None)
    return stats


def aligned_images(model, images, batch=64):
    """The assistant's slices through G, in batches: ``(slices, height, width)``."""
    out = [
        model.alignment.assistant_to_target(images[start : start + batch, ..., None], training=False).numpy()[..., 0]
        for start in range(0, len(images), batch)
    ]
    return np.concatenate(out)


def gap_closed(raw, aligned, target):
    """Per structure, ``1 - |aligned - target| / |raw - target|`` of the means (``None`` where a structure
    is absent from the assistant or the target)."""
    return [
        None if a is None or t is None else 1 - abs(g[0] - t[0]) / max(abs(a[0] - t[0]), 1e-6)
        for a, g, t in zip(raw, aligned, target)
    ]


def judge_dice(judge, images, labels, num_classes, batch=64):
    """Mean foreground Dice (%) of ``judge``'s main predictor on ``images`` against ``labels`` (overlaps
    pooled over all slices, as validation Dice is)."""
    which = judge.predictor_names()[-1]
    overlaps = 0.0
    for start in range(0, len(images), batch):
        probabilities = judge.predict_probabilities(images[start : start + batch, ..., None], which)
        predicted = np.argmax(probabilities.numpy(), axis=-1)
        overlaps = overlaps + metrics.class_overlaps(predicted, labels[start : start + batch], num_classes)
    return 100.0 * float(np.mean(metrics.dice_of_overlaps(overlaps)[1:]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--judge", help="a run trained on the target only (see the module docstring)")
    add_record_arguments(parser)
    args = parser.parse_args()
    lines, results = [], {}

    def say(line=""):
        print(line)
        lines.append(line)

    judge = None
    if args.judge:
        judge, _, _ = load_run(args.judge)
    cache = SliceCache(args.cache)
    classes = cache.classes
    assistant = cache.images("assistant").astype(np.float32)
    assistant_labels = cache.labels("assistant")
    target = structure_statistics(cache.images("target"), cache.labels("target"), len(classes))
    raw = structure_statistics(assistant, assistant_labels, len(classes))
    for run in args.runs:
        model, _, _ = load_run(run)
        if getattr(model, "alignment", None) is None or not getattr(model, "use_iam", False):
            raise SystemExit(f"error: {run}: this run has no image alignment module")
        aligned_slices = aligned_images(model, assistant)
        aligned = structure_statistics(aligned_slices, assistant_labels, len(classes))
        say(f"\n{run}\n")
        say("| structure | MRI mean | aligned mean | CT mean | gap closed | MRI std | aligned std | CT std |")
        say("| --- | --- | --- | --- | --- | --- | --- | --- |")
        fractions = gap_closed(raw, aligned, target)
        structures = {}
        for name, a, g, t, fraction in zip(classes, raw, aligned, target, fractions):
            if fraction is None:
                continue
            cells = f"{a[0]:.2f} | {g[0]:.2f} | {t[0]:.2f} | {fraction:.2f} | {a[1]:.2f} | {g[1]:.2f} | {t[1]:.2f}"
            say(f"| {name} | {cells} |")
            structures[name] = {"mri": a, "aligned": g, "ct": t, "gap_closed": fraction}
        closed = float(np.mean([fraction for fraction in fractions[1:] if fraction is not None]))
        say(f"\ngap closed, mean over the foreground structures: {closed:.2f}")
        results[run] = {"structures": structures, "gap_closed": closed}
        if judge is not None:
            raw_dice = judge_dice(judge, assistant, assistant_labels, len(classes))
            aligned_dice = judge_dice(judge, aligned_slices, assistant_labels, len(classes))
            say(f"CT segmentor ({args.judge}) mean Dice on MRI {raw_dice:.1f}, on G(MRI) {aligned_dice:.1f}")
            results[run]["judge_dice"] = {"mri": raw_dice, "aligned": aligned_dice}
    if args.out:
        write_record(args.out, args.config, lines, {"results": results}, args.trained_at)


if __name__ == "__main__":
    main()
