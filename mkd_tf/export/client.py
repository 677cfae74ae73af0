"""`mkd predict --server/--grpc`: segment a NIfTI volume with a model hosted by TensorFlow Serving.

The client does what local `mkd predict` does around the network call, with the same functions:
:func:`mkd_tf.data.preprocess.preprocess_image` (resample, normalise, slice, crop), then the
``labels_only`` signature (or, for exports older than it, ``serving_default``) on batches of
``batch_size`` preprocessed slices (input ``image`` `(batch, H, W, 1)`, output ``labels``
`(batch, H, W)` class indices), then the exact inverse :func:`mkd_tf.data.preprocess.labels_to_original`
and the class-index -> label-value table. So a remote prediction equals the local one for the same
weights. The checks and the all-or-nothing writing of local `mkd predict` apply too
(:func:`mkd_tf.prediction_files.check_output_paths`, :func:`~mkd_tf.prediction_files.check_intensities`,
:func:`~mkd_tf.prediction_files.write_outputs`).

Where the preprocessing comes from: a remote client cannot read files on the server, and TF
Serving's metadata only describes signatures. So the client takes classes, label values and
preprocessing parameters from a local copy of the export (``--model-dir saved_models/NAME/<version>``,
its ``assets.extra/mkd_model.json``) or from the training run (``RUN/cache.json``), and checks them
against the server: it first fetches the model metadata (REST ``GET .../metadata``, gRPC
``GetModelMetadata``) and refuses a signature whose input ``image`` is not float32 `(batch, H, W, 1)`
or whose output ``labels`` is not int32 `(batch, H, W)` for the local ``H = W = size``.

Transports:
    - REST: ``POST {url}:predict`` with the columnar body ``{"signature_name": "labels_only",
      "inputs": {"image": [...]}}``; the response ``{"outputs": [...]}`` holds the labels only (TF
      Serving's REST API cannot filter outputs: with ``serving_default`` the response would carry the
      probabilities too, ~100x the bytes; see the README's "Serving" section for measured sizes).
    - gRPC: ``PredictionServiceStub.Predict`` on ``labels_only`` (``output_filter=["labels"]``, which
      also keeps ``serving_default``'s probabilities off the wire for older exports).

A version is chosen with ``version`` (REST ``/versions/N``, gRPC ``model_spec.version``) or a
version label (REST ``/labels/LABEL``, gRPC ``model_spec.version_label``; see ``mkd export --label``);
without either the server's latest served version answers.

Errors are one-line :class:`MkdError`: unreachable server, unknown model or version (HTTP 404 /
``NOT_FOUND``), signature mismatch, rejected requests.
"""

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from mkd_tf.data.nifti import load_image
from mkd_tf.data.preprocess import PreprocessConfig, labels_to_original, preprocess_image
from mkd_tf.errors import MkdError, fail
from mkd_tf.export.serving import read_model_asset
from mkd_tf.prediction_files import (
    check_intensities,
    check_output_paths,
    class_values,
    label_dtype,
    prediction_outputs,
    write_outputs,
)
from mkd_tf.run_files import read_cache_record

SIGNATURE = "serving_default"
#: the signature the clients call when the export has it: serving_default without the probabilities
LABELS_SIGNATURE = "labels_only"


