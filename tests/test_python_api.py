"""The public Python API: `from mkd_tf import ...` and docs/python-api.md's example, run as written."""

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

import mkd_tf
from tests.scripts import tiny_runs

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def python_blocks(text):
    """The ```python blocks of a Markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_import_is_cheap_and_the_api_loads_on_first_use():
    """`import mkd_tf` imports no TensorFlow; every public name resolves to the function the CLI calls."""
    code = (
        "import sys, mkd_tf; print('tensorflow' in sys.modules);"
        "from mkd_tf import prepare, export; print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    from mkd_tf.data.prepare import prepare_cache
    from mkd_tf.evaluation import evaluate_run
    from mkd_tf.export.serving import export_run
    from mkd_tf.export.tflite import convert_to_tflite
    from mkd_tf.inference import predict
    from mkd_tf.training import train

    assert mkd_tf.prepare is prepare_cache and mkd_tf.train is train and mkd_tf.evaluate is evaluate_run
    assert mkd_tf.predict is predict and mkd_tf.convert_tflite is convert_to_tflite
    assert inspect.signature(mkd_tf.export) == inspect.signature(export_run)
    assert set(mkd_tf.__all__) == {"__version__", *mkd_tf.API}
    assert set(mkd_tf.API) <= set(dir(mkd_tf))


def test_every_api_function_has_type_hints_and_a_documented_example():
    for name in ("prepare", "train", "evaluate", "predict", "export", "convert_tflite"):
        function = inspect.unwrap(getattr(mkd_tf, name))
        signature = inspect.signature(function)
        assert signature.return_annotation is not inspect.Signature.empty, name
        assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values()), name
        for section in ("Args:", "Returns:", "Example:"):
            assert section in function.__doc__, (name, section)


def test_an_unknown_prepare_option_is_one_line_naming_it(tmp_path):
    from mkd_tf.errors import MkdError

    try:
        mkd_tf.prepare(tmp_path / "ct", tmp_path / "mr", tmp_path / "cache", {"preprocess": {"sise": 32}})
    except MkdError as exc:
        assert str(exc).startswith("options: preprocess: unknown setting sise (known: spacing, size")
    else:
        raise AssertionError("no error")
    assert not (tmp_path / "cache").exists()


def test_the_documented_example_runs(tmp_path, monkeypatch):
    """docs/python-api.md: phantom -> prepare -> train -> evaluate -> predict -> export -> TFLite, as written."""
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 5 and "from mkd_tf import" in blocks[0]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "python_api_example"}
    for block in blocks:
        # The training block's steps run eagerly: its code runs as written, only the step is not traced into
        # a graph (~25 s of tracing for 4 steps; the compiled loop is tested on the main MKD run).
        with tiny_runs.eager("train(" in block):
            exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["result"]["epochs"] == 2 and Path(namespace["result"]["run"]) == Path("runs/mkd")
    assert set(namespace["metrics"]["summary"]) == {"syn", "real", "ensemble"}
    prediction = namespace["prediction"]
    written = nib.load(tmp_path / "ct_1003_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), prediction.labels)
    np.testing.assert_array_equal(written.affine, prediction.affine)
    source = nib.load(tmp_path / "phantom" / "ct_train" / "ct_train_1003_image.nii.gz")
    np.testing.assert_array_equal(prediction.affine, source.affine)
    assert set(np.unique(prediction.labels)) <= {0, 205, 420, 500, 550, 600, 820, 850}
    in_memory = mkd_tf.predict("runs/mkd", source.get_filename())  # no output path: nothing written
    assert in_memory.path is None
    np.testing.assert_array_equal(in_memory.labels, prediction.labels)
    np.testing.assert_array_equal(in_memory.affine, prediction.affine)
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == ["ct_1003_seg.nii.gz"]
    assert (tmp_path / "saved_models" / "heart" / "1" / "saved_model.pb").is_file()
    assert namespace["converted"]["agreement"] >= 0.999


API_MODULES = [
    "mkd_tf/data/prepare.py",
    "mkd_tf/training.py",
    "mkd_tf/evaluation.py",
    "mkd_tf/inference.py",
    "mkd_tf/export/serving.py",
    "mkd_tf/export/tflite.py",
    "mkd_tf/data/cache.py",
    "mkd_tf/data/phantom.py",
]


def unannotated(tree):
    """Names of public functions and methods of public classes lacking a parameter or return annotation."""
    missing = []

    def visit(body, owner=""):
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{node.name}.")
            elif isinstance(node, ast.FunctionDef) and (node.name == "__init__" or not node.name.startswith("_")):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                typed = all(a.annotation is not None for a in arguments if a.arg not in ("self", "cls"))
                if not typed or node.returns is None:
                    missing.append(owner + node.name)

    visit(tree.body)
    return missing


def test_public_functions_of_the_api_modules_have_type_hints():
    root = Path(__file__).resolve().parents[1]
    missing = {path: unannotated(ast.parse((root / path).read_text(encoding="utf-8"))) for path in API_MODULES}
    assert not {path: names for path, names in missing.items() if names}
    assert unannotated(ast.parse("def f(x: int):\n    pass\nclass C:\n    def g(self) -> None:\n        pass\n")) == [
        "f"
    ]
