"""`mkd tflite`: an exported SavedModel -> a LiteRT (TFLite) flatbuffer, checked against the SavedModel.

Conversion uses ``tf.lite.TFLiteConverter.from_saved_model(dir, signature_keys=["serving_default"])``
with builtin ops only (``TFLITE_BUILTINS``; ``TFLITE_BUILTINS_INT8`` for ``int8``), so the result never
needs the Flex (TensorFlow) delegate. The converted model keeps the ``serving_default`` signature:
input ``image`` float32 `(batch, H, W, 1)`, outputs ``probabilities`` float32 `(batch, H, W, classes)`
and ``labels`` int32 `(batch, H, W)`. The batch dimension stays dynamic (``shape_signature`` -1; the
interpreter starts at batch 1 and resizes on demand): every op the U-Net needs converts with a dynamic
batch, so no separate fixed-batch signature is exported.

Quantisation modes:

- ``none``: float32 weights and activations.
- ``float16``: weights stored as float16 (dequantised at load), float32 compute. ~1/2 the size.
- ``dynamic``: weights int8, activations quantised on the fly (dynamic range). ~1/4 the size.
- ``int8``: full integer: weights and activations int8, calibrated on a representative dataset of
  the cache's target TRAINING slices. The model's input and outputs stay float32 / int32 (the
  converter adds QUANTIZE / DEQUANTIZE at the edges), so callers feed the same tensors as for the
  float model. Softmax probabilities are int8 with a step of 1/256, so near-ties between classes
  may flip: the default agreement threshold is lower (see :data:`DEFAULT_MIN_AGREEMENT`).

Parity: after converting, the flatbuffer (still under a temporary name) and the SavedModel both
segment held-out slices (the cache's target TEST split, at most ``parity_slices`` of them, evenly
spaced); the report gives the Dice agreement of the two label maps (mean over the foreground classes
either one predicts; 1.0 when neither predicts any) and the largest absolute probability difference.
Below ``min_agreement`` the file is not written and :class:`MkdError` is raised; otherwise it is moved
into place atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mkd_tf.data.cache import SliceCache
from mkd_tf.errors import MkdError, fail
from mkd_tf.export import DEFAULT_MIN_AGREEMENT, QUANTIZATIONS
from mkd_tf.export.serving import read_model_asset
from mkd_tf.files import atomic_path, check_parent_is_folder
from mkd_tf.metrics import class_overlaps, dice_of_overlaps

if TYPE_CHECKING:  # annotations only: TensorFlow is imported where it is used
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

SIGNATURE = "serving_default"


def evenly_spaced(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` entries of ``rows``, spread evenly (deterministic)."""
    rows = np.asarray(rows)
    if limit is None or len(rows) <= limit:
        return rows
    return rows[np.unique(np.linspace(0, len(rows) - 1, int(limit)).round().astype(int))]


def make_converter(
    saved_model_dir: str | os.PathLike, quantize: str, representative_images: np.ndarray | None = None
) -> tf.lite.TFLiteConverter:
    """A configured ``tf.lite.TFLiteConverter`` for ``serving_default`` of ``saved_model_dir``.

    Args:
        saved_model_dir: an exported version folder.
        quantize: one of :data:`QUANTIZATIONS`.
        representative_images: `(n, H, W)` float32 preprocessed slices (``int8`` only).
    """
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise MkdError(f"--quantize {quantize}: choose from {', '.join(QUANTIZATIONS)}")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        if representative_images is None or len(representative_images) == 0:
            raise MkdError("--quantize int8 needs representative slices (the cache's target training split is empty)")
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        images = np.asarray(representative_images, np.float32)

        def representative_dataset():
            for image in images:
                yield {"image": image[None, ..., None]}

        converter.representative_dataset = representative_dataset
    return converter


