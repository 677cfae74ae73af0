"""`mkd tflite`: every quantisation converts with builtin ops only and agrees with the SavedModel."""

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mkd_cli.main import main
from mkd_tf.export import tflite

PARITY = re.compile(
    r"parity \((?P<mode>\w+), (?P<slices>\d+) test slices\): Dice agreement (?P<agreement>[\d.]+) "
    r"\(threshold (?P<threshold>[\d.]+)\), pixel agreement (?P<pixels>[\d.]+), "
    r"max \|probability difference\| (?P<difference>[\d.e+-]+)"
)


def _parameters(saved_model_dir):
    import tensorflow as tf

    return sum(
        int(np.prod(shape))
        for name, shape in tf.train.list_variables(str(Path(saved_model_dir) / "variables" / "variables"))
        if name.startswith("_all_variables/")
    )


def _tensor_types(path):
    """dtype names of every tensor of a .tflite model."""
    return {np.dtype(detail["dtype"]).name for detail in tflite.interpreter(path).get_tensor_details()}


def test_dice_agreement_by_hand():
    a = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    b = np.array([[0, 1, 2, 2], [2, 2, 0, 3]])
    # class 1: |A|=2, |B|=1, overlap 1 -> 2/3; class 2: |A|=3, |B|=4, overlap 3 -> 6/7; class 3: 0/1 -> 0
    assert tflite.dice_agreement(a, b, 4) == pytest.approx((2 / 3 + 6 / 7 + 0) / 3)
    assert tflite.dice_agreement(np.zeros((2, 2)), np.zeros((2, 2)), 4) == 1.0
    assert list(tflite.evenly_spaced(np.arange(10), 4)) == [0, 3, 6, 9]


@pytest.mark.parametrize("mode", tflite.QUANTIZATIONS)
def test_each_quantisation_converts_and_agrees(mode, confident_export, tmp_path):
    out = tmp_path / f"heart_{mode}.tflite"
    result = CliRunner().invoke(main, ["tflite", confident_export["path"], "--out", str(out), "--quantize", mode])
    assert result.exit_code == 0, result.output
    parity = PARITY.search(result.stdout)
    assert parity, result.stdout
    assert parity["mode"] == mode and int(parity["slices"]) == 16  # the test case's slices
    assert float(parity["threshold"]) == tflite.DEFAULT_MIN_AGREEMENT[mode]
    assert float(parity["agreement"]) >= tflite.DEFAULT_MIN_AGREEMENT[mode]
    assert float(parity["pixels"]) >= 0.99
    assert float(parity["difference"]) <= {"none": 1e-4, "float16": 0.05, "dynamic": 0.5, "int8": 0.5}[mode]
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left

    ops = tflite.op_names(out)
    assert not [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")], ops
    assert {"CONV_2D", "TRANSPOSE_CONV", "MAX_POOL_2D", "CONCATENATION", "SOFTMAX", "ARG_MAX"} <= ops
    runner = tflite.interpreter(out).get_signature_runner("serving_default")
    assert set(runner.get_input_details()) == {"image"}
    assert runner.get_input_details()["image"]["dtype"] == np.float32
    outputs = runner.get_output_details()
    assert outputs["labels"]["dtype"] == np.int32 and outputs["probabilities"]["dtype"] == np.float32
    types = _tensor_types(out)
    # Each mode really changed the stored weights / the arithmetic: float32 weights take 4 bytes per
    # parameter, float16 2, int8 1 (plus a few KiB of graph and per-channel scales).
    weights = 4 * _parameters(confident_export["path"])
    size = out.stat().st_size
    assert {
        "none": weights <= size < weights + 40_000,
        "float16": weights / 2 <= size < weights / 2 + 40_000,
        "dynamic": size < weights / 4 + 40_000,
        "int8": size < weights / 4 + 40_000,
    }[mode], (size, weights)
    if mode == "none":
        assert "int8" not in types and "float16" not in types
    if mode == "float16":
        assert "float16" in types and "DEQUANTIZE" in ops
    if mode == "dynamic":
        assert "int8" in types and "QUANTIZE" not in ops  # int8 weights, float activations in and out
    if mode == "int8":
        assert "int8" in types and {"QUANTIZE", "DEQUANTIZE"} <= ops


def test_too_high_threshold_fails_and_writes_nothing(confident_export, tmp_path):
    out = tmp_path / "strict.tflite"
    result = CliRunner().invoke(
        main, ["tflite", confident_export["path"], "--out", str(out), "--quantize", "int8", "--min-agreement", "1.0"]
    )
    assert result.exit_code == 2
    parity = PARITY.search(result.stdout)
    assert parity and float(parity["agreement"]) < 1.0
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0
    assert "< --min-agreement 1.0; not written" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_mkd_ensemble_converts_with_builtins(mkd_export, tmp_path):
    """The ensemble (two U-Nets, mean of softmaxes) converts with no Flex ops and matches in float32 to round-off."""
    result = tflite.convert_to_tflite(mkd_export["path"], tmp_path / "ensemble.tflite", "none")
    assert result["max_probability_difference"] < 1e-5
    # Labels agree up to near-ties of the two-step model: measured max |probability difference| 3.0e-8, and
    # 1 of the 16,384 parity pixels has a top-2 gap below 1e-7 (33 below 1e-6), so a few labels may flip.
    assert result["agreement"] >= 0.99 and result["pixel_agreement"] >= 0.999
    assert {"ADD", "ADD_N", "MUL"} & set(result["ops"]) and not [op for op in result["ops"] if op.startswith("Flex")]


def test_op_names_reads_builtin_and_flex_operators_from_the_flatbuffer(tmp_path):
    """Builtins by name; an embedded TensorFlow op (a Flex op, which this interpreter cannot even load) by its
    own name; from bytes or a file alike."""
    import tensorflow as tf

    class Determinant(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3, 3], tf.float32)])
        def __call__(self, x):
            return {"y": tf.nn.softmax(tf.linalg.det(x) + tf.reduce_sum(x, axis=[1, 2]))}

    module = Determinant()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    content = converter.convert()
    (tmp_path / "flex.tflite").write_bytes(content)
    expected = {"ADD", "SUM", "SOFTMAX", "FlexMatrixDeterminant"}
    assert tflite.op_names(content) == tflite.op_names(tmp_path / "flex.tflite") == expected


