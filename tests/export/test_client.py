"""Remote `mkd predict` (REST and gRPC) against the TF Serving test double, and the double's wire formats."""

import json
import socket
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mkd_cli.main import main
from mkd_tf.errors import MkdError
from mkd_tf.export import client
from mkd_tf.export.test_server import ServingDouble


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A SavedModel that is not an mkd export: serving_default takes `x` (batch, 3)."""
    import tensorflow as tf

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32, name="x")])
        def serve(self, x):
            return {"y": 2.0 * x}

    module = Doubler()
    base = tmp_path_factory.mktemp("other") / "other"
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": module.serve})
    return base


@pytest.fixture(scope="module")
def server(mkd_export, other_model):
    from pathlib import Path

    with ServingDouble({"heart": Path(mkd_export["path"]).parent, "other": other_model}) as double:
        yield double


@pytest.fixture(scope="module")
def local_labels(loaded_mkd, ct_image):
    """What local `mkd predict` computes for ``ct_image`` (ensemble)."""
    from mkd_tf.data.nifti import load_image
    from mkd_tf.inference import predict_volume

    model, _, record = loaded_mkd
    return predict_volume(model, load_image(ct_image), record, "ensemble")


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rest_predict_equals_local_predict(server, mkd_export, ct_image, local_labels, tmp_path):
    out = tmp_path / "rest.nii.gz"
    labels = client.predict_file_remote(ct_image, out, server=server.rest_url("heart"),
                                        model_dir=mkd_export["path"], batch_size=5)
    np.testing.assert_array_equal(labels, local_labels)
    written, original = nib.load(str(out)), nib.load(str(ct_image))
    np.testing.assert_array_equal(np.asarray(written.dataobj), local_labels)
    np.testing.assert_allclose(written.affine, original.affine)
    assert written.get_data_dtype() == np.uint16 and set(np.unique(labels)) <= {0, 205, 420, 500, 550, 600, 820, 850}


def test_grpc_predict_equals_local_predict(server, mkd_run, ct_image, local_labels, tmp_path):
    """gRPC, with the preprocessing taken from the run folder instead of an export copy."""
    labels = client.predict_file_remote(ct_image, tmp_path / "grpc.nii.gz", grpc_target=server.grpc_target,
                                        model="heart", version=1, run=mkd_run, batch_size=7)
    np.testing.assert_array_equal(labels, local_labels)


def test_cli_remote_predict_matches_cli_local_predict(server, mkd_run, mkd_export, ct_image, tmp_path):
    runner = CliRunner()
    local = runner.invoke(main, ["predict", str(mkd_run), str(ct_image), "-o", str(tmp_path / "local.nii.gz")])
    assert local.exit_code == 0, local.output
    rest = runner.invoke(main, ["predict", str(ct_image), "--server", server.rest_url("heart"), "--model-dir",
                                mkd_export["path"], "-o", str(tmp_path / "rest.nii.gz")])
    assert rest.exit_code == 0, rest.output
    grpc = runner.invoke(main, ["predict", str(mkd_run), str(ct_image), "--grpc", server.grpc_target, "--model",
                                "heart", "--batch-size", "3", "-o", str(tmp_path / "grpc.nii.gz")])
    assert grpc.exit_code == 0, grpc.output
    expected = np.asarray(nib.load(str(tmp_path / "local.nii.gz")).dataobj)
    for name in ("rest", "grpc"):
        np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / f"{name}.nii.gz")).dataobj), expected)


def test_unreachable_server(mkd_export, ct_image, tmp_path):
    port = _closed_port()
    with pytest.raises(MkdError, match=rf"127.0.0.1:{port}/v1/models/heart: cannot reach TF Serving"):
        client.predict_file_remote(ct_image, tmp_path / "x.nii.gz", server=f"http://127.0.0.1:{port}/v1/models/heart",
                                   model_dir=mkd_export["path"], timeout=5)
    with pytest.raises(MkdError, match=rf"grpc://127.0.0.1:{port}/heart: cannot reach TF Serving"):
        client.predict_file_remote(ct_image, tmp_path / "x.nii.gz", grpc_target=f"127.0.0.1:{port}", model="heart",
                                   model_dir=mkd_export["path"], timeout=5)
    result = CliRunner().invoke(main, ["predict", str(ct_image), "--server", f"http://127.0.0.1:{port}",
                                       "--model", "heart", "--model-dir", mkd_export["path"], "-o",
                                       str(tmp_path / "x.nii.gz")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.nii.gz").exists()


def test_unknown_model_or_version(server, mkd_export, ct_image, tmp_path):
    out = tmp_path / "x.nii.gz"
    with pytest.raises(MkdError, match=r"model or version not found on the server \(Servable not found for "
                                       r"request: Latest\(lungs\)\)"):
        client.predict_file_remote(ct_image, out, server=server.rest_url("lungs"), model_dir=mkd_export["path"])
    with pytest.raises(MkdError, match=r"not found on the server \(Servable not found for request: Specific\(heart, 9\)"):
        client.predict_file_remote(ct_image, out, server=server.rest_url("heart"), version=9,
                                   model_dir=mkd_export["path"])
    with pytest.raises(MkdError, match=r"grpc://.*/lungs: model or version not found on the server"):
        client.predict_file_remote(ct_image, out, grpc_target=server.grpc_target, model="lungs",
                                   model_dir=mkd_export["path"])
    assert not out.exists()


def test_signature_mismatch(server, mkd_export, ct_image, tmp_path):
    out = tmp_path / "x.nii.gz"
    with pytest.raises(MkdError, match=r"signature mismatch: serving_default has no input 'image' \(has \['x'\]"):
        client.predict_file_remote(ct_image, out, server=server.rest_url("other"), model_dir=mkd_export["path"])
    with pytest.raises(MkdError, match=r"signature mismatch: serving_default has no input 'image'"):
        client.predict_file_remote(ct_image, out, grpc_target=server.grpc_target, model="other",
                                   model_dir=mkd_export["path"])
    # The right model, but a client whose preprocessing makes 64 x 64 slices.
    signature = client.RestClient(server.rest_url("heart")).signature()
    assert signature["inputs"]["image"] == ("DT_FLOAT", [-1, 32, 32, 1])
    assert signature["outputs"]["labels"] == ("DT_INT32", [-1, 32, 32])
    with pytest.raises(MkdError, match=r"input 'image' is DT_FLOAT \[-1, 32, 32, 1\], expected image DT_FLOAT "
                                       r"\(batch, 64, 64, 1\)"):
        client.check_signature(signature, 64, "server")
    assert client.GrpcClient(server.grpc_target, "heart").signature() == signature
    assert not out.exists()


def test_needs_exactly_one_preprocessing_source(server, mkd_run, mkd_export, ct_image, tmp_path):
    with pytest.raises(MkdError, match="exactly one of RUN or --model-dir"):
        client.predict_file_remote(ct_image, tmp_path / "x.nii.gz", server=server.rest_url("heart"))
    with pytest.raises(MkdError, match="exactly one of RUN or --model-dir"):
        client.predict_file_remote(ct_image, tmp_path / "x.nii.gz", server=server.rest_url("heart"), run=mkd_run,
                                   model_dir=mkd_export["path"])


# --- the test double speaks TF Serving's formats ------------------------------------------------------
def _http(url, body=None):
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_double_rest_formats(server):
    url = server.rest_url("heart")
    image = np.linspace(-1, 1, 2 * 32 * 32, dtype=np.float32).reshape(2, 32, 32, 1)
    status, columnar = _http(url + ":predict", {"inputs": {"image": image.tolist()}})
    assert status == 200 and set(columnar) == {"outputs"} and set(columnar["outputs"]) == {"labels", "probabilities"}
    assert np.asarray(columnar["outputs"]["labels"]).shape == (2, 32, 32)
    status, rows = _http(url + ":predict", {"signature_name": "serving_default", "instances": image.tolist()})
    assert status == 200 and len(rows["predictions"]) == 2 and set(rows["predictions"][1]) == {"labels", "probabilities"}
    assert rows["predictions"][1]["labels"] == columnar["outputs"]["labels"][1]
    # A single output is not wrapped in a dict.
    status, raw = _http(url + ":predict", {"signature_name": "segment_slices", "inputs": (image * 500).tolist()})
    assert status == 200 and np.asarray(raw["outputs"]).shape == (2, 32, 32)
    status, error = _http(url + ":predict", {"signature_name": "nope", "inputs": image.tolist()})
    assert status == 400 and error == {"error": 'Serving signature key "nope" not found.'}
    status, error = _http(server.rest_url("lungs") + ":predict", {"inputs": image.tolist()})
    assert status == 404 and error == {"error": "Servable not found for request: Latest(lungs)"}
    status, metadata = _http(url + "/metadata")
    assert metadata["model_spec"] == {"name": "heart", "signature_name": "", "version": "1"}
    inputs = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert inputs["image"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in inputs["image"]["tensor_shape"]["dim"]] == ["-1", "32", "32", "1"]
    status, model_status = _http(url)
    assert model_status["model_version_status"][0]["state"] == "AVAILABLE"
