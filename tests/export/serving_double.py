"""TEST DOUBLE of TensorFlow Serving: its REST and gRPC predict/metadata APIs, in-process, on 127.0.0.1.

Not a server to deploy (use the `serving` Docker image for that). It exists so that the clients in
:mod:`mkd_tf.export.client` can be tested end to end without a ``tensorflow_model_server`` binary:
it evaluates the exported SavedModel with ``tf.saved_model.load`` and speaks TF Serving's wire formats.

What it implements (the subset mkd uses), with TF Serving's request and response formats:

REST (``http.server``, random port; ``[/versions/N]`` may also be ``/labels/LABEL``):
    ``GET  /v1/models/NAME[/versions/N]``            -> ``{"model_version_status": [...]}``
    ``GET  /v1/models/NAME[/versions/N]/metadata``   -> ``{"model_spec": {...}, "metadata": {"signature_def":
                                                         {"signature_def": {...}}}}`` (proto field names)
    ``POST /v1/models/NAME[/versions/N]:predict``    -> columnar ``{"inputs": ...}`` gives ``{"outputs": ...}``,
                                                         row ``{"instances": [...]}`` gives ``{"predictions": [...]}``
                                                         (a single output is not wrapped in a dict)
    errors: ``{"error": "..."}`` with 404 (unknown model/version or path) or 400 (bad request/signature).

gRPC (``tensorflow_serving.apis.prediction_service_pb2_grpc``, random port):
    ``Predict`` (honours ``output_filter``) and ``GetModelMetadata`` (``signature_def`` field); the model
    spec may name a ``version`` or a ``version_label``; errors are ``NOT_FOUND`` and ``INVALID_ARGUMENT``
    like TF Serving's.

A model is a base path with integer version folders (``saved_models/NAME``); every version with a
``saved_model.pb`` is served (like ``model_version_policy { specific { ... } }`` listing them all, what
``mkd export`` writes into models.config) and a request without a version gets the latest. Version labels
come from ``labels`` (``{name: {label: version}}``). Like TF Serving, loading a version replays its
``assets.extra/tf_serving_warmup_requests`` and refuses the version if a warmup request fails. Every
predict request is recorded in :attr:`ServingDouble.requests` (protocol, model, version, signature, and
for REST the response's size in bytes).

Usage (tests/export/test_client.py)::

    with ServingDouble({"heart": "saved_models/heart"}) as server:
        server.rest_url("heart")   # 'http://127.0.0.1:PORT/v1/models/heart'
        server.grpc_target         # '127.0.0.1:PORT'
"""

import json
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<rest>/metadata|:predict)?$"
)
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"


class ServingError(Exception):
    """A request TF Serving would refuse: ``kind`` is ``"not_found"`` or ``"invalid"``."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class _Model:
    """The loaded versions of one model (each warmed up with its warmup requests, as TF Serving does)."""

    def __init__(self, name, base_path):
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.name = name
        self.versions = {}
        self.warmup = {}  # version -> number of warmup requests replayed
        for folder in sorted(Path(base_path).iterdir()):
            if folder.is_dir() and folder.name.isdigit() and (folder / "saved_model.pb").exists():
                saved_model = saved_model_pb2.SavedModel()
                saved_model.ParseFromString((folder / "saved_model.pb").read_bytes())
                serve = next(g for g in saved_model.meta_graphs if "serve" in g.meta_info_def.tags)
                loaded = tf.saved_model.load(str(folder))
                self.versions[int(folder.name)] = (loaded, serve.signature_def)
                self.warmup[int(folder.name)] = _replay_warmup(folder, loaded)
        if not self.versions:
            raise ValueError(f"{base_path}: no version folders with a saved_model.pb")


def _replay_warmup(folder, loaded):
    """Run every PredictionLog of ``folder``'s warmup file; a failing one refuses the version (ValueError)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(folder) / WARMUP_FILE
    if not path.exists():
        return 0
    count = 0
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        request = log.predict_log.request
        signature_name = request.model_spec.signature_name or "serving_default"
        if signature_name not in loaded.signatures:
            raise ValueError(f"{path}: warmup request for unknown signature {signature_name!r}")
        function = loaded.signatures[signature_name]
        specs = function.structured_input_signature[1]
        if set(request.inputs) != set(specs):
            raise ValueError(f"{path}: warmup request inputs {sorted(request.inputs)} != {sorted(specs)}")
        outputs = function(**{key: tf.constant(tf.make_ndarray(proto)) for key, proto in request.inputs.items()})
        unknown = [key for key in request.output_filter if key not in outputs]
        if unknown:
            raise ValueError(f"{path}: warmup request filters unknown output {unknown[0]!r}")
        count += 1
    return count


