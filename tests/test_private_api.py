"""No private TensorFlow / Keras API outside mkd_tf/private_api.py, and the internals listed there still exist.

The scan reads mkd_tf/ and cli/ with `ast`. An attribute with one leading underscore (``x._name``) is private
to whoever defined it: allowed when the project itself defines ``_name`` (a function, class, variable,
argument or ``self._name``), flagged otherwise, since then it comes from a library (``model._flatten_layers``,
``optimizer._iterations``, ``self._tracker`` inherited from ``keras.Model``). Imports of a library's internal
modules (``tensorflow.python``, ``keras.src``, any ``_module``) are flagged too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCANNED = ("mkd_tf", "cli")
#: the one module allowed to use TensorFlow internals (each listed in its PINNED with why)
PRIVATE_API = ROOT / "mkd_tf" / "private_api.py"
#: public API whose names start with an underscore (namedtuple's methods)
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}
#: packages whose internal modules must not be imported
LIBRARIES = ("tensorflow", "keras", "tf_keras", "ai_edge_litert", "tensorflow_serving")
INTERNAL_MODULES = ("tensorflow.python", "tensorflow.compiler", "tensorflow.tsl", "keras.src")


def is_private(name):
    return name.startswith("_") and not name.startswith("__")


def project_names(trees):
    """Every underscored name the project defines itself."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
    return {name for name in names if is_private(name)}


def internal_module(module):
    parts = module.split(".")
    return parts[0] in LIBRARIES and (module.startswith(INTERNAL_MODULES) or any(is_private(p) for p in parts))


def private_uses(tree, own):
    """``[(line, what)]``: library-private attributes and internal-module imports in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (node.attr == "__internal__" or is_private(node.attr)):
            if node.attr not in own and node.attr not in PUBLIC_UNDERSCORED:
                found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                name = node.args[1].value
                if is_private(name) and name not in own and name not in PUBLIC_UNDERSCORED:
                    found.append((node.lineno, f"{node.func.id}(..., {name!r})"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if internal_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if internal_module(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.module.split(".")[0] in LIBRARIES:
                found += [
                    (node.lineno, f"from {node.module} import {a.name}") for a in node.names if is_private(a.name)
                ]
    return found


def sources():
    return sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))


def test_no_private_tensorflow_or_keras_api_outside_the_private_api_module():
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sources()}
    own = project_names(trees.values())
    found = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path, tree in trees.items()
        if path != PRIVATE_API
        for line, what in private_uses(tree, own)
    ]
    assert not found, (
        "private TensorFlow/Keras API outside mkd_tf/private_api.py (use a public API, or move it there with "
        "why and pin it in PINNED):\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    "source, flagged",
    [
        ("model._flatten_layers(include_self=True)", [".{}".format("_flatten_layers")]),
        ("x = optimizer._model_variables_moving_average", [".{}".format("_model_variables_moving_average")]),
        ("class M:\n    def f(self):\n        return self._tracker", [".{}".format("_tracker")]),
        ("getattr(interpreter, '_get_ops_details')()", ["getattr(..., '_get_ops_details')"]),
        ("from tensorflow.python.eager import context", ["from tensorflow.python.eager import ..."]),
        ("import keras.src.backend", ["import keras.src.backend"]),
        ("from keras import _tf_keras", ["from keras import _tf_keras"]),
        ("tf.__internal__.distribute", [".__internal__"]),
        # the project's own private helpers and namedtuple's public methods are not flagged
        ("def _helper():\n    pass\nmodule._helper()", []),
        (
            "class C:\n    def __init__(self):\n        self._cache = {}\n    def f(self, o):\n        return o._cache",
            [],
        ),
        ("record._replace(a=1)", []),
        ("from tensorflow.core.framework import types_pb2", []),
    ],
)
def test_the_scan_flags_library_internals_and_not_the_projects_own(source, flagged):
    tree = ast.parse(source)
    assert [what for _, what in private_uses(tree, project_names([tree]))] == flagged


def test_every_internal_the_private_api_module_uses_still_exists():
    from mkd_tf import private_api

    assert private_api.PINNED  # a module that pins nothing would make this test pass for nothing
    missing = private_api.missing()
    assert not missing, "TensorFlow internals gone (see mkd_tf/private_api.py):\n" + "\n".join(missing)
