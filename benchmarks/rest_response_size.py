"""Bytes of a REST (and gRPC) predict response: ``serving_default`` vs ``labels_only`` (run by hand).

A realistic request: the first ``--slices`` (default 16) preprocessed slices of a CT volume, as
`mkd predict --server` sends them (``--batch-size 16``), at the export's slice size. Without
``--export`` the script builds one at 256 x 256: a phantom (3 CT + 1 MRI, 96 x 96 x 48 at 1.6 x 1.6 x 2.5
mm), `prepare` at 0.6 x 0.6 x 2.5 mm (256 pixels = the phantom's 153.6 mm field of view), a target-only
run of one step (8 base filters, depth 3: the response size does not depend on the network, only on
the output shapes and values) and `mkd export`.

It serves the export with the test double (``tests/export/serving_double.py``) and reports, per signature:

- ``double REST bytes``: the JSON body the double sent (Python's ``json.dumps``: compact, floats with
  up to 17 significant digits) -- measured;
- ``TF Serving REST bytes (emulated)``: the size of the same outputs written the way TF Serving's REST
  API writes them (``tensorflow_serving/util/json_tensor.cc``: rapidjson ``PrettyWriter``, 4-space
  indents and one value per line; floats with ``absl::StrCat`` (6 significant digits) or 9 when that does
  not round-trip), computed, not measured on the real server (no ``tensorflow_model_server`` binary here);
- ``gRPC bytes``: ``PredictResponse.ByteSize()`` with ``output_filter=["labels"]`` (what the gRPC client asks);
- ``seconds``: wall time of the REST round trip through the double, JSON parsing included (CPU-bound:
  varies with load).

    .venv/bin/python benchmarks/rest_response_size.py [--export saved_models/NAME/V] [--slices 16]

Prints a Markdown table. Not collected by pytest (no ``test_`` prefix).
"""

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def build_export(root):
    """A 256 x 256 export of a one-step target-only run on a phantom (see the module docstring)."""
    from mkd_tf.data.phantom import write_phantom
    from mkd_tf.data.prepare import PrepareOptions, prepare_cache
    from mkd_tf.data.preprocess import PreprocessConfig
    from mkd_tf.export.serving import export_run
    from mkd_tf.training import train

    phantom = write_phantom(root / "phantom", n_ct=3, n_mr=1, shape=(96, 96, 48))
    cache = prepare_cache(
        phantom / "ct_train",
        phantom / "mr_train",
        root / "cache",
        PrepareOptions(preprocess=PreprocessConfig(spacing=(0.6, 0.6, 2.5), size=256)),
    )
    train(
        cache,
        root / "run",
        overrides={
            "method": "target-only",
            "schedule": {"epochs": 1, "steps_per_epoch": 1},
            "data": {"batch_size": 2, "augment": False},
            "segmentor": {"base_filters": 8, "depth": 3},
        },
        verbose=0,
    )
    return Path(export_run(root / "run", root / "saved_models" / "heart")["path"]), phantom / "ct_train"


def _leaf_bytes(array):
    """Total characters of every value of ``array`` as TF Serving writes a number (see the module docstring)."""
    flat = np.asarray(array).ravel()
    if np.issubdtype(flat.dtype, np.integer):
        values, counts = np.unique(flat, return_counts=True)
        return int(sum(len(str(int(v))) * int(n) for v, n in zip(values, counts)))
    single = flat.astype(np.float32)
    short = [f"{v:g}" for v in single.tolist()]  # absl::StrCat(float): %g, 6 significant digits
    exact = np.asarray(short, dtype=np.float32) == single
    texts = [text if ok else f"{v:.9g}" for text, ok, v in zip(short, exact.tolist(), single.tolist())]
    return sum(len(t) + (2 if ("." not in t and "e" not in t) else 0) for t in texts)  # whole numbers get ".0"


def _array_bytes(array, level):
    """Bytes of a dense array written by rapidjson's PrettyWriter at nesting ``level`` (4 spaces per level)."""
    shape = np.shape(array)
    if not shape:
        return _leaf_bytes(array)
    structure, count = 0, 1
    for depth, n in enumerate(shape):
        # every list at this depth: "[\n", n indented items separated by ",\n", "\n", its own indent, "]"
        lists, inner = count, 4 * (level + depth + 1)
        structure += lists * (2 + n * inner + 2 * (n - 1) + 1 + 4 * (level + depth) + 1) if n else lists * 2
        count *= n
    return structure + _leaf_bytes(array)


