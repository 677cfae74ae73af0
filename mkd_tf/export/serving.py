"""`mkd export`: a trained run -> a self-contained TensorFlow Serving SavedModel.

Layout written by :func:`export_run` (``out = saved_models/NAME``)::

    saved_models/models.config                       TF Serving --model_config_file, every model below
    saved_models/NAME/<version>/saved_model.pb       graph with the two signatures below
    saved_models/NAME/<version>/variables/           the chosen predictor's segmentor weights only
    saved_models/NAME/<version>/assets.extra/tf_serving_warmup_requests
                                                     TFRecord of PredictionLog (serving_default, batch 1, 4, 16)
    saved_models/NAME/<version>/assets.extra/mkd_model.json
                                                     classes, label values, preprocessing, method, predictor

The SavedModel is written with ``keras.export.ExportArchive`` and holds plain TensorFlow functions and
variables: ``tf.saved_model.load`` (or TF Serving, or the TFLite converter) reads it without mkd_tf.

Signatures (``H = W = size`` of the run's slice cache, e.g. 256; ``batch`` is dynamic):

``serving_default`` -- the model on preprocessed slices (what `mkd predict` feeds the network).
    Inputs: ``image`` float32 `(batch, H, W, 1)`: target-modality slices already resampled to the
    cache's spacing, cropped to ``H x W`` and intensity-normalised exactly like the cache (CT: HU
    window scaled to [-1, 1]; other modalities: percentile clip + z-score per volume).
    Outputs: ``probabilities`` float32 `(batch, H, W, classes)` (softmax of the chosen predictor;
    ``ensemble`` = mean of the S_syn and S_real softmaxes) and ``labels`` int32 `(batch, H, W)`
    (argmax: class indices 0..classes-1). Static H and W so TFLite / XLA get static shapes.

``segment_slices`` -- raw slices in, label values out (for clients that do not preprocess).
    Inputs: ``image`` float32 `(batch, h, w, 1)` in the modality's own units (e.g. HU), any ``h, w``:
    slices that cover the model's field of view (``size * spacing`` mm in-plane, e.g. 256 x 1.5 mm),
    at any pixel count. In the graph: intensity normalisation (CT: clip to the recorded HU window and
    scale to [-1, 1]; z-scored modalities: percentile clip at the cache's percentiles and z-score, with
    the statistics computed over ALL voxels of the request -- send a whole volume's slices in one
    request to match `mkd predict`, which computes them per volume), bilinear resize to ``H x W``,
    the predictor, argmax, nearest-neighbour resize of the class map back to ``h x w``, and a
    ``tf.gather`` on a constant table mapping class indices to the dataset's label values.
    Outputs: ``labels`` int32 `(batch, h, w)` in the ORIGINAL label values (e.g. 0, 205, ..., 850).

Versions: ``--version`` defaults to the next free integer; an existing version is never overwritten.
A version folder appears atomically (written into a hidden sibling, then renamed): TF Serving, which
polls ``base_path`` for integer-named folders, never sees a half-written model.
"""

import json
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mkd_tf.errors import MkdError, fail
from mkd_tf.files import read_json, write_text_atomic

FORMAT = "mkd-serving-model"
FORMAT_VERSION = 1
#: name of the JSON asset inside ``assets.extra/``
MODEL_ASSET = "mkd_model.json"
#: file name TF Serving looks for (``assets.extra/tf_serving_warmup_requests``)
WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_BATCH_SIZES = (1, 4, 16)
MODELS_CONFIG = "models.config"
DEFAULT_SERVING_ROOT = "/models"
# TF Serving accepts any name, but it goes into URLs (/v1/models/NAME) and into models.config.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

SIGNATURE_DOCS = {
    "serving_default": {
        "inputs": {"image": "float32 (batch, H, W, 1): preprocessed target slices (cache spacing, crop, "
                            "intensity normalisation)"},
        "outputs": {"probabilities": "float32 (batch, H, W, classes): softmax of the predictor",
                    "labels": "int32 (batch, H, W): class indices (argmax)"},
    },
    "segment_slices": {
        "inputs": {"image": "float32 (batch, h, w, 1): raw slices in the modality's units (e.g. HU) covering "
                            "size*spacing mm; any h, w"},
        "outputs": {"labels": "int32 (batch, h, w): original label values (e.g. 0, 205, ..., 850)"},
        "normalisation": "CT: clip to window, scale to [-1, 1]; zscore: percentile clip + z-score with "
                         "statistics over all voxels of the request",
    },
}