# --- what the client needs to know about the model ------------------------------------------------
def model_info(model_dir=None, run=None):
    """Classes, label values and preprocessing of a served model, from an export copy or a run.

    Returns:
        dict with ``classes``, ``class_values``, ``preprocess``, ``target_intensity``, ``target_modality``,
        ``size``, ``source``.
    """
    if (model_dir is None) == (run is None):
        raise MkdError("remote prediction needs exactly one of RUN or --model-dir (for preprocessing and labels)")
    if model_dir is not None:
        asset = read_model_asset(model_dir)
        return {
            "classes": asset["classes"],
            "class_values": [int(v) for v in asset["class_values"]],
            "preprocess": asset["preprocess"],
            "target_intensity": asset["target_intensity"],
            "target_modality": asset.get("target_modality", "the target modality"),
            "size": int(asset["size"]),
            "source": str(model_dir),
        }
    record_path = Path(run) / "cache.json"
    if not record_path.exists():
        fail(run, "not a training run (no cache.json); pass a run folder or --model-dir")
    record = read_cache_record(run)
    return {
        "classes": record["classes"],
        "class_values": class_values(record),
        "preprocess": record["preprocess"],
        "target_intensity": record["target_intensity"],
        "target_modality": record["target"]["name"],
        "size": int(record["preprocess"]["size"]),
        "source": str(run),
    }


def check_signature(signature, size, where, signature_name=SIGNATURE):
    """Refuse a signature that does not take ``image`` float32 `(batch, size, size, 1)` and return
    ``labels`` int32 `(batch, size, size)`.

    Args:
        signature: ``{"inputs": {name: (dtype name, shape list or None)}, "outputs": {...}}``; -1 = any.
        size: the slice size the local preprocessing produces.
        where: the server (for the message).
        signature_name: its name (for the message).
    """
    expected = {("inputs", "image"): ("DT_FLOAT", [size, size, 1]), ("outputs", "labels"): ("DT_INT32", [size, size])}
    for (side, name), (dtype, shape) in expected.items():
        have = signature.get(side, {}).get(name)
        wanted = f"{name} {dtype} (batch, {', '.join(map(str, shape))})"
        if have is None:
            raise MkdError(
                f"{where}: signature mismatch: {signature_name} has no {side[:-1]} '{name}' "
                f"(has {sorted(signature.get(side, {}))}; expected {wanted})"
            )
        have_dtype, have_shape = have
        compatible = have_shape is None or (
            len(have_shape) == len(shape) + 1 and all(h in (-1, w) for h, w in zip(have_shape[1:], shape))
        )
        if have_dtype != dtype or not compatible:
            raise MkdError(
                f"{where}: signature mismatch: {signature_name} {side[:-1]} '{name}' is {have_dtype} {have_shape}, "
                f"expected {wanted} (is the server running a different model than {name!r} was "
                "exported for? check --model-dir/RUN)"
            )


def choose_signature(signatures, where):
    """``labels_only`` if the model has it (labels without probabilities), else ``serving_default``.

    Args:
        signatures: signature name -> ``{"inputs": ..., "outputs": ...}`` (see :func:`check_signature`).
        where: the server (for the message).

    Returns:
        `(name, signature)`.
    """
    for name in (LABELS_SIGNATURE, SIGNATURE):
        if name in signatures:
            return name, signatures[name]
    raise MkdError(f"{where}: signature mismatch: the model has no '{SIGNATURE}' signature (has {sorted(signatures)})")