def interpreter(model_path_or_content: str | os.PathLike | bytes, num_threads: int | None = None) -> Interpreter:
    """An ``ai_edge_litert`` interpreter with tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    source = (
        {"model_content": bytes(model_path_or_content)}
        if isinstance(model_path_or_content, (bytes, bytearray))
        else {"model_path": str(model_path_or_content)}
    )
    result = Interpreter(**source, num_threads=num_threads)
    result.allocate_tensors()
    return result


def op_names(model_path_or_content: str | os.PathLike | bytes) -> set[str]:
    """The operators a .tflite model uses, as stored in its operator table (every subgraph).

    Read from the flatbuffer with the LiteRT schema (``ai_edge_litert.schema_py_generated``): the
    interpreter has no public list of its operators, and a delegate would hide them behind ``DELEGATE``.

    Args:
        model_path_or_content: a .tflite file or its bytes.

    Returns:
        Builtin operators by name (``CONV_2D``); a custom operator by its own name (``FlexConv2D`` would
        mean TensorFlow ops were embedded), or ``CUSTOM`` when it has none.
    """
    from ai_edge_litert import schema_py_generated as schema

    content = (
        bytes(model_path_or_content)
        if isinstance(model_path_or_content, (bytes, bytearray))
        else Path(model_path_or_content).read_bytes()
    )
    builtin_names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = schema.Model.GetRootAs(content, 0)
    names = set()
    for index in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(index)
        # The schema stores a builtin code twice (an int8 field from before there were 127 operators and
        # an int32 one); the operator's is the larger of the two.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.add((code.CustomCode() or b"").decode() or "CUSTOM")
        else:
            names.add(builtin_names.get(builtin, f"BUILTIN_{builtin}"))
    return names


def run_tflite(
    model_path_or_content: str | os.PathLike | bytes, images: np.ndarray, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """``serving_default`` of a .tflite model on `(n, H, W)` slices -> `(labels (n, H, W), probabilities)`."""
    runner = interpreter(model_path_or_content).get_signature_runner(SIGNATURE)
    labels, probabilities = [], []
    for start in range(0, len(images), batch_size):
        outputs = runner(image=np.asarray(images[start : start + batch_size], np.float32)[..., None])
        labels.append(outputs["labels"])
        probabilities.append(outputs["probabilities"])
    return np.concatenate(labels), np.concatenate(probabilities)


def run_saved_model(signature: Callable, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``serving_default`` of a loaded SavedModel on `(n, H, W)` slices -> `(labels, probabilities)`."""
    import tensorflow as tf

    labels, probabilities = [], []
    for start in range(0, len(images), batch_size):
        outputs = signature(image=tf.constant(np.asarray(images[start : start + batch_size], np.float32)[..., None]))
        labels.append(outputs["labels"].numpy())
        probabilities.append(outputs["probabilities"].numpy())
    return np.concatenate(labels), np.concatenate(probabilities)


def dice_agreement(labels_a: np.ndarray, labels_b: np.ndarray, num_classes: int) -> float:
    """Mean Dice between two class maps over the foreground classes (:func:`mkd_tf.metrics.dice_of_overlaps`:
    a class absent from both scores 1.0)."""
    return float(np.mean(dice_of_overlaps(class_overlaps(labels_a, labels_b, num_classes))[1:]))


#: probabilities closer than this are a tie of the SavedModel itself: float32 round-off (TFLite's ``none``
#: conversion differs by at most 3e-8 on the test models) may pick either class, and neither is wrong
TIE_TOLERANCE = 1e-5


def untie(lite_labels: np.ndarray, reference_labels: np.ndarray, reference_probabilities: np.ndarray) -> np.ndarray:
    """``lite_labels`` where they differ from the reference only at its own ties: a pixel whose TFLite class
    has a SavedModel probability within :data:`TIE_TOLERANCE` of the SavedModel's top class counts as the
    reference's class. Without it one flipped near-tie pixel into a class absent elsewhere costs a whole
    class's Dice (1/7 of the agreement of a 7-structure model) and fails a correct float32 conversion.

    Example:
        >>> probabilities = np.array([[[0.5, 0.5, 0.0], [0.2, 0.1, 0.7]]])
        >>> untie(np.array([[1, 1]]), np.array([[0, 2]]), probabilities).tolist()
        [[0, 1]]
    """
    chosen = np.take_along_axis(reference_probabilities, lite_labels[..., None].astype(np.int64), axis=-1)[..., 0]
    tied = chosen >= reference_probabilities.max(axis=-1) - TIE_TOLERANCE
    return np.where(tied, reference_labels, lite_labels)


