"""`mkd export`: TF Serving layout, signatures, self-containment, warmup, versions, models.config."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mkd_cli.main import main
from mkd_tf.data.layouts import MMWHS_LABELS
from mkd_tf.errors import MkdError
from mkd_tf.export import serving

BIN = Path(sys.executable).parent


def _preprocessed_slices(ct_image, record):
    """What `mkd predict` feeds the network for ``ct_image``: `(slices, H, W)` float32."""
    from mkd_tf.data.nifti import load_image
    from mkd_tf.data.preprocess import PreprocessConfig, preprocess_image

    slices, _ = preprocess_image(load_image(ct_image), record["target_intensity"],
                                 PreprocessConfig.from_dict(record["preprocess"]))
    return slices


def _in_process_labels(model, slices, which="ensemble"):
    from mkd_tf.inference import predict_slices

    return predict_slices(lambda batch: model.predict_probabilities(batch, which), slices)


def test_layout_and_model_asset(mkd_export, saved_models):
    version_dir = Path(mkd_export["path"])
    assert version_dir == saved_models / "heart" / "1" and mkd_export["version"] == 1
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables" / "variables.index").is_file()
    assert (version_dir / "assets.extra" / "tf_serving_warmup_requests").is_file()
    # Staging folders are renamed into place, never left behind.
    assert [p.name for p in (saved_models / "heart").iterdir()] == ["1"]
    asset = serving.read_model_asset(version_dir)
    assert asset["method"] == "mkd" and asset["predictor"] == "ensemble" and asset["name"] == "heart"
    assert asset["classes"][0] == "background" and len(asset["classes"]) == 8
    assert asset["label_values"] == MMWHS_LABELS
    assert asset["class_values"] == [0, 205, 420, 500, 550, 600, 820, 850]
    assert asset["size"] == 32 and asset["preprocess"]["spacing"] == [3.2, 3.2, 7.5]
    assert asset["target_intensity"] == {"kind": "ct", "window": [-200.0, 800.0]}
    assert set(asset["signatures"]) == {"serving_default", "segment_slices"}


def test_only_the_predictors_segmentors_are_exported(mkd_run, mkd_export, loaded_mkd, tmp_path):
    """`--which real` exports S_real's weights only; `ensemble` both segmentors (never the alignment GAN)."""
    import tensorflow as tf

    def stored_values(version_dir):
        return sum(int(np.prod(shape)) for name, shape in tf.train.list_variables(
            str(Path(version_dir) / "variables" / "variables")) if name.startswith("_all_variables/"))

    def parameters(segmentor):
        return sum(int(np.prod(v.shape)) for v in segmentor.variables)

    segmentors = loaded_mkd[0].segmentors()
    assert stored_values(mkd_export["path"]) == parameters(segmentors["real"]) + parameters(segmentors["syn"])
    result = serving.export_run(mkd_run, tmp_path / "real_only", which="real")
    assert stored_values(result["path"]) == parameters(segmentors["real"])
    assert serving.read_model_asset(result["path"])["predictor"] == "real"


def test_saved_model_cli_shows_both_signatures(mkd_export):
    shown = subprocess.run([str(BIN / "saved_model_cli"), "show", "--all", "--dir", mkd_export["path"]],
                           capture_output=True, text=True, check=True).stdout
    default = shown[shown.index("signature_def['serving_default']"):]
    default = default[:default.index("Method name")]
    assert "inputs['image']" in default and "shape: (-1, 32, 32, 1)" in default and "DT_FLOAT" in default
    assert "outputs['probabilities']" in default and "shape: (-1, 32, 32, 8)" in default
    assert "outputs['labels']" in default and "shape: (-1, 32, 32)" in default and "DT_INT32" in default
    raw = shown[shown.index("signature_def['segment_slices']"):]
    raw = raw[:raw.index("Method name")]
    assert "inputs['image']" in raw and "shape: (-1, -1, -1, 1)" in raw
    assert "outputs['labels']" in raw and "shape: (-1, -1, -1)" in raw and "DT_INT32" in raw
    assert "probabilities" not in raw


def test_saved_model_cli_run_gives_the_labels_of_mkd_predict(mkd_export, loaded_mkd, ct_image, tmp_path):
    model, _, record = loaded_mkd
    slices = _preprocessed_slices(ct_image, record)
    np.save(tmp_path / "slices.npy", slices[..., None])
    subprocess.run([str(BIN / "saved_model_cli"), "run", "--dir", mkd_export["path"], "--tag_set", "serve",
                    "--signature_def", "serving_default", "--inputs", f"image={tmp_path / 'slices.npy'}",
                    "--outdir", str(tmp_path / "out")], capture_output=True, text=True, check=True)
    labels = np.load(tmp_path / "out" / "labels.npy")
    probabilities = np.load(tmp_path / "out" / "probabilities.npy")
    expected = _in_process_labels(model, slices)
    assert labels.dtype == np.int32 and labels.shape == slices.shape
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(probabilities, model.predict_probabilities(slices[..., None], "ensemble").numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)