class ServingDouble:
    """TEST DOUBLE: TF Serving's REST and gRPC predict/metadata APIs in background threads.

    Args:
        models: dict model name -> base path holding integer version folders.
        host: interface to bind (loopback only by default).
        labels: dict model name -> {version label: version} (models.config ``version_labels``).

    Attributes (after :meth:`start`):
        rest_port, grpc_port: the ports chosen by the OS.
        grpc_target: ``"host:grpc_port"``.
        requests: one dict per predict request: ``protocol`` ("rest"/"grpc"), ``model``, ``version``,
            ``signature``, and for REST ``response_bytes`` (the JSON body's size).
    """

    def __init__(self, models, host="127.0.0.1", labels=None):
        self.models = {name: _Model(name, path) for name, path in models.items()}
        self.labels = {name: dict(mapping) for name, mapping in (labels or {}).items()}
        self.host = host
        self.requests = []
        self._lock = threading.Lock()
        self._http = None
        self._grpc = None

    def record(self, **entry):
        with self._lock:
            self.requests.append(entry)

    # --- the model logic shared by both protocols ------------------------------------------------
    def lookup(self, name, version=None, label=None):
        """`(version, loaded, signature_defs)` or ServingError with TF Serving's message.

        ``label`` (a version label) is resolved first: an unknown one is INVALID_ARGUMENT in TF Serving.
        """
        if label is not None:
            if label not in self.labels.get(name, {}):
                raise ServingError("invalid", f"Unrecognized servable version label: {label}")
            version = self.labels[name][label]
        request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
        model = self.models.get(name)
        if model is None or (version is not None and int(version) not in model.versions):
            raise ServingError("not_found", f"Servable not found for request: {request}")
        version = int(version) if version is not None else max(model.versions)
        loaded, signature_defs = model.versions[version]
        return version, loaded, signature_defs

    def run(self, name, version, signature_name, inputs, label=None):
        """Evaluate a signature on a dict of numpy arrays; returns `(version, dict of numpy outputs)`."""
        import tensorflow as tf

        version, loaded, _ = self.lookup(name, version, label)
        signature_name = signature_name or "serving_default"
        if signature_name not in loaded.signatures:
            raise ServingError("invalid", f'Serving signature key "{signature_name}" not found.')
        function = loaded.signatures[signature_name]
        specs = function.structured_input_signature[1]
        if set(inputs) != set(specs):
            raise ServingError("invalid", f"Expected inputs {sorted(specs)}, got {sorted(inputs)}")
        try:
            tensors = {
                key: tf.constant(np.asarray(value, dtype=specs[key].dtype.as_numpy_dtype))
                for key, value in inputs.items()
            }
            outputs = function(**tensors)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            raise ServingError("invalid", str(exc).splitlines()[0])
        return version, {key: value.numpy() for key, value in outputs.items()}

    def metadata_proto(self, name, version, label=None):
        """`(version, tensorflow_serving SignatureDefMap)` of a model version."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        version, _, signature_defs = self.lookup(name, version, label)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        return version, signature_map

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self._http = ThreadingHTTPServer((self.host, 0), _handler(self))
        self._http.daemon_threads = True
        self.rest_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="serving-double-rest", daemon=True).start()
        # TF Serving lifts gRPC's 4 MB message limit (16 slices of 256 x 256 float32 are 4 MB already).
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_servicer(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:0")
        self._grpc.start()
        self.grpc_target = f"{self.host}:{self.grpc_port}"
        return self

    def stop(self):
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace=None)
            self._grpc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def rest_url(self, name, version=None, label=None):
        """``http://host:port/v1/models/NAME[/versions/N | /labels/LABEL]``."""
        url = f"http://{self.host}:{self.rest_port}/v1/models/{name}"
        return url + (f"/versions/{version}" if version is not None else "") + (f"/labels/{label}" if label else "")


