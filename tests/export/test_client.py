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
from tests.export.serving_double import ServingDouble


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
def legacy_model(tmp_path_factory):
    """An export from before `labels_only`: serving_default only (image (batch, 32, 32, 1) -> labels, probabilities)."""
    import tensorflow as tf

    class Legacy(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 32, 32, 1), tf.float32, name="image")])
        def serve(self, image):
            probabilities = tf.concat([tf.ones_like(image), tf.zeros_like(image)], axis=-1)
            return {"probabilities": probabilities, "labels": tf.argmax(probabilities, axis=-1, output_type=tf.int32)}

    module = Legacy()
    base = tmp_path_factory.mktemp("legacy") / "legacy"
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": module.serve})
    return base


@pytest.fixture(scope="module")
def server(mkd_export, other_model, legacy_model):
    from pathlib import Path

    with ServingDouble(
        {"heart": Path(mkd_export["path"]).parent, "other": other_model, "legacy": legacy_model},
        labels={"heart": {"stable": 1}},
    ) as double:
        yield double


def _requests_during(server, action):
    """Run ``action()``; return what it returned and the predict requests the double saw meanwhile."""
    before = len(server.requests)
    result = action()
    return result, server.requests[before:]


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


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
    labels, requests = _requests_during(
        server,
        lambda: client.predict_file_remote(
            ct_image, out, server=server.rest_url("heart"), model_dir=mkd_export["path"], batch_size=5
        ),
    )
    np.testing.assert_array_equal(labels, local_labels)
    # 16 slices in batches of 5, each on the labels-only signature.
    assert [(r["protocol"], r["signature"]) for r in requests] == [("rest", "labels_only")] * 4
    written, original = nib.load(str(out)), nib.load(str(ct_image))
    np.testing.assert_array_equal(np.asarray(written.dataobj), local_labels)
    np.testing.assert_allclose(written.affine, original.affine)
    assert written.get_data_dtype() == np.uint16 and set(np.unique(labels)) <= {0, 205, 420, 500, 550, 600, 820, 850}


def test_grpc_predict_equals_local_predict(server, mkd_run, ct_image, local_labels, tmp_path):
    """gRPC, with the preprocessing taken from the run folder instead of an export copy."""
    labels, requests = _requests_during(
        server,
        lambda: client.predict_file_remote(
            ct_image,
            tmp_path / "grpc.nii.gz",
            grpc_target=server.grpc_target,
            model="heart",
            version=1,
            run=mkd_run,
            batch_size=7,
        ),
    )
    np.testing.assert_array_equal(labels, local_labels)
    assert [(r["protocol"], r["signature"], r["version"]) for r in requests] == [("grpc", "labels_only", 1)] * 3


def test_rest_labels_only_responses_are_small(server):
    """The REST response of labels_only holds no probabilities: measured on one batch of 16 slices."""
    image = np.linspace(-1, 1, 16 * 32 * 32, dtype=np.float32).reshape(16, 32, 32, 1)
    sizes = {}
    for signature in ("serving_default", "labels_only"):
        (status, body), requests = _requests_during(
            server,
            lambda: _http(
                server.rest_url("heart") + ":predict",
                {"signature_name": signature, "inputs": {"image": image.tolist()}},
            ),
        )
        assert status == 200
        sizes[signature] = requests[0]["response_bytes"]
    assert np.asarray(body["outputs"]).shape == (16, 32, 32)  # labels_only: a single output, not wrapped
    # 8 classes x ~20 bytes per float vs ~3 bytes per label: well over 20 x smaller.
    assert sizes["labels_only"] * 20 < sizes["serving_default"], sizes


def test_exports_without_labels_only_fall_back_to_serving_default(server, mkd_run, ct_image, tmp_path):
    for kwargs in ({"server": server.rest_url("legacy")}, {"grpc_target": server.grpc_target, "model": "legacy"}):
        labels, requests = _requests_during(
            server, lambda: client.predict_file_remote(ct_image, tmp_path / "legacy.nii.gz", run=mkd_run, **kwargs)
        )
        assert not labels.any()  # the legacy model says background everywhere
        assert {r["signature"] for r in requests} == {"serving_default"}


def test_warmup_requests_are_replayed_on_load(server):
    """The double, like TF Serving, runs every warmup request before serving a version."""
    assert server.models["heart"].warmup == {1: 6}  # serving_default and labels_only, batches 1, 4, 16
    assert server.models["other"].warmup == {1: 0}