def resolve_predictor(model, which):
    """The predictor name to export: ``which``, or for single-segmentor runs ``ensemble`` -> the one segmentor."""
    names = model.predictor_names()
    if which == "ensemble" and which not in names:
        which = names[-1]
    if which not in names:
        raise MkdError(f"--which {which}: this run has {', '.join(names)}")
    return which


def existing_versions(model_dir):
    """Sorted integer version folders of a TF Serving model folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def read_model_asset(version_dir):
    """The ``assets.extra/mkd_model.json`` of an exported version folder."""
    path = Path(version_dir) / "assets.extra" / MODEL_ASSET
    if not path.exists():
        fail(version_dir, f"not an mkd export (no assets.extra/{MODEL_ASSET}); use a saved_models/NAME/<version> folder")
    asset = read_json(path)
    if asset.get("format") != FORMAT:
        fail(path, f"not an {FORMAT} asset")
    return asset


def probability_function(segmentors, which):
    """`images (batch, H, W, 1) -> probabilities (batch, H, W, classes)` of one predictor.

    The same arithmetic as :meth:`CrossModalityModel.predict_probabilities` (mean of softmaxes for
    ``ensemble``), written against the segmentors only so that nothing else is exported.
    """
    import tensorflow as tf

    chosen = list(segmentors.values()) if which == "ensemble" else [segmentors[which]]

    def probabilities(images):
        softmaxes = [tf.nn.softmax(segmentor(images, training=False), axis=-1) for segmentor in chosen]
        return tf.add_n(softmaxes) / float(len(softmaxes)) if len(softmaxes) > 1 else softmaxes[0]

    return chosen, probabilities


def _percentile(sorted_values, q):
    """numpy's default (linear) percentile of a sorted 1-D float64 tensor."""
    import tensorflow as tf

    count = tf.shape(sorted_values, out_type=tf.int64)[0]
    position = tf.cast(count - 1, tf.float64) * (q / 100.0)
    low = tf.cast(tf.floor(position), tf.int64)
    high = tf.minimum(low + 1, count - 1)
    fraction = position - tf.cast(low, tf.float64)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def normalise_in_graph(images, intensity, percentiles):
    """The cache's intensity normalisation on raw slices, as TensorFlow ops (see module docstring)."""
    import tensorflow as tf

    if intensity["kind"] == "ct":
        low, high = (float(v) for v in intensity["window"])
        return (tf.clip_by_value(images, low, high) - low) / (high - low) * 2.0 - 1.0
    values = tf.sort(tf.reshape(tf.cast(images, tf.float64), [-1]))
    low, high = _percentile(values, float(percentiles[0])), _percentile(values, float(percentiles[1]))
    clipped = tf.clip_by_value(tf.cast(images, tf.float64), low, high)
    mean = tf.reduce_mean(clipped)
    std = tf.math.reduce_std(clipped)
    std = tf.where(std > 1e-6, std, tf.ones_like(std))
    return tf.cast((clipped - mean) / std, tf.float32)


def serving_functions(probabilities, size, class_values, intensity, percentiles):
    """The two signature functions (see the module docstring for their contracts)."""
    import tensorflow as tf

    value_table = tf.constant(np.asarray(class_values, np.int32))

    def serving_default(image):
        probs = probabilities(image)
        return {"probabilities": probs, "labels": tf.argmax(probs, axis=-1, output_type=tf.int32)}

    def segment_slices(image):
        height, width = tf.shape(image)[1], tf.shape(image)[2]
        normalised = normalise_in_graph(image, intensity, percentiles)
        same_size = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
        # Skip the resize when the slices already have the model's size: bit-identical to serving_default.
        model_input = tf.cond(same_size, lambda: tf.ensure_shape(normalised, [None, size, size, 1]),
                              lambda: tf.image.resize(normalised, (size, size), method="bilinear"))
        model_input = tf.ensure_shape(model_input, [None, size, size, 1])
        classes = tf.argmax(probabilities(model_input), axis=-1, output_type=tf.int32)
        classes = tf.image.resize(classes[..., None], tf.stack([height, width]), method="nearest")[..., 0]
        return {"labels": tf.gather(value_table, classes)}

    return serving_default, segment_slices