# --- REST -------------------------------------------------------------------------------------------
class RestClient:
    """TF Serving REST API of one model.

    Args:
        url: ``http://HOST:8501/v1/models/NAME`` (optionally ``/versions/N`` or ``/labels/LABEL``); a bare
            ``http://HOST:8501`` needs ``model``.
        model: model name, appended to a bare server URL.
        version: model version (default: the server's latest).
        timeout: seconds per request.
        label: model version label (``mkd export --label``), instead of ``version``.

    Attributes:
        signature_name: the signature :meth:`labels` calls (set by :func:`predict_volume_remote` from
            the server's metadata; ``labels_only`` by default).
    """

    def __init__(self, url, model=None, version=None, timeout=120, label=None):
        base = url.rstrip("/")
        if "://" not in base:
            base = "http://" + base
        if "/v1/models/" not in base:
            if not model:
                raise MkdError(f"--server {url}: expected http://HOST:8501/v1/models/NAME (or pass --model NAME)")
            base += f"/v1/models/{model}"
        if version is not None and label is not None:
            raise MkdError("pass either --version or --label, not both")
        if version is not None or label is not None:
            if "/versions/" in base or "/labels/" in base:
                raise MkdError(
                    f"--server {url} already names a version; drop --{'version' if label is None else 'label'}"
                )
            base += f"/versions/{int(version)}" if label is None else f"/labels/{label}"
        self.url = base
        self.timeout = timeout
        self.signature_name = LABELS_SIGNATURE

    def _request(self, suffix, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + suffix,
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code == 404:
                raise MkdError(f"{self.url}: model or version not found on the server ({message})")
            raise MkdError(f"{self.url}: request rejected (HTTP {exc.code}: {message})")
        except urllib.error.URLError as exc:
            raise MkdError(f"{self.url}: cannot reach TF Serving ({getattr(exc, 'reason', exc)})")
        except (TimeoutError, OSError) as exc:
            raise MkdError(f"{self.url}: cannot reach TF Serving ({exc})")
        try:
            return json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MkdError(f"{self.url}: not a TF Serving response (invalid JSON)")

    def signatures(self):
        """Every signature from ``GET .../metadata``: name -> ``{"inputs": ..., "outputs": ...}``."""
        body = self._request("/metadata")
        try:
            signatures = body["metadata"]["signature_def"]["signature_def"]
            return {
                key: {
                    side: {name: _json_tensor_info(info) for name, info in definition.get(side, {}).items()}
                    for side in ("inputs", "outputs")
                }
                for key, definition in signatures.items()
            }
        except (KeyError, TypeError, AttributeError, ValueError):
            raise MkdError(f"{self.url}: not a TF Serving metadata response")

    def signature(self, name=SIGNATURE):
        """One signature (default ``serving_default``) from ``GET .../metadata`` (see :func:`check_signature`)."""
        signatures = self.signatures()
        if name not in signatures:
            raise MkdError(
                f"{self.url}: signature mismatch: the model has no '{name}' signature (has {sorted(signatures)})"
            )
        return signatures[name]

    def labels(self, images):
        """Class indices `(batch, H, W)` int32 for preprocessed slices `(batch, H, W, 1)`."""
        body = self._request(
            ":predict",
            {"signature_name": self.signature_name, "inputs": {"image": np.asarray(images, np.float32).tolist()}},
        )
        outputs = body.get("outputs") if isinstance(body, dict) else None
        if isinstance(outputs, dict):  # several outputs (serving_default): a dict; a single one is not wrapped
            outputs = outputs.get("labels")
        if outputs is None:
            raise MkdError(f"{self.url}: predict response has no 'labels' output")
        try:
            return np.asarray(outputs, np.int32)
        except (ValueError, TypeError):
            raise MkdError(f"{self.url}: predict response 'labels' is not an integer array")


def _error_message(exc):
    try:
        return json.loads(exc.read()).get("error", exc.reason)
    except Exception:  # a proxy's HTML page, an empty body: fall back to the status text
        return exc.reason


def _json_tensor_info(info):
    """(dtype name, shape list or None) of a TensorInfo in TF Serving's JSON (either field naming)."""
    shape = info.get("tensor_shape", info.get("tensorShape", {}))
    if shape.get("unknown_rank", shape.get("unknownRank", False)):
        return info.get("dtype"), None
    return info.get("dtype"), [int(dim.get("size", -1)) for dim in shape.get("dim", [])]


# --- gRPC -------------------------------------------------------------------------------------------
class GrpcClient:
    """TF Serving gRPC PredictionService of one model.

    Args:
        target: ``HOST:8500``.
        model: model name.
        version: model version (default: the server's latest).
        timeout: seconds per call.
        label: model version label (``mkd export --label``), instead of ``version``.

    Attributes:
        signature_name: the signature :meth:`labels` calls (see :class:`RestClient`).
    """

    def __init__(self, target, model, version=None, timeout=120, label=None):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        if not model:
            raise MkdError("--grpc needs --model NAME")
        if version is not None and label is not None:
            raise MkdError("pass either --version or --label, not both")
        self.target, self.model, self.version, self.label, self.timeout = target, model, version, label, timeout
        self.where = (
            f"grpc://{target}/{model}"
            + (f"/versions/{version}" if version is not None else "")
            + (f"/labels/{label}" if label is not None else "")
        )
        self.signature_name = LABELS_SIGNATURE
        # Responses carry a whole batch of label maps: lift gRPC's 4 MB default.
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def _spec(self, spec):
        spec.name = self.model
        spec.signature_name = self.signature_name
        if self.version is not None:
            spec.version.value = int(self.version)
        if self.label is not None:
            spec.version_label = str(self.label)

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise MkdError(f"{self.where}: cannot reach TF Serving ({details})")
            if code == grpc.StatusCode.NOT_FOUND:
                raise MkdError(f"{self.where}: model or version not found on the server ({details})")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise MkdError(f"{self.where}: no answer within {self.timeout} s")
            raise MkdError(f"{self.where}: request rejected ({code.name}: {details})")

    def signatures(self):
        """Every signature from ``GetModelMetadata``: name -> ``{"inputs": ..., "outputs": ...}``."""
        from tensorflow.core.framework import types_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec)
        request.model_spec.signature_name = ""
        response = self._call(self.stub.GetModelMetadata, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        if "signature_def" not in response.metadata or not response.metadata["signature_def"].Unpack(signature_map):
            raise MkdError(f"{self.where}: not a TF Serving metadata response")

        def info(tensor):
            shape = None if tensor.tensor_shape.unknown_rank else [int(d.size) for d in tensor.tensor_shape.dim]
            return types_pb2.DataType.Name(tensor.dtype), shape

        return {
            key: {
                "inputs": {k: info(v) for k, v in definition.inputs.items()},
                "outputs": {k: info(v) for k, v in definition.outputs.items()},
            }
            for key, definition in signature_map.signature_def.items()
        }

    def signature(self, name=SIGNATURE):
        """One signature (default ``serving_default``) from ``GetModelMetadata``."""
        signatures = self.signatures()
        if name not in signatures:
            raise MkdError(
                f"{self.where}: signature mismatch: the model has no '{name}' signature (has {sorted(signatures)})"
            )
        return signatures[name]

    def labels(self, images):
        """Class indices `(batch, H, W)` int32 for preprocessed slices `(batch, H, W, 1)`."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(output_filter=["labels"])
        self._spec(request.model_spec)
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(np.asarray(images, np.float32)))
        response = self._call(self.stub.Predict, request)
        if "labels" not in response.outputs:
            raise MkdError(f"{self.where}: predict response has no 'labels' output")
        return tf.make_ndarray(response.outputs["labels"]).astype(np.int32)

    def close(self):
        self.channel.close()


# --- the whole volume -------------------------------------------------------------------------------
def predict_volume_remote(client, image, info, batch_size=16):
    """Segment one target-modality volume on the server; same steps as :func:`mkd_tf.inference.predict_volume`.

    Args:
        client: :class:`RestClient` or :class:`GrpcClient`.
        image: :class:`mkd_tf.data.nifti.Volume` in the modality's own units.
        info: :func:`model_info`.
        batch_size: slices per request.

    Returns:
        `(x, y, z)` label volume on the input's grid with the dataset's label values.
    """

    where = getattr(client, "url", None) or client.where
    if getattr(client, "checked_size", None) != info["size"]:  # once per client (a folder: once for all cases)
        name, signature = choose_signature(client.signatures(), where)
        check_signature(signature, info["size"], where, name)
        client.signature_name = name
        client.checked_size = info["size"]
    slices, params = preprocess_image(image, info["target_intensity"], PreprocessConfig.from_dict(info["preprocess"]))
    indices = np.zeros(slices.shape, np.uint8)
    for start in range(0, len(slices), batch_size):
        batch = slices[start : start + batch_size]
        labels = client.labels(batch[..., None])
        if labels.shape != batch.shape:
            raise MkdError(f"{where}: 'labels' has shape {labels.shape}, expected {batch.shape}")
        if labels.min() < 0 or labels.max() >= len(info["classes"]):
            raise MkdError(f"{where}: 'labels' holds class {int(labels.max())}, the model has {len(info['classes'])}")
        indices[start : start + batch_size] = labels
    values = info["class_values"]
    return labels_to_original(indices, params, values).astype(label_dtype(values))


def open_remote(
    server=None, grpc_target=None, model=None, version=None, model_dir=None, run=None, timeout=120, label=None
):
    """`(client, info)` for remote prediction: :func:`model_info` and a :class:`RestClient` or
    :class:`GrpcClient` (see :func:`predict_file_remote` for the arguments); close a gRPC client after use."""
    if (server is None) == (grpc_target is None):
        raise MkdError("pass exactly one of --server (REST) or --grpc")
    info = model_info(model_dir, run)
    client = (
        RestClient(server, model, version, timeout, label)
        if server
        else GrpcClient(grpc_target, model, version, timeout, label)
    )
    return client, info


def check_remote(client, info):
    """Fetch the served model's metadata once and refuse a signature that does not fit ``info``
    (before a folder's first case)."""
    where = getattr(client, "url", None) or client.where
    name, signature = choose_signature(client.signatures(), where)
    check_signature(signature, info["size"], where, name)
    client.signature_name = name
    client.checked_size = info["size"]


def predict_case_remote(client, info, image_path, out_path, overlay=None, force=False, batch_size=16):
    """One volume on an open ``client`` (:func:`open_remote`): read, check, segment, write all or nothing."""
    check_output_paths(out_path, overlay, inputs=[image_path])
    image = load_image(image_path)
    check_intensities(image, info["target_intensity"], info["target_modality"], force)
    labels = predict_volume_remote(client, image, info, batch_size)
    record = {"classes": info["classes"], "target": {"label_values": dict(zip(info["classes"], info["class_values"]))}}
    write_outputs(prediction_outputs(labels, image, out_path, overlay, record))
    return labels


def predict_file_remote(
    image_path,
    out_path,
    server=None,
    grpc_target=None,
    model=None,
    version=None,
    model_dir=None,
    run=None,
    batch_size=16,
    timeout=120,
    overlay=None,
    label=None,
    force=False,
):
    """`mkd predict --server/--grpc`: read a NIfTI, segment it on TF Serving, write the label map.

    Args:
        image_path: target-modality NIfTI.
        out_path: label map to write (.nii/.nii.gz): the input's shape, affine and qform/sform codes,
            dataset label values.
        server: REST URL ``http://HOST:8501/v1/models/NAME`` (exclusive with ``grpc_target``).
        grpc_target: ``HOST:8500`` (needs ``model``).
        model: model name (gRPC, or appended to a bare REST URL).
        version: model version (default: latest).
        model_dir: local copy of the export version folder (preprocessing and labels), or
        run: the training run (its cache.json), instead.
        batch_size: slices per request.
        timeout: seconds per request.
        overlay: optional PNG with contours on a few slices.
        label: model version label instead of ``version``.
        force: segment even if the image's intensities do not look like the model's target modality.

    Returns:
        the label volume written. Nothing is written unless every step succeeded.
    """

    if (server is None) == (grpc_target is None):
        raise MkdError("pass exactly one of --server (REST) or --grpc")
    check_output_paths(out_path, overlay, inputs=[image_path])
    client, info = open_remote(server, grpc_target, model, version, model_dir, run, timeout, label)
    try:
        return predict_case_remote(client, info, image_path, out_path, overlay, force, batch_size)
    finally:
        if isinstance(client, GrpcClient):
            client.close()
