"""`mkd demo` / `make demo`: the whole path on the built-in phantom in a few minutes on a laptop CPU.

phantom (MM-WHS layout) -> prepare (48x48 slices at 3.2 mm, 1 labelled CT volume: the scarce-label
setting of the paper) -> train MKD briefly with small networks -> evaluate on the CT test volume ->
segment that volume with an overlay PNG to open -> export a TF Serving SavedModel
(saved_models/mkd-demo/N) -> convert to TFLite with a parity check.

The demo's networks and step budget are small so it finishes in minutes on 2 cores; 600 steps are about
enough for this phantom (82.7 % mean Dice over 3 seeds against 58.8 % at 300; the README's "Demo").
"""

from pathlib import Path

from mkd_tf.data.cache import SliceCache
from mkd_tf.data.phantom import write_phantom
from mkd_tf.data.prepare import PrepareOptions, cache_summary, prepare_cache
from mkd_tf.data.preprocess import PreprocessConfig
from mkd_tf.errors import fail
from mkd_tf.evaluation import evaluate_run
from mkd_tf.export.serving import MODELS_CONFIG, export_run, read_models_config
from mkd_tf.export.tflite import convert_to_tflite
from mkd_tf.files import check_parent_is_folder
from mkd_tf.inference import load_trained, predict_file
from mkd_tf.training import train

DEMO_TRAINING = {
    "method": "mkd",
    "data": {"batch_size": 8},
    # A 600-step budget (~3.5 min on 2 cores): 300 steps end on the steep part of the learning curve
    # (58.8 % against 82.7 % mean Dice over 3 seeds; README, "Demo"). A short warm start and a short
    # averaging horizon (the benchmark's 0.7 and 0.99 are for 1000 steps; measured at 300 steps).
    "schedule": {"epochs": 8, "steps_per_epoch": 75, "mkd_pretrain": 0.2},
    "optimizer": {"ema_momentum": 0.95},
    # The benchmark's batch norm and IAM settings (its defaults). Measured at this budget over 3 seeds
    # (README, "Demo"; benchmarks/demo_seeds.py): CycleGAN's IAM settings (skip_kernel 1, cycle 10,
    # structure 0) -1.4 +- 1.5 Dice; with them, one batch-norm set per segmentor -4.1 +- 1.2 on every seed.
    "segmentor": {"base_filters": 16, "depth": 3},
    "alignment": {"base_filters": 16, "num_blocks": 3, "disc_filters": 32, "disc_layers": 2},
}


def demo_cache(out, progress=print):
    """The demo's phantom and slice cache in folder `out` (made unless an earlier demo made them).

    Returns:
        (phantom folder, cache folder).
    """
    out = Path(out)
    phantom, cache = out / "phantom", out / "cache"
    if not (phantom / "mr_train").exists():
        progress(f"[1/7] phantom -> {phantom}")
        write_phantom(phantom, n_ct=6, n_mr=6, shape=(96, 96, 48), seed=0)
    if not (cache / "manifest.json").exists():
        progress(f"[2/7] prepare -> {cache}")
        options = PrepareOptions(
            target_labelled=1, seed=0, preprocess=PreprocessConfig(spacing=(3.2, 3.2, 3.2), size=48)
        )
        prepare_cache(phantom / "ct_train", phantom / "mr_train", cache, options)
    return phantom, cache


def demo_settings(steps_per_epoch=None, epochs=None, changes=None):
    """The demo's training settings (:data:`DEMO_TRAINING`) with another budget and/or `changes`
    (a nested dict of settings merged over them, e.g. ``{"seed": 1}``); a new dict."""
    settings = {k: dict(v) if isinstance(v, dict) else v for k, v in DEMO_TRAINING.items()}
    settings["schedule"].update(
        epochs=epochs or DEMO_TRAINING["schedule"]["epochs"],
        steps_per_epoch=steps_per_epoch or DEMO_TRAINING["schedule"]["steps_per_epoch"],
    )
    for key, value in (changes or {}).items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return settings


DEMO_MODEL = "mkd-demo"


def check_demo_paths(out, saved_models):
    """Refuse, before anything is written, a demo folder or SavedModel folder that cannot be written.

    The export comes after minutes of training, so its destination (``saved_models/mkd-demo`` and
    ``saved_models/models.config``) is checked first, as :func:`~mkd_tf.export.serving.export_run`
    would check it.

    Args:
        out: the demo folder (phantom, cache, run, outputs).
        saved_models: the folder the SavedModel's model folder goes in.
    """
    out, model_folder = Path(out), Path(saved_models) / DEMO_MODEL
    for folder, action in ((out, "create the demo folder"), (model_folder, "create the model folder")):
        if folder.exists() and not folder.is_dir():
            fail(folder, "exists and is not a folder")
        check_parent_is_folder(folder, action)
    if (model_folder.parent / MODELS_CONFIG).is_dir():
        fail(model_folder.parent / MODELS_CONFIG, "is a folder; mkd export writes the TF Serving model config there")
    if model_folder.parent.is_dir():
        read_models_config(model_folder.parent)  # an unreadable one fails now, not after training


def run_demo(out="demo", steps_per_epoch=None, epochs=None, progress=print, verbose=1, saved_models="saved_models"):
    """Run the demo into folder `out` (reusing what an earlier demo there already made); the
    SavedModel goes to `saved_models/mkd-demo/<next version>` and the TFLite file into `out`.

    Returns:
        dict of the paths made and the evaluation table.
    """
    out = Path(out)
    check_demo_paths(out, saved_models)
    out.mkdir(parents=True, exist_ok=True)
    phantom, cache = demo_cache(out, progress)
    run = out / "run"
    progress(cache_summary(SliceCache(cache)))
    progress(f"[3/7] train mkd -> {run}")
    train(cache, run, None, demo_settings(steps_per_epoch, epochs), verbose=verbose)
    progress(f"[4/7] evaluate {run} on the CT test volume")
    result = evaluate_run(run, "test")
    progress(result["table"])
    test_volume = next(v for v in SliceCache(cache).volumes("target") if v["split"] == "test")
    segmentation, overlay = out / f"{test_volume['case_id']}_mkd.nii.gz", out / "overlay.png"
    progress(f"[5/7] segment {test_volume['image']} -> {segmentation} and {overlay}")
    model, _, record = load_trained(run)
    predict_file(model, record, test_volume["image"], segmentation, "ensemble", overlay)
    progress(f"[6/7] export the ensemble -> {saved_models}/{DEMO_MODEL}")
    exported = export_run(run, Path(saved_models) / DEMO_MODEL)
    progress(f"SavedModel {exported['path']} (version {exported['version']}); {exported['models_config']}")
    tflite_path = out / f"{DEMO_MODEL}.tflite"
    progress(f"[7/7] TFLite -> {tflite_path}")
    converted = convert_to_tflite(exported["path"], tflite_path, "none", report=progress)
    progress(f"wrote {converted['path']} ({converted['bytes'] / 1024:.1f} KiB)")
    return {
        "phantom": str(phantom),
        "cache": str(cache),
        "run": str(run),
        "logs": str(run / "logs"),
        "table": result["table"],
        "segmentation": str(segmentation),
        "overlay": str(overlay),
        "savedmodel": exported["path"],
        "tflite": str(converted["path"]),
    }
