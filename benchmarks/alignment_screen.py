"""Screen IAM settings in minutes: train MKD's image alignment module alone and follow the gap it closes.

    .venv/bin/python benchmarks/alignment_screen.py CACHE [--config CFG.yaml] [--set loss.cycle=1 ...]
        [--steps 1000] [--every 250] [--seed 0] [--no-augment]

Builds the MKD model of the config (defaults <- CFG <- ``--set`` overrides, as ``mkd train`` does) and runs
only the IAM's part of its step: :meth:`~mkd_tf.models.mkd.MKDModel.alignment_losses` (adversarial +
cycle) with the generator and discriminator optimizers, on the same batch stream ``mkd train`` uses
(:func:`~mkd_tf.data.pipeline.training_dataset`, augmented unless ``--no-augment``). This is MKD's warm
start without the segmentors, and about 10x cheaper than a Dice run. Every ``--every`` steps it prints
the fraction of the MRI-CT gap G closes (mean over the foreground structures, as
``benchmarks/alignment_gap.py``), the mean within-structure std of G's output (noise; CT's is about 0.1)
and the losses. It does not train S_syn, so the segmentation loss that MKD also sends into G after the
warm start is absent: a setting that aligns here still needs a Dice run.
"""

import argparse
import time

import keras
import numpy as np
import tensorflow as tf
import yaml
from alignment_gap import aligned_images, gap_closed, structure_statistics

from mkd_tf.config import load_config
from mkd_tf.data.cache import SliceCache
from mkd_tf.data.pipeline import training_dataset
from mkd_tf.training import build_method


def parse_overrides(pairs):
    """``["loss.cycle=1", ...]`` -> ``{"loss": {"cycle": 1}}`` (values read as YAML scalars)."""
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        section, _, name = key.rpartition(".")
        target = overrides.setdefault(section, {}) if section else overrides
        target[name] = yaml.safe_load(value)
    return overrides


def alignment_summary(model, assistant, assistant_labels, raw, target, num_classes):
    """(mean gap closed over the foreground, mean within-structure std of G's output)."""
    aligned = structure_statistics(aligned_images(model, assistant), assistant_labels, num_classes)
    closed = [fraction for fraction in gap_closed(raw, aligned, target)[1:] if fraction is not None]
    return float(np.mean(closed)), float(np.mean([stats[1] for stats in aligned[1:] if stats is not None]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true")
    args = parser.parse_args()

    config = load_config(args.config, {"method": "mkd", **parse_overrides(args.set)})
    keras.utils.set_random_seed(args.seed)
    cache = SliceCache(args.cache)
    classes = cache.num_classes
    model = build_method(config, classes)
    model.build_for((cache.size, cache.size, 1))
    groups = model.optimizers()
    for name in ("generators", "discriminators"):
        optimizer, variables = groups[name]
        optimizer.build(variables)

    @tf.function
    def alignment_step(batch):
        assistant, target = batch["assistant"]["image"], batch["target"]["image"]
        logs = {}
        with tf.GradientTape(persistent=True) as tape:
            aligned = model.alignment.assistant_to_target(assistant, training=True)
            generator_loss = model.alignment_losses(assistant, target, aligned, logs)
        model.step(tape, generator_loss, "generators")
        model.step(tape, logs["discriminator"], "discriminators")
        return logs

    assistant = cache.images("assistant").astype(np.float32)
    assistant_labels = cache.labels("assistant")
    raw = structure_statistics(assistant, assistant_labels, classes)
    target = structure_statistics(cache.images("target"), cache.labels("target"), classes)
    batches = iter(training_dataset(cache, config["data"]["batch_size"], augment=not args.no_augment, seed=args.seed))
    print("| step | gap closed | aligned std | adversarial | cycle | discriminator | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    start = time.time()
    for step in range(1, args.steps + 1):
        logs = alignment_step(next(batches))
        if step % args.every == 0:
            closed, std = alignment_summary(model, assistant, assistant_labels, raw, target, classes)
            losses = " | ".join(f"{float(logs[key]):.3f}" for key in ("adversarial", "cycle", "discriminator"))
            print(f"| {step} | {closed:.2f} | {std:.2f} | {losses} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
