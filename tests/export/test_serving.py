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

    slices, _ = preprocess_image(
        load_image(ct_image), record["target_intensity"], PreprocessConfig.from_dict(record["preprocess"])
    )
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
    assert set(asset["signatures"]) == {"serving_default", "labels_only", "segment_slices"}


def test_only_the_predictors_segmentors_are_exported(mkd_run, mkd_export, loaded_mkd, tmp_path):
    """`--which real` exports S_real's weights only; `ensemble` both segmentors (never the alignment GAN)."""
    import tensorflow as tf

    def stored_values(version_dir):
        return sum(
            int(np.prod(shape))
            for name, shape in tf.train.list_variables(str(Path(version_dir) / "variables" / "variables"))
            if name.startswith("_all_variables/")
        )

    def parameters(segmentor):
        # with per-domain batch norm (MKD's default) only the target's set serves target images and is exported
        return sum(int(np.prod(v.shape)) for v in segmentor.variables if "_domain0/" not in v.path)

    segmentors = loaded_mkd[0].segmentors()
    assert stored_values(mkd_export["path"]) == parameters(segmentors["real"]) + parameters(segmentors["syn"])
    result = serving.export_run(mkd_run, tmp_path / "real_only", which="real")
    assert stored_values(result["path"]) == parameters(segmentors["real"])
    assert serving.read_model_asset(result["path"])["predictor"] == "real"