def test_version_labels(server, mkd_run, mkd_export, ct_image, local_labels, tmp_path):
    runner = CliRunner()
    for transport in (["--server", server.rest_url("heart")], ["--grpc", server.grpc_target, "--model", "heart"]):
        out = tmp_path / "labelled.nii.gz"
        result = runner.invoke(
            main, ["predict", str(mkd_run), str(ct_image), *transport, "--label", "stable", "-o", str(out)]
        )
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), local_labels)
        out.unlink()
        unknown = runner.invoke(
            main, ["predict", str(mkd_run), str(ct_image), *transport, "--label", "canary", "-o", str(out)]
        )
        _assert_one_line_error(unknown, "Unrecognized servable version label: canary")
        both = runner.invoke(
            main,
            ["predict", str(mkd_run), str(ct_image), *transport, "--label", "stable", "--version", "1", "-o", str(out)],
        )
        _assert_one_line_error(both, "either --version or --label")
        assert not out.exists()
    local = runner.invoke(main, ["predict", str(mkd_run), str(ct_image), "--label", "stable", "-o", str(out)])
    _assert_one_line_error(local, "error: --label stable: selects a model version on a server")
    assert list(tmp_path.iterdir()) == []


def test_remote_bad_inputs_are_one_line_and_write_nothing(
    server, mkd_run, mkd_export, ct_image, phantom, tmp_path, monkeypatch
):
    runner = CliRunner()
    rest = ["--server", server.rest_url("heart"), "--model-dir", mkd_export["path"]]
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = tmp_path / "out" / "labels.nii.gz"
    for args, fragment in (
        (["-o", str(blocker / "labels.nii.gz")], f"cannot write -o: {blocker} is a file, not a folder"),
        (
            ["-o", str(out), "--overlay", str(blocker / "o.png")],
            f"cannot write --overlay: {blocker} is a file, not a folder",
        ),
        (["-o", str(tmp_path / "out")], "output must end in .nii or .nii.gz"),
    ):
        _assert_one_line_error(runner.invoke(main, ["predict", str(ct_image), *rest, *args]), fragment)
    # An MRI volume sent to a model trained on CT: refused before any request, accepted with --force.
    mri = sorted(phantom.glob("mr_train/*_image.nii.gz"))[0]
    result, requests = _requests_during(
        server, lambda: runner.invoke(main, ["predict", str(mri), *rest, "-o", str(out)])
    )
    _assert_one_line_error(result, f"error: {mri}: values look like MRI", "trained on CT in Hounsfield units")
    assert requests == []
    # The overlay fails after the prediction: the label map is not written either.
    from mkd_tf import prediction_files

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(prediction_files, "render_overlay", broken)
    result = runner.invoke(
        main, ["predict", str(ct_image), *rest, "-o", str(out), "--overlay", str(tmp_path / "out" / "o.png")]
    )
    _assert_one_line_error(result, "cannot draw the overlay (RuntimeError: no display)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    monkeypatch.undo()
    forced = runner.invoke(main, ["predict", str(mri), *rest, "-o", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert nib.load(str(out)).shape == nib.load(str(mri)).shape


def test_cli_remote_predict_matches_cli_local_predict(server, mkd_run, mkd_export, ct_image, tmp_path):
    runner = CliRunner()
    local = runner.invoke(main, ["predict", str(mkd_run), str(ct_image), "-o", str(tmp_path / "local.nii.gz")])
    assert local.exit_code == 0, local.output
    rest = runner.invoke(
        main,
        [
            "predict",
            str(ct_image),
            "--server",
            server.rest_url("heart"),
            "--model-dir",
            mkd_export["path"],
            "-o",
            str(tmp_path / "rest.nii.gz"),
        ],
    )
    assert rest.exit_code == 0, rest.output
    grpc = runner.invoke(
        main,
        [
            "predict",
            str(mkd_run),
            str(ct_image),
            "--grpc",
            server.grpc_target,
            "--model",
            "heart",
            "--batch-size",
            "3",
            "-o",
            str(tmp_path / "grpc.nii.gz"),
        ],
    )
    assert grpc.exit_code == 0, grpc.output
    expected = np.asarray(nib.load(str(tmp_path / "local.nii.gz")).dataobj)
    for name in ("rest", "grpc"):
        np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / f"{name}.nii.gz")).dataobj), expected)


def test_unreachable_server(mkd_export, ct_image, tmp_path):
    port = _closed_port()
    with pytest.raises(MkdError, match=rf"127.0.0.1:{port}/v1/models/heart: cannot reach TF Serving"):
        client.predict_file_remote(
            ct_image,
            tmp_path / "x.nii.gz",
            server=f"http://127.0.0.1:{port}/v1/models/heart",
            model_dir=mkd_export["path"],
            timeout=5,
        )
    with pytest.raises(MkdError, match=rf"grpc://127.0.0.1:{port}/heart: cannot reach TF Serving"):
        client.predict_file_remote(
            ct_image,
            tmp_path / "x.nii.gz",
            grpc_target=f"127.0.0.1:{port}",
            model="heart",
            model_dir=mkd_export["path"],
            timeout=5,
        )
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(ct_image),
            "--server",
            f"http://127.0.0.1:{port}",
            "--model",
            "heart",
            "--model-dir",
            mkd_export["path"],
            "-o",
            str(tmp_path / "x.nii.gz"),
        ],
    )
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.nii.gz").exists()