ISOLATED = r"""
import sys
sys.path.append(SITE_PACKAGES)  # the venv's packages, without .pth files: no editable mkd_tf
try:
    import mkd_tf
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("mkd_tf is importable: the test is not isolated")
import numpy as np
import tensorflow as tf

slices, raw, outputs = np.load(SLICES), np.load(RAW), {}
for name, path in (("mkd", MKD_EXPORT), ("confident", CONFIDENT_EXPORT)):
    model = tf.saved_model.load(path)
    default = model.signatures["serving_default"](image=tf.constant(slices))
    outputs[name + "_labels"] = default["labels"].numpy()
    outputs[name + "_probabilities"] = default["probabilities"].numpy()
    outputs[name + "_raw_labels"] = model.signatures["segment_slices"](image=tf.constant(raw))["labels"].numpy()
np.savez(OUT, **outputs)
"""


def test_loads_and_runs_without_mkd_tf(mkd_export, confident_export, loaded_mkd, confident_run, ct_image, tmp_path):
    """Plain TensorFlow in an isolated interpreter (-I -S: no repo, no editable install) runs both signatures.

    ``segment_slices`` gets raw HU slices at twice the resolution (each pixel repeated 2 x 2): the bilinear
    resize back to 32 x 32 samples between two equal pixels, so it sees exactly the cache's slices, and its
    nearest-neighbour output must be the label values of the in-process labels, each repeated 2 x 2. That
    exact comparison uses the confident run (the two-step MKD model has near-ties everywhere, which
    float rounding in a differently ordered normalisation could flip).
    """
    from mkd_tf.data.preprocess import apply_intensity
    from mkd_tf.inference import class_values
    from mkd_tf.training import load_run

    mkd_model, _, record = loaded_mkd
    confident_model, _, _ = load_run(confident_run)
    slices = _preprocessed_slices(ct_image, record)
    window = record["target_intensity"]["window"]
    hounsfield = ((slices.astype(np.float64) + 1.0) / 2.0 * (window[1] - window[0]) + window[0]).astype(np.float32)
    renormalised = apply_intensity(hounsfield, record["target_intensity"])  # what the graph must compute
    np.save(tmp_path / "slices.npy", slices[..., None])
    np.save(tmp_path / "raw.npy", np.repeat(np.repeat(hounsfield, 2, axis=1), 2, axis=2)[..., None])
    script = ISOLATED
    for key, value in {"SITE_PACKAGES": sysconfig.get_paths()["purelib"], "MKD_EXPORT": mkd_export["path"],
                       "CONFIDENT_EXPORT": confident_export["path"], "SLICES": tmp_path / "slices.npy",
                       "RAW": tmp_path / "raw.npy", "OUT": tmp_path / "out.npz"}.items():
        script = script.replace(key, repr(str(value)))
    process = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, capture_output=True,
                             text=True)
    assert process.returncode == 0, process.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out["mkd_labels"], _in_process_labels(mkd_model, slices, "ensemble"))
    np.testing.assert_allclose(out["mkd_probabilities"],
                               mkd_model.predict_probabilities(slices[..., None], "ensemble").numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["confident_labels"], _in_process_labels(confident_model, slices, "real"))
    values = np.asarray(class_values(record))
    expected_raw = values[_in_process_labels(confident_model, renormalised, "real")]
    np.testing.assert_array_equal(out["confident_raw_labels"],
                                  np.repeat(np.repeat(expected_raw, 2, axis=1), 2, axis=2))
    assert len(np.unique(out["confident_raw_labels"])) > 2
    assert out["mkd_raw_labels"].shape == (len(slices), 64, 64)
    assert set(np.unique(out["mkd_raw_labels"])) <= set(values.tolist())


