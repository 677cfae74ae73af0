"""`mkd export`: a trained run -> a self-contained TensorFlow Serving SavedModel.

Layout written by :func:`export_run` (``out = saved_models/NAME``)::

    saved_models/models.config                       TF Serving --model_config_file, every model below
    saved_models/NAME/<version>/saved_model.pb       graph with the three signatures below
    saved_models/NAME/<version>/variables/           the chosen predictor's segmentor weights only
    saved_models/NAME/<version>/assets.extra/tf_serving_warmup_requests
                                                     TFRecord of PredictionLog (serving_default and
                                                     labels_only, batch 1, 4, 16 each)
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

``labels_only`` -- ``serving_default`` without the probabilities, for REST clients.
    Same input; output ``labels`` int32 `(batch, H, W)` only. TF Serving's REST API cannot filter
    outputs, and the probabilities are ``classes`` JSON floats per pixel, so a REST response of
    ``serving_default`` is 19x (TF Serving's pretty-printed JSON) to 57x (compact JSON) larger than one
    of ``labels_only`` (16 slices of 256 x 256, 8 classes; ``benchmarks/rest_response_size.py``).

``segment_slices`` -- raw slices in, label values out (for clients that do not preprocess).
    Inputs: ``image`` float32 `(batch, h, w, 1)` in the modality's own units (e.g. HU), any ``h, w``:
    slices that cover the model's field of view (``size * spacing`` mm in-plane, e.g. 256 x 1.5 mm),
    at any pixel count, pixel ``(0, 0)`` centred where the model's pixel ``(0, 0)`` is centred. In the
    graph: intensity normalisation (CT: clip to the recorded HU window and scale to [-1, 1]; z-scored
    modalities: percentile clip at the cache's percentiles and z-score, with the statistics computed
    over ALL voxels of the request -- send a whole volume's slices in one request to match `mkd
    predict`, which computes them per volume), bilinear resampling to ``H x W``, the predictor,
    argmax, nearest-neighbour resampling of the class map back to ``h x w``, and a ``tf.gather`` on a
    constant table mapping class indices to the dataset's label values.
    Outputs: ``labels`` int32 `(batch, h, w)` in the ORIGINAL label values (e.g. 0, 205, ..., 850).

    Both resamplings use `prepare`'s convention (:mod:`mkd_tf.data.preprocess`): pixel centres at
    index 0 coincide, so model pixel ``r`` samples input coordinate ``r * h / H`` (TF's legacy
    ``ResizeBilinear`` with ``align_corners=False, half_pixel_centers=False``, which is also TFLite's
    ``RESIZE_BILINEAR`` default) and input pixel ``j`` takes the class of model pixel
    ``floor(j * H / h + 1/2)`` (two ``tf.gather`` calls on integer indices). With ``h = H`` both are the
    identity, so slices at the cache's spacing give exactly ``serving_default``'s labels.

Versions: ``--version`` defaults to the next free integer; an existing version is never overwritten.
A version folder appears atomically (written into a hidden sibling, then renamed): TF Serving, which
polls ``base_path`` for integer-named folders, never sees a half-written model.

``models.config`` gives every model an explicit ``model_version_policy { specific { versions: ... } }``
listing each exported version (a folder with a ``saved_model.pb``), so exporting version N+1 never
unloads version N, and keeps the ``version_labels`` of earlier exports (``--label stable`` moves the
label ``stable`` to the new version). An export changes only its own model's entry: every other entry
of an existing ``models.config`` (hand-written ones too) is kept as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mkd_tf import __version__
from mkd_tf.errors import MkdError, fail
from mkd_tf.files import (
    check_parent_is_folder,
    lock_folder,
    read_json,
    remove_stale_staging,
    temporary_sibling,
    write_text_atomic,
)
from mkd_tf.prediction_files import class_values

if TYPE_CHECKING:  # annotations only: this module imports no TensorFlow (see export_run)
    import keras
    import tensorflow as tf

    from mkd_tf.models.cross_modality import CrossModalityModel

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
        "inputs": {
            "image": "float32 (batch, H, W, 1): preprocessed target slices (cache spacing, crop, "
            "intensity normalisation)"
        },
        "outputs": {
            "probabilities": "float32 (batch, H, W, classes): softmax of the predictor",
            "labels": "int32 (batch, H, W): class indices (argmax)",
        },
    },
    "labels_only": {
        "inputs": {"image": "float32 (batch, H, W, 1): as serving_default"},
        "outputs": {"labels": "int32 (batch, H, W): class indices (argmax); no probabilities (small REST responses)"},
    },
    "segment_slices": {
        "inputs": {
            "image": "float32 (batch, h, w, 1): raw slices in the modality's units (e.g. HU) covering "
            "size*spacing mm, pixel (0, 0) centred on the model's pixel (0, 0); any h, w"
        },
        "outputs": {"labels": "int32 (batch, h, w): original label values (e.g. 0, 205, ..., 850)"},
        "normalisation": "CT: clip to window, scale to [-1, 1]; zscore: percentile clip + z-score with "
        "statistics over all voxels of the request",
        "resampling": "prepare's convention (pixel centres at index 0 coincide): model pixel r samples input "
        "coordinate r*h/H (bilinear); input pixel j takes model pixel floor(j*H/h + 1/2)",
    },
}
#: signatures the warmup file exercises (what the clients call), each at :data:`WARMUP_BATCH_SIZES`
WARMUP_SIGNATURES = ("serving_default", "labels_only")
# A TF Serving version label: not a number (it would read like a version), usable in a URL path.
_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def resolve_predictor(model: CrossModalityModel, which: str) -> str:
    """The predictor name to export: ``which``, or for single-segmentor runs ``ensemble`` -> the one segmentor."""
    names = model.predictor_names()
    if which == "ensemble" and which not in names:
        which = model.main_predictor()
    if which not in names:
        raise MkdError(f"--which {which}: this run has {', '.join(names)}")
    return which


def existing_versions(model_dir: str | os.PathLike) -> list[int]:
    """Sorted integer version folders of a TF Serving model folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def read_model_asset(version_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``assets.extra/mkd_model.json`` of an exported version folder."""
    path = Path(version_dir) / "assets.extra" / MODEL_ASSET
    if not path.exists():
        fail(
            version_dir, f"not an mkd export (no assets.extra/{MODEL_ASSET}); use a saved_models/NAME/<version> folder"
        )
    asset = read_json(path)
    if asset.get("format") != FORMAT:
        fail(path, f"not an {FORMAT} asset")
    return asset


def probability_function(segmentors: dict[str, keras.Model], which: str) -> tuple[list[str], Callable]:
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


def normalise_in_graph(images: tf.Tensor, intensity: dict[str, Any], percentiles: Sequence[float]) -> tf.Tensor:
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


def resize_like_prepare(images: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resampling of `(batch, h, w, c)` slices to `(batch, size, size, c)` in prepare's convention.

    Output pixel ``r`` samples input coordinate ``r * h / size`` (pixel centres at index 0 coincide;
    beyond the last input pixel the edge value is repeated), which is what
    :func:`mkd_tf.data.preprocess.resample` (``scipy.ndimage.affine_transform``, order 1, mode
    ``nearest``) does when the input's pixel spacing is ``size * spacing / h``. In TensorFlow that is
    the legacy ``ResizeBilinear`` kernel (``align_corners=False, half_pixel_centers=False``), TFLite's
    builtin ``RESIZE_BILINEAR`` with its default options. ``tf.image.resize`` would use half-pixel
    centres instead: a shift of ``(h / size - 1) / 2`` input pixels (0.8 mm for 1.6 mm input slices
    of a 3.2 mm model).
    """
    import tensorflow as tf

    return tf.raw_ops.ResizeBilinear(
        images=images, size=tf.constant([size, size], tf.int32), align_corners=False, half_pixel_centers=False
    )


def nearest_indices(count: tf.Tensor, size: int) -> tf.Tensor:
    """`int32 (count,)`: the model pixel (of ``size``) nearest to each of ``count`` input pixels.

    Input pixel ``j`` lies at model coordinate ``j * size / count`` (the inverse of
    :func:`resize_like_prepare`), rounded half up with integer arithmetic (exact for every ``count``):
    ``floor((2 j size + count) / (2 count))``. :func:`mkd_tf.data.preprocess.labels_to_original` rounds
    the same coordinate with ``np.rint`` (half to even), so the two can differ only at exact halves
    (e.g. every other pixel at a resolution ratio of exactly 2), by one model pixel.
    """
    import tensorflow as tf

    count = tf.cast(count, tf.int32)
    positions = tf.range(count, dtype=tf.int32)
    return tf.minimum((2 * positions * size + count) // (2 * count), size - 1)


def serving_functions(
    probabilities: Callable,
    size: int,
    class_values: Sequence[int],
    intensity: dict[str, Any],
    percentiles: Sequence[float],
) -> tuple[Callable, Callable, Callable]:
    """The three signature functions (see the module docstring for their contracts).

    Returns:
        `(serving_default, labels_only, segment_slices)`.
    """
    import tensorflow as tf

    value_table = tf.constant(np.asarray(class_values, np.int32))

    def serving_default(image):
        probs = probabilities(image)
        return {"probabilities": probs, "labels": tf.argmax(probs, axis=-1, output_type=tf.int32)}

    def labels_only(image):
        return {"labels": tf.argmax(probabilities(image), axis=-1, output_type=tf.int32)}

    def segment_slices(image):
        height, width = tf.shape(image)[1], tf.shape(image)[2]
        normalised = normalise_in_graph(image, intensity, percentiles)
        # At h = w = size this is the identity (coordinate r * 1 = r, interpolation weight 0), so slices
        # at the cache's spacing get exactly serving_default's labels.
        model_input = tf.ensure_shape(resize_like_prepare(normalised, size), [None, size, size, 1])
        classes = tf.argmax(probabilities(model_input), axis=-1, output_type=tf.int32)
        classes = tf.gather(classes, nearest_indices(height, size), axis=1)
        classes = tf.gather(classes, nearest_indices(width, size), axis=2)
        return {"labels": tf.gather(value_table, classes)}

    return serving_default, labels_only, segment_slices


def _warmup_requests(path, name, size):
    """TFRecord of PredictionLog: requests TF Serving replays before marking the version ready.

    One request per signature of :data:`WARMUP_SIGNATURES` and batch size of :data:`WARMUP_BATCH_SIZES`
    (TF Serving refuses to load a version whose warmup request fails, so each must match its signature).
    """
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature in WARMUP_SIGNATURES:
            for batch in WARMUP_BATCH_SIZES:
                # A smooth ramp over the normalised range rather than zeros: every class branch gets exercised.
                ramp = np.linspace(-1.0, 1.0, batch * size * size, dtype=np.float32).reshape(batch, size, size, 1)
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(name=name, signature_name=signature)
                )
                request.inputs["image"].CopyFrom(tf.make_tensor_proto(ramp))
                log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
                writer.write(log.SerializeToString())


def check_label(label: str) -> str:
    """Refuse a ``--label`` TF Serving could not use or that would read like a version number."""
    if not _LABEL.match(str(label)):
        raise MkdError(
            f"--label {label}: a version label must start with a letter and hold only letters, digits, "
            "'_', '-', '.' (e.g. stable, canary)"
        )
    return str(label)


def read_models_config(saved_models: str | os.PathLike) -> Any:
    """The current ``saved_models/models.config`` as a ``ModelServerConfig`` proto, or `None` if absent."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = Path(saved_models) / MODELS_CONFIG
    if not path.exists():
        return None
    try:
        text = path.read_text()
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        fail(
            path,
            f"not a TF Serving model config ({_parse_problem(exc, locals().get('text', ''))}); fix or delete it "
            "(mkd export rewrites it from the model folders)",
        )
    except (IsADirectoryError, PermissionError) as exc:
        fail(path, f"cannot read ({exc.strerror})")
    _check_models_config(path, config)
    return config


#: what every entry of models.config must set for TF Serving to load it
_MODEL_CONFIG_REQUIRED = ("name", "base_path")


def _check_models_config(path, config):
    """Fail with one line naming ``path`` and the key when an entry lacks what TF Serving needs."""
    if config.WhichOneof("config") == "custom_model_config":
        return  # not a list of models: the server's own business; export refuses to merge into it later
    for index, entry in enumerate(config.model_config_list.config):
        for key in _MODEL_CONFIG_REQUIRED:
            if not getattr(entry, key):
                fail(path, f"key 'model_config_list.config[{index}].{key}' is missing")


def _parse_problem(exc, text):
    """A text-format parse error as ``key 'K' (line N): problem``, naming the key of the offending line."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    line, column = (exc.GetLine(), exc.GetColumn()) if hasattr(exc, "GetLine") else (None, None)
    if not line or not column or line > len(text.splitlines()):
        return first
    problem = first.rsplit("': ", 1)[-1] if "': " in first else first.split(" : ", 1)[-1]
    before = text.splitlines()[line - 1][: column - 1]
    match = re.search(r'has no field named "(\w+)"', problem) or re.search(r"(\w+)\s*:?\s*\{?\s*[^\s{}:]*\s*$", before)
    key = f"key '{match.group(1)}' " if match else ""
    return f"{key}(line {line}): {problem}"


def served_versions(model_dir: str | os.PathLike) -> list[int]:
    """Sorted versions of a model folder that hold an exported SavedModel (``<version>/saved_model.pb``)."""
    return [v for v in existing_versions(model_dir) if (Path(model_dir) / str(v) / "saved_model.pb").exists()]


def _check_editable(config, path):
    """Refuse a ``models.config`` that mkd export cannot edit without losing what it holds."""
    if config is not None and config.WhichOneof("config") == "custom_model_config":
        fail(path, "uses custom_model_config, which mkd export cannot edit; list the models in model_config_list")


def models_config_text(
    saved_models: str | os.PathLike,
    serving_root: str = DEFAULT_SERVING_ROOT,
    new_labels: Mapping[str, Mapping[str, int]] | None = None,
    names: Iterable[str] | None = None,
) -> str:
    """TF Serving ``--model_config_file`` text proto: the existing ``models.config`` with the entries of the
    models ``names`` (default: every model folder under ``saved_models`` with an exported version) added or
    updated; every other entry is kept exactly as it was (a hand-written one included).

    An updated or added entry gets ``base_path`` ``SERVING_ROOT/NAME`` and, unless its existing policy is
    another one (``latest``, ``all``: the user's choice, kept), ``model_version_policy { specific { versions:
    ... } }`` with every exported version (TF Serving's default policy, ``latest { num_versions: 1 }``, would
    unload version N as soon as N+1 appears), and ``version_labels``: its existing labels whose version is
    still exported, updated by ``new_labels`` (model name -> {label: version}).
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = Path(saved_models)
    previous = read_models_config(root)
    _check_editable(previous, root / MODELS_CONFIG)
    config = previous if previous is not None else model_server_config_pb2.ModelServerConfig()
    models = config.model_config_list  # present (possibly empty) even with no model
    models.SetInParent()
    if names is None:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    base = serving_root.rstrip("/") or ""
    for name in names:
        versions = served_versions(root / name)
        if not versions:
            continue
        entry = next((c for c in models.config if c.name == name), None)
        if entry is None:
            entry = models.config.add(name=name, model_platform="tensorflow")
        entry.base_path = f"{base}/{name}"
        if entry.model_version_policy.WhichOneof("policy_choice") in (None, "specific"):
            del entry.model_version_policy.specific.versions[:]
            entry.model_version_policy.specific.versions.extend(versions)
        labels = {key: int(value) for key, value in entry.version_labels.items()}
        labels.update({key: int(value) for key, value in (new_labels or {}).get(name, {}).items()})
        entry.version_labels.clear()
        for label, version in sorted(labels.items()):
            if version in versions:  # TF Serving refuses a label that points at a version it does not serve
                entry.version_labels[label] = version
    return text_format.MessageToString(config)


def write_models_config(
    saved_models: str | os.PathLike,
    serving_root: str = DEFAULT_SERVING_ROOT,
    new_labels: Mapping[str, Mapping[str, int]] | None = None,
    names: Iterable[str] | None = None,
) -> Path:
    """Update ``saved_models/models.config`` atomically (:func:`models_config_text`); returns its path."""
    path = Path(saved_models) / MODELS_CONFIG
    write_text_atomic(path, models_config_text(saved_models, serving_root, new_labels, names))
    return path


#: what a SavedModel version folder holds (``tf.saved_model.save`` + this module's ``assets.extra``)
_VERSION_ENTRIES = frozenset(["saved_model.pb", "fingerprint.pb", "variables", "assets", "assets.extra"])
_VERSION_STAGING = re.compile(r"^\.(\d+)\.tmp-[0-9a-f]{8}$")


def _holds_only_export_files(folder):
    return all(p.name in _VERSION_ENTRIES and not p.is_symlink() for p in Path(folder).iterdir())


def remove_stale_version_staging(model_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.VERSION.tmp-<8 hex>`` staging folders a killed export left in ``model_dir``: only that
    exact pattern, holding nothing but SavedModel files, and not locked by a running export
    (:func:`mkd_tf.files.remove_stale_staging`). Returns the removed paths."""
    model_dir = Path(model_dir)
    try:
        versions = sorted({m.group(1) for m in map(_VERSION_STAGING.match, os.listdir(model_dir)) if m})
    except OSError:
        return []
    removed = []
    for version in versions:
        removed.extend(remove_stale_staging(model_dir / version, _holds_only_export_files))
    return removed


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    version: int | None = None,
    which: str = "ensemble",
    checkpoint: str = "best",
    serving_root: str = DEFAULT_SERVING_ROOT,
    labels: Iterable[str] = (),
) -> dict[str, Any]:
    """Export one predictor of a trained run as a TF Serving model version.

    Args:
        run_dir: run folder written by `mkd train`.
        out: the model folder ``saved_models/NAME`` (NAME becomes the TF Serving model name).
        version: integer version; `None` takes the next free one. Existing versions are refused.
        which: predictor: ``ensemble`` (MKD: mean of S_syn and S_real softmaxes), ``real``, ``syn``, or a
            baseline's single segmentor (``ensemble`` falls back to it).
        checkpoint: ``best`` or ``last`` weights.
        serving_root: where ``saved_models/`` is mounted in the server (``base_path`` in models.config).
        labels: TF Serving version labels (e.g. ``["stable"]``) to point at the new version in
            models.config; a label that pointed at another version of this model moves.

    Returns:
        dict with ``path`` (the version folder), ``version``, ``name``, ``predictor``, ``models_config``,
        ``labels`` (label -> version of this model after the export) and ``moved`` (label -> previous version).

    Example:
        >>> export_run("runs/mkd", "saved_models/heart", labels=["stable"])["path"]  # doctest: +SKIP
        'saved_models/heart/1'

    Every problem with the arguments, the run or the existing ``saved_models/`` is found before anything
    is written; a failure after that removes the folders this call created.
    """
    # TensorFlow-heavy: kept out of this module's import so that mkd_tf.export.client (which reads
    # read_model_asset) starts without TensorFlow (measured: 0.5 s vs 3-13 s for `import mkd_tf.inference`)
    from mkd_tf.inference import load_trained

    out = Path(out)
    labels, previous = _check_export_target(out, version, labels)
    model, config, record = load_trained(run_dir, checkpoint)
    which = resolve_predictor(model, which)
    size, values = int(record["preprocess"]["size"]), class_values(record)
    created = _missing_folders(out)  # removed again if the export fails
    out.mkdir(parents=True, exist_ok=True)
    version = int(version) if version is not None else max(existing_versions(out), default=0) + 1
    archive = _export_archive(model, which, size, values, record)
    asset = {
        **_model_asset(out.name, version, record, values),
        "run": str(Path(run_dir).resolve()),
        "checkpoint": checkpoint,
        "method": config["method"],
        "predictor": which,
    }
    target = _publish(archive, asset, out / str(version), created)
    config_path, after, moved = _point_labels(previous, out, version, labels, serving_root)
    return {
        "path": str(target),
        "version": version,
        "name": out.name,
        "predictor": which,
        "method": config["method"],
        "models_config": str(config_path),
        "labels": after,
        "moved": moved,
    }