def test_missing_cache_is_one_line(confident_export, tmp_path):
    result = CliRunner().invoke(
        main,
        ["tflite", confident_export["path"], "--out", str(tmp_path / "x.tflite"), "--cache", str(tmp_path / "nowhere")],
    )
    assert result.exit_code == 2 and "slice cache for the parity check not found" in result.stderr
    not_saved_model = CliRunner().invoke(main, ["tflite", str(tmp_path), "--out", str(tmp_path / "x.tflite")])
    assert not_saved_model.exit_code == 2 and "no saved_model.pb" in not_saved_model.stderr


@pytest.mark.parametrize("out", ["notes.txt/a.tflite", "notes.txt/deeper/a.tflite"])
def test_an_output_below_a_file_is_refused_before_converting(tmp_path, monkeypatch, out):
    """Checked before the conversion (14 s for a real model), so no SavedModel is needed to reach it."""
    saved_model = tmp_path / "sm" / "mkd" / "1"
    saved_model.mkdir(parents=True)
    (saved_model / "saved_model.pb").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("mine")

    def must_not_convert(*arguments, **keywords):
        raise AssertionError("converted before checking the output path")

    monkeypatch.setattr(tflite, "make_converter", must_not_convert)
    monkeypatch.setattr(tflite, "read_model_asset", must_not_convert)
    result = CliRunner().invoke(main, ["tflite", str(saved_model), "--out", str(tmp_path / out)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr == (
        f"error: {tmp_path / out}: cannot write the TFLite file: {tmp_path / 'notes.txt'} is a file, not a folder\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "sm"]


def test_help_states_the_agreement_thresholds_the_code_uses():
    result = CliRunner().invoke(main, ["tflite", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for mode, threshold in tflite.DEFAULT_MIN_AGREEMENT.items():
        assert f"{threshold} for {mode}" in text
    assert len(tflite.DEFAULT_MIN_AGREEMENT) == len(tflite.QUANTIZATIONS) == 4