def test_segment_slices_zscore_normalisation_matches_numpy():
    """In-graph percentile clip + z-score equals mkd_tf.data.preprocess on the same voxels."""
    import tensorflow as tf

    from mkd_tf.data.preprocess import PreprocessConfig, normalise_intensity

    rng = np.random.default_rng(0)
    volume = (rng.gamma(2.0, 150.0, size=(5, 24, 20, 1)) + rng.normal(0, 5, size=(5, 24, 20, 1))).astype(np.float32)
    config = PreprocessConfig(percentiles=(0.5, 99.5))
    expected, params = normalise_intensity(volume, "zscore", config)
    got = serving.normalise_in_graph(tf.constant(volume), {"kind": "zscore"}, config.percentiles).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert got.min() == pytest.approx((params["clip"][0] - params["mean"]) / params["std"], abs=2e-5)
    ct = serving.normalise_in_graph(tf.constant([[-1000.0, -200.0, 300.0, 800.0, 3000.0]]),
                                    {"kind": "ct", "window": [-200.0, 800.0]}, None).numpy()
    np.testing.assert_allclose(ct, [[-1.0, -1.0, 0.0, 1.0, 1.0]])


def test_warmup_requests_are_prediction_logs(mkd_export):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(mkd_export["path"]) / "assets.extra" / "tf_serving_warmup_requests"
    records = [prediction_log_pb2.PredictionLog.FromString(raw.numpy()) for raw in tf.data.TFRecordDataset(str(path))]
    assert [log.WhichOneof("log_type") for log in records] == ["predict_log"] * 3
    signature = tf.saved_model.load(mkd_export["path"]).signatures["serving_default"]
    for log, batch in zip(records, (1, 4, 16)):
        request = log.predict_log.request
        assert request.model_spec.name == "heart" and request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == ["image"]
        image = tf.make_ndarray(request.inputs["image"])
        assert image.shape == (batch, 32, 32, 1) and image.dtype == np.float32
        assert image.min() == -1.0 and image.max() == 1.0
        assert signature(image=tf.constant(image))["labels"].shape == (batch, 32, 32)


def test_models_config_lists_every_model(mkd_export, confident_export, saved_models):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = (saved_models / "models.config").read_text()
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    entries = {(c.name, c.base_path, c.model_platform) for c in config.model_config_list.config}
    assert entries == {("heart", "/models/heart", "tensorflow"), ("confident", "/models/confident", "tensorflow")}
    assert serving.models_config_text(saved_models, "/srv/models/").count('base_path: "/srv/models/heart"') == 1


def test_cli_export_next_version_and_never_overwrite(mkd_run, tmp_path):
    root = tmp_path / "saved_models"
    (root / "heart" / "1").mkdir(parents=True)
    (root / "heart" / "3").mkdir()
    (root / "heart" / "notes").mkdir()  # not a version
    (root / "ignored_file").write_text("")
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(mkd_run), "--out", str(root / "heart"), "--which", "syn",
                                  "--serving-root", "/srv"])
    assert result.exit_code == 0, result.output
    assert f"to {root / 'heart' / '4'}" in result.stdout and "predictor 'syn'" in result.stdout
    assert serving.read_model_asset(root / "heart" / "4")["predictor"] == "syn"
    assert sorted(p.name for p in (root / "heart").iterdir()) == ["1", "3", "4", "notes"]
    # Folders without a saved_model.pb (1, 3) still count for numbering; the config lists the model once.
    assert (root / "models.config").read_text() == (
        'model_config_list {\n  config {\n    name: "heart"\n    base_path: "/srv/heart"\n'
        '    model_platform: "tensorflow"\n  }\n}\n')
    before = (root / "heart" / "4" / "saved_model.pb").read_bytes()
    again = runner.invoke(main, ["export", str(mkd_run), "--out", str(root / "heart"), "--version", "4"])
    assert again.exit_code == 2
    assert again.stderr.strip().count("\n") == 0 and "never overwritten" in again.stderr
    assert (root / "heart" / "4" / "saved_model.pb").read_bytes() == before
    with pytest.raises(MkdError, match="never overwritten"):
        serving.export_run(mkd_run, root / "heart", version=3)
    unknown = runner.invoke(main, ["export", str(mkd_run), "--out", str(root / "heart"), "--which", "teacher"])
    assert unknown.exit_code == 2 and "syn, real, ensemble" in unknown.stderr
    assert sorted(p.name for p in (root / "heart").iterdir()) == ["1", "3", "4", "notes"]


def test_cli_help_shows_defaults():
    runner = CliRunner()
    export_help = runner.invoke(main, ["export", "--help"]).output
    for default in ("[default: ensemble]", "[default: best]", "[default: /models]", "[default: the next free integer]"):
        assert default in " ".join(export_help.split()), default
    tflite_help = " ".join(runner.invoke(main, ["tflite", "--help"]).output.split())
    for default in ("[default: none]", "[default: 200;", "[default: 0.99; 0.97 for int8]",
                    "[default: the export's recorded cache]"):
        assert default in tflite_help, default
