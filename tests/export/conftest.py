"""Session fixtures of the export tests: one phantom, one slice cache, two tiny trained runs, their exports.

- ``mkd_run``: MKD (S_syn, S_real, ensemble) trained for two steps: an untrained-looking model, fine for
  checking that every deployment path computes exactly what the in-process model computes.
- ``confident_run``: a target-only segmentor (8 base filters) trained for 300 steps. The TFLite parity
  thresholds (Dice agreement 0.99 / 0.97 for int8) are about quantisation noise; on a near-uniform
  two-step model every pixel is a near-tie and int8 flips most of them, which would test nothing but
  the noise. This run's predictions are confident and cover all seven structures on the test case.

Slices are 32 x 32 at 3.2 mm in-plane (a 48 x 48 x 16 phantom), so the structures are several pixels
wide; five CT cases give a 3 / 1 / 1 train / val / test split. The 32 x 32 window cuts off a few
labelled voxels of two cases (14 and 21), accepted with ``allow_crop`` to keep the fixtures small.

The phantom, the cache and the two runs are built once per session and shared by the xdist workers
(:mod:`tests.scripts.session_folders`): the export test files land on both workers of `make test`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tests.scripts import tiny_runs  # noqa: E402
from tests.scripts.session_folders import shared_folder  # noqa: E402

TINY_ALIGNMENT = {"base_filters": 4, "num_blocks": 1, "disc_filters": 4, "disc_layers": 2}


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    from mkd_tf.data.phantom import write_phantom

    def build(folder):
        write_phantom(folder / "data", n_ct=5, n_mr=2, shape=(48, 48, 16))

    return shared_folder(tmp_path_factory, "export_phantom", build)[0] / "data"


@pytest.fixture(scope="session")
def ct_image(phantom):
    """A target-modality (CT) NIfTI in its own units (HU), as `mkd predict` would get it."""
    from pathlib import Path

    return sorted(Path(phantom, "ct_train").glob("*_image.nii.gz"))[-1]


@pytest.fixture(scope="session")
def cache(phantom, tmp_path_factory):
    from mkd_tf.data.prepare import PrepareOptions, prepare_cache
    from mkd_tf.data.preprocess import PreprocessConfig

    options = PrepareOptions(preprocess=PreprocessConfig(spacing=(3.2, 3.2, 7.5), size=32), allow_crop=True)

    def build(folder):
        prepare_cache(f"{phantom}/ct_train", f"{phantom}/mr_train", folder / "cache", options)

    return shared_folder(tmp_path_factory, "export_cache", build)[0] / "cache"


@pytest.fixture(scope="session")
def mkd_run(cache, tmp_path_factory):
    from mkd_tf.training import train

    def build(run):
        # Eager steps: tracing the two step functions would cost ~25 s of the session for two steps, and
        # the exports compute the same either way (the compiled loop is tested on the main MKD run).
        with tiny_runs.eager():
            train(
                cache,
                run,
                overrides={
                    "schedule": {"epochs": 1, "steps_per_epoch": 2},
                    "data": {"batch_size": 2},
                    "segmentor": {"base_filters": 4, "depth": 2},
                    "alignment": TINY_ALIGNMENT,
                },
                verbose=0,
            )

    return shared_folder(tmp_path_factory, "export_mkd_run", build)[0]


@pytest.fixture(scope="session")
def confident_run(cache, tmp_path_factory):
    from mkd_tf.training import train

    def build(run):
        train(
            cache,
            run,
            overrides={
                "method": "target-only",
                "schedule": {"epochs": 6, "steps_per_epoch": 50},
                "data": {"batch_size": 8, "augment": False},
                "optimizer": {"segmentor_lr": 1e-2},
                "segmentor": {"base_filters": 8, "depth": 2},
            },
            verbose=0,
        )

    return shared_folder(tmp_path_factory, "export_confident_run", build)[0]


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """The shared saved_models/ root of the session's exports."""
    return tmp_path_factory.mktemp("deploy") / "saved_models"


@pytest.fixture(scope="session")
def mkd_export(mkd_run, saved_models):
    """`mkd export` of the MKD ensemble: dict from :func:`export_run` (``path`` = saved_models/heart/1)."""
    from mkd_tf.export.serving import export_run

    return export_run(mkd_run, saved_models / "heart")


@pytest.fixture(scope="session")
def confident_export(confident_run, saved_models):
    from mkd_tf.export.serving import export_run

    return export_run(confident_run, saved_models / "confident")


@pytest.fixture(scope="session")
def loaded_mkd(mkd_run):
    """`(model, config, record)` of the MKD run, in process."""
    from mkd_tf.training import load_run

    return load_run(mkd_run)