def test_unknown_model_or_version(server, mkd_export, ct_image, tmp_path):
    out = tmp_path / "x.nii.gz"
    with pytest.raises(
        MkdError,
        match=r"model or version not found on the server \(Servable not found for "
        r"request: Latest\(lungs\)\)",
    ):
        client.predict_file_remote(ct_image, out, server=server.rest_url("lungs"), model_dir=mkd_export["path"])
    with pytest.raises(
        MkdError, match=r"not found on the server \(Servable not found for request: Specific\(heart, 9\)"
    ):
        client.predict_file_remote(
            ct_image, out, server=server.rest_url("heart"), version=9, model_dir=mkd_export["path"]
        )
    with pytest.raises(MkdError, match=r"grpc://.*/lungs: model or version not found on the server"):
        client.predict_file_remote(
            ct_image, out, grpc_target=server.grpc_target, model="lungs", model_dir=mkd_export["path"]
        )
    assert not out.exists()


def test_signature_mismatch(server, mkd_export, ct_image, tmp_path):
    out = tmp_path / "x.nii.gz"
    with pytest.raises(MkdError, match=r"signature mismatch: serving_default has no input 'image' \(has \['x'\]"):
        client.predict_file_remote(ct_image, out, server=server.rest_url("other"), model_dir=mkd_export["path"])
    with pytest.raises(MkdError, match=r"signature mismatch: serving_default has no input 'image'"):
        client.predict_file_remote(
            ct_image, out, grpc_target=server.grpc_target, model="other", model_dir=mkd_export["path"]
        )
    # The right model, but a client whose preprocessing makes 64 x 64 slices.
    signature = client.RestClient(server.rest_url("heart")).signature()
    assert signature["inputs"]["image"] == ("DT_FLOAT", [-1, 32, 32, 1])
    assert signature["outputs"]["labels"] == ("DT_INT32", [-1, 32, 32])
    with pytest.raises(
        MkdError,
        match=r"input 'image' is DT_FLOAT \[-1, 32, 32, 1\], expected image DT_FLOAT "
        r"\(batch, 64, 64, 1\)",
    ):
        client.check_signature(signature, 64, "server")
    assert client.GrpcClient(server.grpc_target, "heart").signature() == signature
    assert not out.exists()


def test_needs_exactly_one_preprocessing_source(server, mkd_run, mkd_export, ct_image, tmp_path):
    with pytest.raises(MkdError, match="exactly one of RUN or --model-dir"):
        client.predict_file_remote(ct_image, tmp_path / "x.nii.gz", server=server.rest_url("heart"))
    with pytest.raises(MkdError, match="exactly one of RUN or --model-dir"):
        client.predict_file_remote(
            ct_image, tmp_path / "x.nii.gz", server=server.rest_url("heart"), run=mkd_run, model_dir=mkd_export["path"]
        )


# --- the test double speaks TF Serving's formats ------------------------------------------------------
def _http(url, body=None):
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), method="GET" if body is None else "POST"
    )
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
    assert (
        status == 200 and len(rows["predictions"]) == 2 and set(rows["predictions"][1]) == {"labels", "probabilities"}
    )
    assert rows["predictions"][1]["labels"] == columnar["outputs"]["labels"][1]
    # A single output is not wrapped in a dict.
    status, raw = _http(url + ":predict", {"signature_name": "segment_slices", "inputs": (image * 500).tolist()})
    assert status == 200 and np.asarray(raw["outputs"]).shape == (2, 32, 32)
    status, labels_only = _http(url + ":predict", {"signature_name": "labels_only", "inputs": image.tolist()})
    assert status == 200 and labels_only == {"outputs": columnar["outputs"]["labels"]}
    status, labelled = _http(
        server.rest_url("heart", label="stable") + ":predict",
        {"signature_name": "labels_only", "inputs": image.tolist()},
    )
    assert status == 200 and labelled == labels_only
    status, error = _http(server.rest_url("heart", label="canary") + ":predict", {"inputs": image.tolist()})
    assert status == 400 and error == {"error": "Unrecognized servable version label: canary"}
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


def test_remote_folder_prediction(server, mkd_export, ct_image, local_labels, tmp_path):
    """A folder over REST: metadata checked once, one line per failing file, the others written, exit 2."""
    import shutil

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(ct_image, scans / "case_a_0000.nii.gz")
    (scans / "case_b.nii.gz").write_bytes(ct_image.read_bytes()[:200])
    rest = ["--server", server.rest_url("heart"), "--model-dir", mkd_export["path"]]
    out = tmp_path / "labels"
    result = CliRunner().invoke(main, ["predict", str(scans), *rest, "-o", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {scans / 'case_b.nii.gz'}: ")
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(out / "case_a.nii.gz").dataobj), local_labels)
    _assert_one_line_error(
        CliRunner().invoke(main, ["predict", str(scans), *rest, "-o", str(out), "--uncertainty", str(tmp_path / "u")]),
        "--uncertainty",
        "predict locally",
    )