def _check_export_target(out: Path, version: int | None, labels: Iterable[str]):
    """Refuse, before anything is written, a model folder, version or label :func:`export_run` must not write;
    returns the checked labels and the parsed models.config beside the folder (``None`` when there is none)."""
    if not _MODEL_NAME.match(out.name):
        fail(
            out, "model name (the folder name) must be letters, digits, '_', '-', '.' and start with a letter or digit"
        )
    if version is not None and int(version) < 1:
        fail(out, f"--version must be >= 1, got {version}")
    labels = [check_label(label) for label in labels]
    if out.exists() and not out.is_dir():
        fail(out, "exists and is not a folder")
    check_parent_is_folder(out, "create the model folder")
    if (out.parent / MODELS_CONFIG).is_dir():
        fail(out.parent / MODELS_CONFIG, "is a folder; mkd export writes the TF Serving model config there")
    if version is not None and (out / str(int(version))).exists():  # fail before the slow part
        fail(
            out / str(int(version)),
            "already exists; exported versions are never overwritten (omit --version for the next free one)",
        )
    previous = read_models_config(out.parent) if out.parent.is_dir() else None  # unreadable: fail now, not later
    _check_editable(previous, out.parent / MODELS_CONFIG)
    return labels, previous


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _export_archive(model, which: str, size: int, values: list[int], record: dict):
    """The ``keras.export.ExportArchive`` of the predictor ``which``, with its three signatures."""
    import keras
    import tensorflow as tf

    chosen, probabilities = probability_function(model.segmentors(), which)
    serving_default, labels_only, segment_slices = serving_functions(
        probabilities, size, values, record["target_intensity"], record["preprocess"]["percentiles"]
    )
    archive = keras.export.ExportArchive()
    for segmentor in chosen:
        archive.track(segmentor)
    fixed = [tf.TensorSpec((None, size, size, 1), tf.float32, name="image")]
    archive.add_endpoint("serving_default", serving_default, input_signature=fixed)
    archive.add_endpoint("labels_only", labels_only, input_signature=fixed)
    any_size = [tf.TensorSpec((None, None, None, 1), tf.float32, name="image")]
    archive.add_endpoint("segment_slices", segment_slices, input_signature=any_size)
    return archive