def tf_serving_json_bytes(outputs):
    """Size of TF Serving's REST body ``{"outputs": ...}`` for a dict of output arrays (one output: not wrapped)."""
    if len(outputs) == 1:
        (array,) = outputs.values()
        return len('{\n    "outputs": ') + _array_bytes(array, 1) + len("\n}")
    body = len('{\n    "outputs": {\n') + len("\n    }\n}")
    items = [len(f'        "{key}": ') + _array_bytes(array, 2) for key, array in outputs.items()]
    return body + sum(items) + len(",\n") * (len(items) - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=None, help="An export version folder [default: build one].")
    parser.add_argument("--image", type=Path, default=None, help="A CT NIfTI [default: the phantom's first CT case].")
    parser.add_argument("--slices", type=int, default=16, help="Slices per request (mkd predict --batch-size).")
    args = parser.parse_args()

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from mkd_tf.data.nifti import load_image
    from mkd_tf.data.preprocess import PreprocessConfig, preprocess_image
    from mkd_tf.export.serving import read_model_asset

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test double lives in tests/
    from tests.export.serving_double import ServingDouble

    with tempfile.TemporaryDirectory() as scratch:
        export, ct_folder = (args.export, None) if args.export else build_export(Path(scratch))
        image_path = args.image or sorted(Path(ct_folder).glob("*_image.nii.gz"))[0]
        asset = read_model_asset(export)
        slices, _ = preprocess_image(
            load_image(image_path), asset["target_intensity"], PreprocessConfig.from_dict(asset["preprocess"])
        )
        batch = np.asarray(slices[: args.slices], np.float32)[..., None]
        size, classes = batch.shape[1], len(asset["classes"])
        rows = []
        with ServingDouble({"bench": export.parent}) as server:
            url = server.rest_url("bench", int(export.name)) + ":predict"
            for signature in ("serving_default", "labels_only"):
                body = json.dumps({"signature_name": signature, "inputs": {"image": batch.tolist()}}).encode()
                start = time.perf_counter()
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=600) as response:
                    payload = response.read()
                outputs = json.loads(payload)["outputs"]
                seconds = time.perf_counter() - start
                if not isinstance(outputs, dict):
                    outputs = {"labels": outputs}
                emulated = tf_serving_json_bytes(
                    {
                        key: np.asarray(value, np.int32 if key == "labels" else np.float32)
                        for key, value in outputs.items()
                    }
                )
                del outputs
                grpc_request = predict_pb2.PredictRequest(output_filter=["labels"])
                grpc_request.model_spec.name, grpc_request.model_spec.signature_name = "bench", signature
                grpc_request.inputs["image"].CopyFrom(tf.make_tensor_proto(batch))
                with grpc.insecure_channel(
                    server.grpc_target,
                    options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
                ) as channel:
                    grpc_bytes = (
                        prediction_service_pb2_grpc.PredictionServiceStub(channel)
                        .Predict(grpc_request, timeout=600)
                        .ByteSize()
                    )
                rows.append((signature, len(body), len(payload), emulated, grpc_bytes, seconds))
        print(f"{len(batch)} slices of {size} x {size}, {classes} classes; export {export}; image {image_path}\n")
        print(
            "| signature | request bytes | double REST bytes | TF Serving REST bytes (emulated) | gRPC bytes | seconds |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for signature, request_bytes, double_bytes, emulated, grpc_bytes, seconds in rows:
            print(
                f"| {signature} | {request_bytes:,} | {double_bytes:,} | {emulated:,} | {grpc_bytes:,} | {seconds:.1f} |"
            )
        (_, _, full, full_emulated, _, _), (_, _, small, small_emulated, _, _) = rows
        print(
            f"\nlabels_only / serving_default: double {small / full:.4f} ({full / small:.0f}x smaller), "
            f"emulated TF Serving {small_emulated / full_emulated:.4f} ({full_emulated / small_emulated:.0f}x smaller)"
        )


if __name__ == "__main__":
    main()