def _warmup_requests(path, name, size):
    """TFRecord of PredictionLog: serving_default requests TF Serving replays before marking the model ready."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in WARMUP_BATCH_SIZES:
            # A smooth ramp over the normalised range rather than zeros: every class branch gets exercised.
            ramp = np.linspace(-1.0, 1.0, batch * size * size, dtype=np.float32).reshape(batch, size, size, 1)
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=name, signature_name="serving_default"))
            request.inputs["image"].CopyFrom(tf.make_tensor_proto(ramp))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def models_config_text(saved_models, serving_root=DEFAULT_SERVING_ROOT):
    """TF Serving ``--model_config_file`` text proto listing every exported model under ``saved_models``."""
    root = Path(saved_models)
    names = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and any(
                       (p / str(v) / "saved_model.pb").exists() for v in existing_versions(p)))
    base = serving_root.rstrip("/") or ""
    entries = "".join(f'  config {{\n    name: "{name}"\n    base_path: "{base}/{name}"\n'
                      f'    model_platform: "tensorflow"\n  }}\n' for name in names)
    return f"model_config_list {{\n{entries}}}\n"


def write_models_config(saved_models, serving_root=DEFAULT_SERVING_ROOT):
    """(Re)write ``saved_models/models.config`` atomically; returns its path."""
    path = Path(saved_models) / MODELS_CONFIG
    write_text_atomic(path, models_config_text(saved_models, serving_root))
    return path


def export_run(run_dir, out, version=None, which="ensemble", checkpoint="best", serving_root=DEFAULT_SERVING_ROOT):
    """Export one predictor of a trained run as a TF Serving model version.

    Args:
        run_dir: run folder written by `mkd train`.
        out: the model folder ``saved_models/NAME`` (NAME becomes the TF Serving model name).
        version: integer version; `None` takes the next free one. Existing versions are refused.
        which: predictor: ``ensemble`` (MKD: mean of S_syn and S_real softmaxes), ``real``, ``syn``, or a
            baseline's single segmentor (``ensemble`` falls back to it).
        checkpoint: ``best`` or ``last`` weights.
        serving_root: where ``saved_models/`` is mounted in the server (``base_path`` in models.config).

    Returns:
        dict with ``path`` (the version folder), ``version``, ``name``, ``predictor``, ``models_config``.
    """
    import keras
    import tensorflow as tf

    from mkd_tf import __version__
    from mkd_tf.inference import class_values
    from mkd_tf.training import load_run

    out = Path(out)
    name = out.name
    if not _MODEL_NAME.match(name):
        fail(out, "model name (the folder name) must be letters, digits, '_', '-', '.' and start with a letter or digit")
    if version is not None and int(version) < 1:
        fail(out, f"--version must be >= 1, got {version}")
    if out.exists() and not out.is_dir():
        fail(out, "exists and is not a folder")
    if version is not None and (out / str(int(version))).exists():  # fail before the slow part
        fail(out / str(int(version)), "already exists; exported versions are never overwritten "
                                      "(omit --version for the next free one)")
    model, config, record = load_run(run_dir, checkpoint)
    which = resolve_predictor(model, which)
    size = int(record["preprocess"]["size"])
    values = class_values(record)
    out.mkdir(parents=True, exist_ok=True)
    version = int(version) if version is not None else max(existing_versions(out), default=0) + 1
    target = out / str(version)

    chosen, probabilities = probability_function(model.segmentors(), which)
    serving_default, segment_slices = serving_functions(probabilities, size, values, record["target_intensity"],
                                                        record["preprocess"]["percentiles"])
    archive = keras.export.ExportArchive()
    for segmentor in chosen:
        archive.track(segmentor)
    archive.add_endpoint("serving_default", serving_default,
                         input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32, name="image")])
    archive.add_endpoint("segment_slices", segment_slices,
                         input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32, name="image")])

    asset = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mkd_tf_version": __version__,
        "run": str(Path(run_dir).resolve()), "checkpoint": checkpoint, "method": config["method"], "predictor": which,
        "cache": record["path"], "size": size, "classes": record["classes"],
        "label_values": {cls: int(v) for cls, v in zip(record["classes"], values)}, "class_values": values,
        "preprocess": record["preprocess"], "target_modality": record["target"]["name"],
        "target_intensity": record["target_intensity"], "signatures": SIGNATURE_DOCS,
    }
    staging = out / f".tmp-export-{version}-{uuid.uuid4().hex[:8]}"
    try:
        archive.write_out(str(staging), verbose=False)
        extra = staging / "assets.extra"
        extra.mkdir()
        _warmup_requests(extra / WARMUP_FILE, name, size)
        (extra / MODEL_ASSET).write_text(json.dumps(asset, indent=1))
        try:
            os.rename(staging, target)  # fails if another export created the version meanwhile
        except OSError as exc:
            fail(target, f"cannot publish the export ({exc.strerror}); versions are never overwritten")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    config_path = write_models_config(out.parent, serving_root)
    return {"path": str(target), "version": version, "name": name, "predictor": which, "method": config["method"],
            "models_config": str(config_path)}