def _model_asset(name: str, version: int, record: dict, values: list[int]) -> dict[str, Any]:
    """The model's own record (:data:`MODEL_ASSET`): what a client needs to prepare slices and read labels
    (the run's part, its method and predictor, is added by :func:`export_run`)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mkd_tf_version": __version__,
        "cache": record["path"],
        "size": int(record["preprocess"]["size"]),
        "classes": record["classes"],
        "label_values": {cls: int(v) for cls, v in zip(record["classes"], values)},
        "class_values": values,
        "preprocess": record["preprocess"],
        "target_modality": record["target"]["name"],
        "target_intensity": record["target_intensity"],
        "signatures": SIGNATURE_DOCS,
    }


def _publish(archive, asset: dict, target: Path, created: list[Path]) -> Path:
    """Write the SavedModel, its warm-up requests and asset into a staging folder, then rename it to
    ``target`` (never over an existing version); on failure remove the folders in ``created``."""
    staging = temporary_sibling(target, folder=True)
    published, lock = False, None
    try:
        staging.mkdir()
        lock = lock_folder(staging)  # a concurrent export's clean-up of stale staging must leave it alone
        archive.write_out(str(staging), verbose=False)
        extra = staging / "assets.extra"
        extra.mkdir()
        _warmup_requests(extra / WARMUP_FILE, asset["name"], asset["size"])
        (extra / MODEL_ASSET).write_text(json.dumps(asset, indent=1))
        try:
            os.rename(staging, target)  # fails if another export created the version meanwhile
        except OSError as exc:
            fail(target, f"cannot publish the export ({exc.strerror}); versions are never overwritten")
        published = True
    finally:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(staging, ignore_errors=True)
        if not published:
            for folder in created:  # innermost first; only if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break
    return target


def _point_labels(previous, out: Path, version: int, labels: list[str], serving_root: str):
    """Serve the new version under ``labels`` in models.config; returns its path, this model's labels after
    the export (label -> version) and the labels that moved (label -> previous version)."""
    name, before = out.name, {}
    if previous is not None:
        for entry in previous.model_config_list.config:
            if entry.name == name:
                before = {key: int(value) for key, value in entry.version_labels.items()}
    remove_stale_version_staging(out)  # what a killed export left behind
    config_path = write_models_config(out.parent, serving_root, {name: {label: version for label in labels}}, [name])
    after = {label: version for label, version in before.items() if version in served_versions(out)}
    after.update({label: version for label in labels})
    moved = {label: before[label] for label in labels if label in before and before[label] != version}
    return config_path, after, moved
