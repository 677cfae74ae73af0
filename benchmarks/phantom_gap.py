"""The phantom's appearance gap between CT and MRI, measured per tissue (run by hand; not a test).

    .venv/bin/python benchmarks/phantom_gap.py --cases 6

Prints mean ± std (over cases) of each tissue's mean intensity in CT (HU) and MRI (a.u.), and the
same after the preprocessing `mkd prepare` applies (CT window -> [-1, 1], MRI percentile clip +
z-score), which is what the networks see. The ordering flips between modalities: in CT fat is
darker than myocardium and blood is brightest; in MRI fat and blood are bright, myocardium dark.
"""

import argparse

import numpy as np

from mkd_tf.data.phantom import TISSUES, phantom_case
from mkd_tf.data.preprocess import PreprocessConfig, normalise_intensity

SHOWN = ("air", "lung", "fat", "soft_tissue", "myocardium", "left_ventricle", "bone")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = PreprocessConfig()
    rows = {}
    for modality in ("ct", "mr"):
        for number in range(args.cases):
            case = phantom_case(modality, number + 1, seed=args.seed)
            normalised, _ = normalise_intensity(
                case.image.astype(np.float32), "ct" if modality == "ct" else "zscore", config
            )
            for tissue in SHOWN:
                mask = case.tissues == TISSUES[tissue]
                if mask.any():
                    rows.setdefault((tissue, modality), []).append(
                        (float(case.image[mask].mean()), float(normalised[mask].mean()))
                    )
    print("| tissue | CT (HU) | MRI (a.u.) | CT, network input | MRI, network input |")
    print("| --- | --- | --- | --- | --- |")
    for tissue in SHOWN:
        cells = []
        for column in (0, 1):
            for modality in ("ct", "mr"):
                values = np.array([v[column] for v in rows.get((tissue, modality), [])])
                cells.append(
                    f"{values.mean():.{0 if column == 0 else 2}f} ± {values.std():.{0 if column == 0 else 2}f}"
                    if values.size
                    else "-"
                )
        print(f"| {tissue} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