def _handler(server):
    """A BaseHTTPRequestHandler class bound to ``server``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _reply(self, status, body, before_sending=None):
            data = json.dumps(body).encode()
            if before_sending is not None:  # e.g. record the request before the client can see the answer
                before_sending(len(data))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self):
            match = _PATH.match(self.path)
            if not match:
                raise ServingError("not_found", f"Malformed request: {self.command} {self.path}")
            return match["name"], match["version"], match["label"], match["rest"]

        def do_GET(self):
            try:
                name, version, label, rest = self._route()
                if rest == "/metadata":
                    self._reply(200, _metadata_json(server, name, version, label))
                elif rest is None:
                    found, _, _ = server.lookup(name, version, label)
                    self._reply(
                        200,
                        {
                            "model_version_status": [
                                {
                                    "version": str(found),
                                    "state": "AVAILABLE",
                                    "status": {"error_code": "OK", "error_message": ""},
                                }
                            ]
                        },
                    )
                else:
                    raise ServingError("not_found", f"Malformed request: GET {self.path}")
            except ServingError as exc:
                self._reply(404 if exc.kind == "not_found" else 400, {"error": str(exc)})

        def do_POST(self):
            try:
                name, version, label, rest = self._route()
                if rest != ":predict":
                    raise ServingError("not_found", f"Malformed request: POST {self.path}")
                length = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ServingError("invalid", f"JSON Parse error: {exc}")
                found, reply = _predict_json(server, name, version, body, label)
                self._reply(
                    200,
                    reply,
                    lambda size: server.record(
                        protocol="rest",
                        model=name,
                        version=found,
                        response_bytes=size,
                        signature=body.get("signature_name", "serving_default"),
                    ),
                )
            except ServingError as exc:
                self._reply(404 if exc.kind == "not_found" else 400, {"error": str(exc)})

    return Handler


def _metadata_json(server, name, version, label=None):
    from google.protobuf import json_format

    found, signature_map = server.metadata_proto(name, version, label)
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(found)},
        "metadata": {
            "signature_def": json_format.MessageToDict(
                signature_map, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        },
    }


def _predict_json(server, name, version, body, label=None):
    """TF Serving's REST predict: row ("instances") or columnar ("inputs") format; `(version, response)`."""
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise ServingError("invalid", 'Missing or ambiguous "instances" / "inputs" key in the request')
    signature_name = body.get("signature_name", "serving_default")
    version, loaded, _ = server.lookup(name, version, label)
    if signature_name not in loaded.signatures:
        raise ServingError("invalid", f'Serving signature key "{signature_name}" not found.')
    input_names = sorted(loaded.signatures[signature_name].structured_input_signature[1])
    if "inputs" in body:
        values = body["inputs"]
        inputs = values if isinstance(values, dict) else ({input_names[0]: values} if len(input_names) == 1 else None)
        if inputs is None:
            raise ServingError("invalid", "Columnar inputs must name every input of a multi-input signature")
        _, outputs = server.run(name, version, signature_name, inputs)
        listed = {key: value.tolist() for key, value in outputs.items()}
        return version, {"outputs": next(iter(listed.values())) if len(listed) == 1 else listed}
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise ServingError("invalid", '"instances" must be a non-empty list')
    if all(isinstance(item, dict) for item in instances):
        inputs = {key: [item[key] for item in instances] for key in instances[0]}
    elif len(input_names) == 1:
        inputs = {input_names[0]: instances}
    else:
        raise ServingError("invalid", "Instances must be objects naming every input of a multi-input signature")
    _, outputs = server.run(name, version, signature_name, inputs)
    keys = sorted(outputs)
    rows = [{key: outputs[key][i].tolist() for key in keys} for i in range(len(instances))]
    return version, {"predictions": [row[keys[0]] for row in rows] if len(keys) == 1 else rows}


def _version_choice(spec):
    """`(version or None, label or None)` of a gRPC ModelSpec (its ``version_choice`` oneof)."""
    choice = spec.WhichOneof("version_choice")
    return (
        spec.version.value if choice == "version" else None,
        spec.version_label if choice == "version_label" else None,
    )


def _servicer(server):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

    codes = {"not_found": grpc.StatusCode.NOT_FOUND, "invalid": grpc.StatusCode.INVALID_ARGUMENT}

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            version, label = _version_choice(request.model_spec)
            try:
                inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
                found, outputs = server.run(
                    request.model_spec.name, version, request.model_spec.signature_name, inputs, label
                )
                unknown = [key for key in request.output_filter if key not in outputs]
                if unknown:
                    raise ServingError("invalid", f"output tensor alias not found in signature: {unknown[0]}")
            except ServingError as exc:
                context.abort(codes[exc.kind], str(exc))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = found
            response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
            for key, value in outputs.items():
                if not request.output_filter or key in request.output_filter:
                    response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
            server.record(
                protocol="grpc",
                model=request.model_spec.name,
                version=found,
                signature=response.model_spec.signature_name,
                response_bytes=response.ByteSize(),
            )
            return response

        def GetModelMetadata(self, request, context):
            version, label = _version_choice(request.model_spec)
            try:
                if list(request.metadata_field) != ["signature_def"]:
                    raise ServingError(
                        "invalid", f"Metadata field(s) {list(request.metadata_field)} not supported; only signature_def"
                    )
                found, signature_map = server.metadata_proto(request.model_spec.name, version, label)
            except ServingError as exc:
                context.abort(codes[exc.kind], str(exc))
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = found
            response.metadata["signature_def"].Pack(signature_map)
            return response

    return Servicer()
