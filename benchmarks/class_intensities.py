"""Mean network-input intensity per class, target vs assistant, in a slice cache (run by hand; not a test).

    .venv/bin/python benchmarks/class_intensities.py CACHE

Reads the labelled slices of both modalities of a `mkd prepare` cache (CT after its HU window, MRI after
percentile clipping and z-scoring: exactly what the networks see) and prints each class's mean ± sd per
modality and the classes from brightest to darkest. On the abdominal phantom the order reverses between
CT (liver > spleen > kidneys) and T2 MRI (kidneys > spleen > liver): an appearance gap that per-batch
intensity statistics cannot absorb.
"""

import argparse

import numpy as np

from mkd_tf.data.cache import SliceCache

ROLES = ("target", "assistant")


def class_means(cache):
    """`{class name: {role: (mean, sd) or None}}` over the labelled slices of each role."""
    table = {name: {} for name in cache.classes}
    for role in ROLES:
        rows = cache.indices(role, labelled=True)
        images, labels = np.asarray(cache.images(role))[rows], np.asarray(cache.labels(role))[rows]
        for index, name in enumerate(cache.classes):
            values = images[labels == index]
            table[name][role] = (float(values.mean()), float(values.std())) if values.size else None
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    args = parser.parse_args()
    cache = SliceCache(args.cache)
    table = class_means(cache)
    names = [cache.modality(role)["name"] for role in ROLES]
    print(f"| class | {names[0]} (target) | {names[1]} (assistant) |")
    print("| --- | --- | --- |")
    for name, row in table.items():
        cells = [f"{row[role][0]:+.2f} ± {row[role][1]:.2f}" if row[role] else "-" for role in ROLES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for role, modality in zip(ROLES, names):
        present = [name for name in cache.classes[1:] if table[name][role]]
        order = sorted(present, key=lambda name: -table[name][role][0])
        print(f"{role} ({modality}), brightest first: " + " > ".join(order))


if __name__ == "__main__":
    main()