def test_saved_model_cli_shows_the_three_signatures(mkd_export):
    shown = subprocess.run(
        [str(BIN / "saved_model_cli"), "show", "--all", "--dir", mkd_export["path"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    default = shown[shown.index("signature_def['serving_default']") :]
    default = default[: default.index("Method name")]
    assert "inputs['image']" in default and "shape: (-1, 32, 32, 1)" in default and "DT_FLOAT" in default
    assert "outputs['probabilities']" in default and "shape: (-1, 32, 32, 8)" in default
    assert "outputs['labels']" in default and "shape: (-1, 32, 32)" in default and "DT_INT32" in default
    labels_only = shown[shown.index("signature_def['labels_only']") :]
    labels_only = labels_only[: labels_only.index("Method name")]
    assert "inputs['image']" in labels_only and "shape: (-1, 32, 32, 1)" in labels_only
    assert "outputs['labels']" in labels_only and "shape: (-1, 32, 32)" in labels_only
    assert "probabilities" not in labels_only
    raw = shown[shown.index("signature_def['segment_slices']") :]
    raw = raw[: raw.index("Method name")]
    assert "inputs['image']" in raw and "shape: (-1, -1, -1, 1)" in raw
    assert "outputs['labels']" in raw and "shape: (-1, -1, -1)" in raw and "DT_INT32" in raw
    assert "probabilities" not in raw


def test_saved_model_cli_run_gives_the_labels_of_mkd_predict(mkd_export, loaded_mkd, ct_image, tmp_path):
    model, _, record = loaded_mkd
    slices = _preprocessed_slices(ct_image, record)
    np.save(tmp_path / "slices.npy", slices[..., None])
    subprocess.run(
        [
            str(BIN / "saved_model_cli"),
            "run",
            "--dir",
            mkd_export["path"],
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"image={tmp_path / 'slices.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    labels = np.load(tmp_path / "out" / "labels.npy")
    probabilities = np.load(tmp_path / "out" / "probabilities.npy")
    expected = _in_process_labels(model, slices)
    assert labels.dtype == np.int32 and labels.shape == slices.shape
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(
        probabilities, model.predict_probabilities(slices[..., None], "ensemble").numpy(), atol=1e-6
    )
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
    outputs[name + "_labels_only"] = model.signatures["labels_only"](image=tf.constant(slices))["labels"].numpy()
np.savez(OUT, **outputs)
"""


def test_loads_and_runs_without_mkd_tf(mkd_export, confident_export, loaded_mkd, confident_run, ct_image, tmp_path):
    """Plain TensorFlow in an isolated interpreter (-I -S: no repo, no editable install) runs the signatures.

    ``segment_slices`` gets raw HU slices at twice the resolution (each pixel repeated 2 x 2): in prepare's
    convention model pixel r samples input pixel 2 r exactly, so the graph sees exactly the cache's slices,
    and input pixel j takes the class of model pixel floor((j + 1) / 2) (coordinate j / 2, halves rounded
    up). That exact comparison uses the confident run (the two-step MKD model has near-ties everywhere,
    which float rounding in a differently ordered normalisation could flip).
    """
    from mkd_tf.inference import class_values
    from mkd_tf.training import load_run

    mkd_model, _, record = loaded_mkd
    confident_model, _, _ = load_run(confident_run)
    slices = _preprocessed_slices(ct_image, record)
    window = record["target_intensity"]["window"]
    hounsfield = ((slices.astype(np.float64) + 1.0) / 2.0 * (window[1] - window[0]) + window[0]).astype(np.float32)
    # what the graph must compute: the CT window of the record, mapped to [-1, 1]
    renormalised = ((np.clip(hounsfield, *window) - window[0]) / (window[1] - window[0]) * 2.0 - 1.0).astype(np.float32)
    np.save(tmp_path / "slices.npy", slices[..., None])
    np.save(tmp_path / "raw.npy", np.repeat(np.repeat(hounsfield, 2, axis=1), 2, axis=2)[..., None])
    script = ISOLATED
    for key, value in {
        "SITE_PACKAGES": sysconfig.get_paths()["purelib"],
        "MKD_EXPORT": mkd_export["path"],
        "CONFIDENT_EXPORT": confident_export["path"],
        "SLICES": tmp_path / "slices.npy",
        "RAW": tmp_path / "raw.npy",
        "OUT": tmp_path / "out.npz",
    }.items():
        script = script.replace(key, repr(str(value)))
    process = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out["mkd_labels"], _in_process_labels(mkd_model, slices, "ensemble"))
    np.testing.assert_allclose(
        out["mkd_probabilities"], mkd_model.predict_probabilities(slices[..., None], "ensemble").numpy(), atol=1e-6
    )
    np.testing.assert_array_equal(out["confident_labels"], _in_process_labels(confident_model, slices, "real"))
    for name in ("mkd", "confident"):  # labels_only: serving_default's labels, nothing else
        np.testing.assert_array_equal(out[name + "_labels_only"], out[name + "_labels"])
    values = np.asarray(class_values(record))
    expected_raw = values[_in_process_labels(confident_model, renormalised, "real")]
    nearest = np.minimum((np.arange(64) + 1) // 2, 31)
    np.testing.assert_array_equal(out["confident_raw_labels"], expected_raw[:, nearest][:, :, nearest])
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
    ct = serving.normalise_in_graph(
        tf.constant([[-1000.0, -200.0, 300.0, 800.0, 3000.0]]), {"kind": "ct", "window": [-200.0, 800.0]}, None
    ).numpy()
    np.testing.assert_allclose(ct, [[-1.0, -1.0, 0.0, 1.0, 1.0]])


def test_warmup_requests_are_prediction_logs(mkd_export):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(mkd_export["path"]) / "assets.extra" / "tf_serving_warmup_requests"
    records = [prediction_log_pb2.PredictionLog.FromString(raw.numpy()) for raw in tf.data.TFRecordDataset(str(path))]
    assert [log.WhichOneof("log_type") for log in records] == ["predict_log"] * 6
    signatures = tf.saved_model.load(mkd_export["path"]).signatures
    expected = [(name, batch) for name in ("serving_default", "labels_only") for batch in (1, 4, 16)]
    for log, (name, batch) in zip(records, expected):
        request = log.predict_log.request
        assert request.model_spec.name == "heart" and request.model_spec.signature_name == name
        assert list(request.inputs) == ["image"]
        image = tf.make_ndarray(request.inputs["image"])
        assert image.shape == (batch, 32, 32, 1) and image.dtype == np.float32
        assert image.min() == -1.0 and image.max() == 1.0
        # Each request matches its signature's inputs (TF Serving refuses a version whose warmup fails).
        assert set(signatures[name].structured_input_signature[1]) == {"image"}
        assert signatures[name](image=tf.constant(image))["labels"].shape == (batch, 32, 32)


def _parse_models_config(path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(Path(path).read_text(), model_server_config_pb2.ModelServerConfig())


def test_models_config_lists_every_model(mkd_export, confident_export, saved_models):
    config = _parse_models_config(saved_models / "models.config")
    entries = {(c.name, c.base_path, c.model_platform) for c in config.model_config_list.config}
    assert entries == {("heart", "/models/heart", "tensorflow"), ("confident", "/models/confident", "tensorflow")}
    for entry in config.model_config_list.config:
        assert entry.model_version_policy.WhichOneof("policy_choice") == "specific"
        assert list(entry.model_version_policy.specific.versions) == [1] and not entry.version_labels
    assert serving.models_config_text(saved_models, "/srv/models/").count('base_path: "/srv/models/heart"') == 1


@pytest.mark.benchmark  # ~20-30 s: kept out of make test's 6-minute budget; run with -m benchmark
def test_version_policy_keeps_every_version_and_labels_move(mkd_run, tmp_path):
    """`--which real` as version 2 no longer replaces the served ensemble: both are listed, labels say which is which."""
    root = tmp_path / "saved_models"
    runner = CliRunner()
    first = runner.invoke(main, ["export", str(mkd_run), "--out", str(root / "heart"), "--label", "stable"])
    assert first.exit_code == 0, first.output
    assert "label 'stable' -> version 1\n" in first.stdout
    second = runner.invoke(
        main, ["export", str(mkd_run), "--out", str(root / "heart"), "--which", "real", "--label", "canary"]
    )
    assert second.exit_code == 0, second.output
    (entry,) = _parse_models_config(root / "models.config").model_config_list.config
    assert list(entry.model_version_policy.specific.versions) == [1, 2]
    assert dict(entry.version_labels) == {"stable": 1, "canary": 2}  # stable kept from the first export
    third = runner.invoke(
        main,
        [
            "export",
            str(mkd_run),
            "--out",
            str(root / "heart"),
            "--which",
            "syn",
            "--label",
            "stable",
            "--label",
            "canary",
        ],
    )
    assert third.exit_code == 0, third.output
    assert "label 'stable' -> version 3 (was version 1)" in third.stdout
    (entry,) = _parse_models_config(root / "models.config").model_config_list.config
    assert list(entry.model_version_policy.specific.versions) == [1, 2, 3]
    assert dict(entry.version_labels) == {"stable": 3, "canary": 3}
    # Another model exported next to it keeps heart's policy and labels untouched.
    result = serving.export_run(mkd_run, root / "lungs", labels=["stable"])
    assert result["labels"] == {"stable": 1}
    config = _parse_models_config(root / "models.config")
    by_name = {c.name: c for c in config.model_config_list.config}
    assert dict(by_name["heart"].version_labels) == {"stable": 3, "canary": 3}
    assert dict(by_name["lungs"].version_labels) == {"stable": 1}
    # A label whose version folder was removed is dropped (TF Serving would refuse the whole config).
    import shutil

    shutil.rmtree(root / "heart" / "3")
    text = serving.models_config_text(root)
    (heart,) = [c for c in _parse_text(text).model_config_list.config if c.name == "heart"]
    assert list(heart.model_version_policy.specific.versions) == [1, 2] and not heart.version_labels


def _parse_text(text):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def test_cli_export_next_version_and_never_overwrite(mkd_run, tmp_path):
    root = tmp_path / "saved_models"
    (root / "heart" / "1").mkdir(parents=True)
    (root / "heart" / "3").mkdir()
    (root / "heart" / "notes").mkdir()  # not a version
    (root / "ignored_file").write_text("")
    runner = CliRunner()
    result = runner.invoke(
        main, ["export", str(mkd_run), "--out", str(root / "heart"), "--which", "syn", "--serving-root", "/srv"]
    )
    assert result.exit_code == 0, result.output
    assert f"to {root / 'heart' / '4'}" in result.stdout and "predictor 'syn'" in result.stdout
    assert serving.read_model_asset(root / "heart" / "4")["predictor"] == "syn"
    assert sorted(p.name for p in (root / "heart").iterdir()) == ["1", "3", "4", "notes"]
    # Folders without a saved_model.pb (1, 3) still count for numbering; the config lists the model once,
    # with only the exported version in its policy.
    assert (root / "models.config").read_text() == (
        'model_config_list {\n  config {\n    name: "heart"\n    base_path: "/srv/heart"\n'
        '    model_platform: "tensorflow"\n    model_version_policy {\n      specific {\n        versions: 4\n'
        "      }\n    }\n  }\n}\n"
    )
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
    for default in (
        "[default: none]",
        "[default: 200;",
        "[default: 0.999 for none; 0.995 for float16; 0.975 for dynamic; 0.75 for int8]",  # MIN_AGREEMENT's
        "[default: the export's recorded cache]",
    ):
        assert default in tflite_help, default


# --- segment_slices samples like prepare ----------------------------------------------------------------
def test_resize_like_prepare_is_prepares_resampling():
    """The graph's bilinear resampling equals mkd_tf.data.preprocess.resample (scipy) for any input size."""
    import tensorflow as tf

    from mkd_tf.data.preprocess import resample

    rng = np.random.default_rng(1)
    size, spacing = 32, 3.2
    for count in (32, 40, 48, 64, 77, 20):  # finer, coarser, non-integer ratios
        slices = rng.normal(size=(2, count, count)).astype(np.float32)
        native = size * spacing / count  # the input covers the model's field of view
        # prepare: resample the (x, y, slice) volume to `spacing` in-plane; crop the size x size window at 0.
        volume = np.moveaxis(slices, 0, -1)
        expected = resample(volume, (native, native, 1.0), (spacing, spacing, 1.0), order=1)
        window = np.full((size, size, 2), np.nan, np.float32)
        n = min(size, expected.shape[0])
        window[:n, :n] = expected[:n, :n]
        got = serving.resize_like_prepare(tf.constant(slices[..., None]), size).numpy()[..., 0]
        got = np.moveaxis(got, 0, -1)
        inside = ~np.isnan(window)  # beyond the input the graph repeats the edge, prepare pads later
        np.testing.assert_allclose(got[inside], window[inside], atol=1e-4, err_msg=str(count))
        # And back: input pixel j takes model pixel round(j * size / count), as labels_to_original maps voxels.
        indices = serving.nearest_indices(count, size).numpy()
        exact = np.arange(count) * size / count
        assert np.all(np.abs(indices - np.clip(exact, 0, size - 1)) <= 0.5 + 1e-9), count
        assert np.array_equal(indices, np.clip(np.floor(exact + 0.5), 0, size - 1).astype(int)), count


def _foreground_agreement(a, b):
    """|voxels where both give the same non-background label| / |voxels where either gives a non-background label|."""
    either = (a > 0) | (b > 0)
    return float(np.sum((a == b) & (a > 0)) / max(int(either.sum()), 1))


def _segment_slices_versus_predict(export_path, model, record, image_path):
    """Labels of ``segment_slices`` on the raw slices of ``image_path`` that cover the model's window, and of
    local `mkd predict` on the same voxels; returns their foreground agreement and the in-plane ratio."""
    import tensorflow as tf

    from mkd_tf.data.nifti import load_image, to_canonical
    from mkd_tf.data.preprocess import PreprocessConfig, preprocess_image
    from mkd_tf.inference import predict_volume

    image = load_image(image_path)
    config = PreprocessConfig.from_dict(record["preprocess"])
    predicted = predict_volume(model, image, record, "real")  # what `mkd predict` writes
    canonical, _, _ = to_canonical(image.data, image.affine)
    canonical_labels, _, _ = to_canonical(predicted, image.affine)
    _, params = preprocess_image(image, record["target_intensity"], config)
    assert params["axis"] == 2 and params["spacing"][2] == pytest.approx(params["canonical_spacing"][2])
    ratio = params["spacing"][0] / params["canonical_spacing"][0]
    assert ratio == pytest.approx(round(ratio)) and params["spacing"][1] / params["canonical_spacing"][
        1
    ] == pytest.approx(ratio)
    ratio = int(round(ratio))
    width = config.size * ratio  # native pixels covering the model's field of view
    raw = np.full((canonical.shape[2], width, width), canonical.min(), np.float32)
    reference = np.zeros((canonical.shape[2], width, width), np.int64)
    valid = np.zeros((width, width), bool)
    src, dst = [], []
    for axis, start in zip(params["plane_axes"], params["crop_start"]):
        begin = start * ratio  # native index of the window's first pixel (centres aligned at index 0)
        lo, hi = max(begin, 0), min(begin + width, canonical.shape[axis])
        src.append(slice(lo, hi))
        dst.append(slice(lo - begin, hi - begin))
    raw[:, dst[0], dst[1]] = np.moveaxis(canonical, 2, 0)[:, src[0], src[1]]
    reference[:, dst[0], dst[1]] = np.moveaxis(canonical_labels, 2, 0)[:, src[0], src[1]]
    valid[dst[0], dst[1]] = True
    signature = tf.saved_model.load(str(export_path)).signatures["segment_slices"]
    served = signature(image=tf.constant(raw[..., None]))["labels"].numpy()
    assert served.shape == raw.shape
    return _foreground_agreement(served[:, valid], reference[:, valid]), ratio


@pytest.mark.parametrize("grid", [(48, 48, 16), (96, 96, 16)], ids=["cache-spacing-3.2mm", "native-1.6mm"])
def test_segment_slices_agrees_with_mkd_predict(grid, confident_run, confident_export, tmp_path):
    """segment_slices on raw HU slices covering the field of view labels the voxels `mkd predict` labels.

    A CT phantom case `prepare` never saw, on the cache's in-plane spacing (3.2 mm) and on a native 1.6 mm
    grid (same 7.5 mm slices). Agreement = |voxels where both give the same structure| / |voxels where
    either gives a structure| (a multi-class Jaccard index over the foreground). With tf.image.resize's
    half-pixel centres (the graph before) the 1.6 mm case agreed at 0.55-0.58 on three phantom cases (a
    0.8 mm shift); with prepare's convention 0.999-1.0.
    """
    from mkd_tf.data.nifti import save_volume
    from mkd_tf.data.phantom import phantom_case
    from mkd_tf.training import load_run

    case = phantom_case("ct", 1009, seed=5, shape=grid)
    path = save_volume(tmp_path / "ct.nii.gz", case.image, case.affine, np.int16)
    model, _, record = load_run(confident_run)
    agreement, ratio = _segment_slices_versus_predict(confident_export["path"], model, record, path)
    assert ratio == (1 if grid[0] == 48 else 2)
    assert agreement >= (0.99 if ratio == 1 else 0.95), agreement


def test_segment_slices_converts_to_tflite_builtins(confident_export):
    """The resampling ops (RESIZE_BILINEAR, RANGE, FLOOR_DIV, GATHER) are TFLite builtins: no Flex ops."""
    import tensorflow as tf

    from mkd_tf.export.tflite import interpreter, op_names

    converter = tf.lite.TFLiteConverter.from_saved_model(confident_export["path"], signature_keys=["segment_slices"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    content = converter.convert()
    ops = op_names(content)
    assert {"RESIZE_BILINEAR", "GATHER"} <= ops and not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    raw = np.random.default_rng(0).uniform(-1000, 800, size=(3, 48, 48, 1)).astype(np.float32)
    lite = interpreter(content).get_signature_runner("segment_slices")(image=raw)["labels"]
    reference = tf.saved_model.load(confident_export["path"]).signatures["segment_slices"](image=tf.constant(raw))
    np.testing.assert_array_equal(lite, reference["labels"].numpy())


# --- bad input to `mkd export`: one line, exit status 2, nothing written -------------------------------
def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def _files_under(folder):
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_export_of_a_truncated_checkpoint_is_one_line(mkd_run, tmp_path):
    import shutil

    run = Path(shutil.copytree(mkd_run, tmp_path / "run"))
    data = next((run / "best").glob("weights.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "saved_models" / "heart")])
    _assert_one_line_error(
        result, f"error: {run / 'best'}: cannot read the best checkpoint: truncated or corrupt weights file"
    )
    assert not (tmp_path / "saved_models").exists()


def test_export_bad_outputs_and_labels_are_one_line(mkd_run, tmp_path):
    runner = CliRunner()
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    result = runner.invoke(main, ["export", str(mkd_run), "--out", str(blocker / "saved_models" / "heart")])
    _assert_one_line_error(result, f"cannot create the model folder: {blocker} is a file, not a folder")
    assert blocker.read_text() == "a regular file"

    root = tmp_path / "saved_models"
    for label, problem in (("7", "a version label must start with a letter"), ("a/b", "must start with a letter")):
        result = runner.invoke(main, ["export", str(mkd_run), "--out", str(root / "heart"), "--label", label])
        _assert_one_line_error(result, f"error: --label {label}: ", problem)
    assert not root.exists()

    root.mkdir()
    (root / "models.config").write_text("model_config_list { config { name: 'x' nonsense: 1 } }\n")
    result = runner.invoke(main, ["export", str(mkd_run), "--out", str(root / "heart")])
    _assert_one_line_error(result, f"error: {root / 'models.config'}: not a TF Serving model config")
    assert _files_under(root) == ["models.config"]
    (root / "models.config").write_text("model_config_list { config { base_path: '/models/x' } }\n")
    result = runner.invoke(main, ["export", str(mkd_run), "--out", str(root / "heart")])
    _assert_one_line_error(
        result, f"error: {root / 'models.config'}: key 'model_config_list.config[0].name' is missing"
    )
    assert _files_under(root) == ["models.config"]

    (root / "models.config").unlink()
    (root / "models.config").mkdir()
    result = runner.invoke(main, ["export", str(mkd_run), "--out", str(root / "heart")])
    _assert_one_line_error(result, f"error: {root / 'models.config'}: is a folder")
    assert _files_under(root) == ["models.config"]


_HAND_WRITTEN = """model_config_list {
  config {
    name: "lungs"
    base_path: "/srv/elsewhere/lungs"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
  }
  config {
    name: "heart"
    base_path: "/old/heart"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "gone" value: 7 }
  }
}
"""


def test_models_config_update_keeps_every_entry_it_did_not_create(tmp_path):
    root = tmp_path / "saved_models"
    for version in (1, 2):
        (root / "heart" / str(version)).mkdir(parents=True)
        (root / "heart" / str(version) / "saved_model.pb").write_bytes(b"")
    (root / "lungs" / "5").mkdir(parents=True)  # served by the hand-written entry, not by an mkd export
    (root / "models.config").write_text(_HAND_WRITTEN)
    config = _parse_text(serving.models_config_text(root, "/models", {"heart": {"canary": 2}}, names=["heart"]))
    by_name = {c.name: c for c in config.model_config_list.config}
    assert by_name["lungs"] == _parse_text(_HAND_WRITTEN).model_config_list.config[0]  # untouched
    heart = by_name["heart"]
    assert heart.base_path == "/models/heart"
    assert list(heart.model_version_policy.specific.versions) == [1, 2]
    assert dict(heart.version_labels) == {"stable": 1, "canary": 2}  # 'gone' pointed at no exported version


def test_cli_export_keeps_hand_written_entries_and_removes_only_its_own_stale_staging(mkd_run, tmp_path):
    import os

    from mkd_tf.files import lock_folder

    root = tmp_path / "saved_models"
    (root / "heart").mkdir(parents=True)
    (root / "models.config").write_text(_HAND_WRITTEN)
    stale = root / "heart" / ".1.tmp-0123abcd"  # a killed export's staging: removed
    (stale / "variables").mkdir(parents=True)
    (stale / "saved_model.pb").write_bytes(b"half")
    mine = root / "heart" / ".2.tmp-89abcdef"  # the pattern, but a file we never write: kept
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    running = root / "heart" / ".3.tmp-00000000"  # a running export's staging (locked): kept
    running.mkdir()
    (running / "saved_model.pb").write_bytes(b"writing")
    other = root / "heart" / ".1.tmp-0123abcd.bak"  # not the exact pattern: kept
    other.mkdir()
    descriptor = lock_folder(running)
    try:
        result = CliRunner().invoke(main, ["export", str(mkd_run), "--out", str(root / "heart"), "--label", "canary"])
    finally:
        os.close(descriptor)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (root / "heart").iterdir()) == [
        ".1.tmp-0123abcd.bak",
        ".2.tmp-89abcdef",
        ".3.tmp-00000000",
        "1",
    ]
    config = _parse_models_config(root / "models.config")
    hand_written = {c.name: c for c in _parse_text(_HAND_WRITTEN).model_config_list.config}
    by_name = {c.name: c for c in config.model_config_list.config}
    assert by_name["lungs"] == hand_written["lungs"]
    assert by_name["heart"].base_path == "/models/heart"
    assert list(by_name["heart"].model_version_policy.specific.versions) == [1]
    assert dict(by_name["heart"].version_labels) == {"stable": 1, "canary": 1}

    (root / "models.config").write_text('custom_model_config { type_url: "example.org/x" value: "" }\n')
    before = (root / "models.config").read_text()
    result = CliRunner().invoke(main, ["export", str(mkd_run), "--out", str(root / "heart")])
    _assert_one_line_error(result, f"error: {root / 'models.config'}: uses custom_model_config")
    assert not (root / "heart" / "2").exists() and (root / "models.config").read_text() == before