def convert_to_tflite(
    saved_model_dir: str | os.PathLike,
    out: str | os.PathLike,
    quantize: str = "none",
    cache: str | os.PathLike | None = None,
    min_agreement: float | None = None,
    parity_slices: int = 200,
    representative_slices: int = 100,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert ``serving_default`` of an exported SavedModel to .tflite and check parity.

    Args:
        saved_model_dir: an exported version folder (``saved_models/NAME/<version>``).
        out: the .tflite file to write.
        quantize: ``none``, ``float16``, ``dynamic`` or ``int8`` (see module docstring).
        cache: slice cache for parity (target test split) and int8 calibration (target train split);
            default: the cache recorded in the export's ``assets.extra/mkd_model.json``.
        min_agreement: Dice agreement below which nothing is written and MkdError is raised
            (default :data:`DEFAULT_MIN_AGREEMENT` of the mode).
        parity_slices: at most this many test slices (evenly spaced) are compared.
        representative_slices: at most this many training slices calibrate int8.
        report: optional `callable(str)` receiving the parity line before any error is raised.

    Returns:
        dict: ``path``, ``bytes``, ``quantize``, ``agreement``, ``pixel_agreement``,
        ``max_probability_difference``, ``slices``, ``ops`` (sorted operator names), ``min_agreement``.

    Example:
        >>> convert_to_tflite("saved_models/heart/1", "heart.tflite", quantize="float16")["agreement"]  # doctest: +SKIP
        0.9991
    """
    saved_model_dir, out = Path(saved_model_dir), Path(out)
    _check_paths(saved_model_dir, out, quantize)
    asset = read_model_asset(saved_model_dir)
    threshold = DEFAULT_MIN_AGREEMENT[quantize] if min_agreement is None else float(min_agreement)
    slice_cache = _parity_cache(cache or asset["cache"], asset)
    test_rows = evenly_spaced(slice_cache.indices("target", "test"), parity_slices)
    if test_rows.size == 0:
        fail(slice_cache.path, "no target test slices for the parity check")
    images = slice_cache.images("target")
    representative = None
    if quantize == "int8":
        representative = np.asarray(
            images[evenly_spaced(slice_cache.indices("target", "train"), representative_slices)]
        )
    content = _convert(saved_model_dir, quantize, representative)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:
        temporary.write_bytes(content)
        result = _parity(saved_model_dir, temporary, np.asarray(images[test_rows]), len(asset["classes"]))
        result = {"path": str(out), "bytes": len(content), "quantize": quantize, **result}
        result.update({"ops": sorted(op_names(content)), "min_agreement": threshold})
        if report:
            report(parity_line(result))
        if result["agreement"] < threshold:
            raise MkdError(
                f"{out}: TFLite ({quantize}) labels agree with the SavedModel's at Dice {result['agreement']:.4f} "
                f"< --min-agreement {threshold}; not written"
            )
    return result


def _check_paths(saved_model_dir: Path, out: Path, quantize: str) -> None:
    """One line, before the conversion (which takes a while), for a bad SavedModel folder, output or mode."""
    if not (saved_model_dir / "saved_model.pb").exists():
        fail(saved_model_dir, "not a SavedModel folder (no saved_model.pb); pass saved_models/NAME/<version>")
    if out.suffix != ".tflite":
        fail(out, "output must end in .tflite")
    if out.is_dir():
        fail(out, "is a folder; pass the .tflite file to write")
    check_parent_is_folder(out, "write the TFLite file")
    if quantize not in QUANTIZATIONS:
        raise MkdError(f"--quantize {quantize}: choose from {', '.join(QUANTIZATIONS)}")


def _parity_cache(cache_path, asset: dict) -> SliceCache:
    """The slice cache the parity check and int8 calibration read; it must match the export."""
    if not Path(cache_path).is_dir():
        fail(cache_path, "slice cache for the parity check not found (pass --cache)")
    slice_cache = SliceCache(cache_path, verify=False)
    if slice_cache.classes != asset["classes"] or slice_cache.size != asset["size"]:
        fail(slice_cache.path, f"classes/size ({slice_cache.size}) differ from the export's ({asset['size']})")
    return slice_cache


def _convert(saved_model_dir: Path, quantize: str, representative: np.ndarray | None) -> bytes:
    """The .tflite flatbuffer of ``serving_default``; builtin ops only (no Flex, no custom ops)."""
    converter = make_converter(saved_model_dir, quantize, representative)
    try:
        content = converter.convert()
    except Exception as exc:  # the converter raises ConverterError and plain exceptions alike
        raise MkdError(f"{saved_model_dir}: TFLite conversion ({quantize}) failed: {str(exc).splitlines()[0]}")
    foreign = [op for op in sorted(op_names(content)) if op.startswith("Flex") or op == "CUSTOM"]
    if foreign:
        fail(saved_model_dir, f"conversion produced non-builtin ops {foreign}")
    return content


def _parity(saved_model_dir: Path, tflite_file: Path, held_out: np.ndarray, num_classes: int) -> dict[str, Any]:
    """How the .tflite model's labels and probabilities agree with the SavedModel's on ``held_out`` slices."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(saved_model_dir)).signatures[SIGNATURE]
    reference_labels, reference_probabilities = run_saved_model(signature, held_out)
    lite_labels, lite_probabilities = run_tflite(tflite_file, held_out)
    return {
        "agreement": dice_agreement(
            untie(lite_labels, reference_labels, reference_probabilities), reference_labels, num_classes
        ),
        "pixel_agreement": float(np.mean(lite_labels == reference_labels)),
        "max_probability_difference": float(np.abs(lite_probabilities - reference_probabilities).max()),
        "slices": int(held_out.shape[0]),
    }


def parity_line(result: dict[str, Any]) -> str:
    """One line: the parity of a conversion (what `mkd tflite` prints)."""
    return (
        f"parity ({result['quantize']}, {result['slices']} test slices): Dice agreement {result['agreement']:.4f} "
        f"(threshold {result['min_agreement']}), pixel agreement {result['pixel_agreement']:.4f}, "
        f"max |probability difference| {result['max_probability_difference']:.2e}"
    )
