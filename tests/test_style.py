"""The code stays formatted by the one formatter configured in pyproject.toml (`make format`)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_code_is_formatted_with_ruff():
    ruff = Path(sys.executable).with_name("ruff")
    outcome = subprocess.run(
        [str(ruff), "format", "--check", "mkd_tf", "cli", "tests", "benchmarks", "conftest.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert outcome.returncode == 0, f"run `make format`:\n{outcome.stdout}{outcome.stderr}"


def function_level_imports(root):
    """``{(file, function): [module, ...]}``: imports of mkd_tf / mkd_cli inside a function of ``root``'s modules."""
    found = {}
    for path in sorted((ROOT / root).rglob("*.py")):
        file = path.relative_to(ROOT).as_posix()
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    names = ["." * node.level + (node.module or "")]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                own = [n for n in names if n.startswith((".", "mkd_tf", "mkd_cli"))]
                if own:
                    found.setdefault((file, function.name), []).extend(own)
    return found


def test_own_modules_are_imported_at_module_top_except_the_listed_ones():
    """A function-level import of the project's modules is one of `mkd_tf.LAZY_IMPORTS`, with its reason."""
    from mkd_tf import LAZY_IMPORTS

    found = {**function_level_imports("mkd_tf"), **function_level_imports("cli")}
    listed = {(file, function) for file, functions in LAZY_IMPORTS.items() for function in functions}
    unlisted = sorted(set(found) - listed - {("mkd_tf/__init__.py", "__getattr__")})
    assert not unlisted, f"move these imports to the module top, or list them in mkd_tf.LAZY_IMPORTS: {unlisted}"
    stale = sorted(listed - set(found) - {("mkd_tf/__init__.py", "__getattr__")})
    assert not stale, f"listed in mkd_tf.LAZY_IMPORTS but no longer importing lazily: {stale}"


def test_the_import_check_sees_a_function_level_import(tmp_path, monkeypatch):
    """The check above parses nested functions and relative imports (it would pass vacuously otherwise)."""
    module = tmp_path / "pkg" / "m.py"
    module.parent.mkdir()
    module.write_text("def f():\n    def g():\n        from .x import y\n    import mkd_tf.files\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = {key: sorted(modules) for key, modules in function_level_imports("pkg").items()}
    assert found == {("pkg/m.py", "f"): [".x", "mkd_tf.files"], ("pkg/m.py", "g"): [".x"]}


#: constructor arguments that are structure, not hyper-parameters: the method sets them (batch-norm sets, the
#: ablations, a predictor's name), so a literal default there is not a second home of a setting
STRUCTURAL_ARGUMENTS = {"num_domains", "default_domain", "use_iam", "kd_s2r", "kd_r2s", "padding"}


def literal_constructor_defaults(root):
    """``["file:Class.argument=value"]``: ``__init__`` arguments of ``root``'s classes whose default is a literal
    other than ``None`` (``None``: the setting comes from :mod:`mkd_tf.config`)."""
    found = []
    for path in sorted((ROOT / root).rglob("*.py")):
        for cls in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(cls, ast.ClassDef):
                continue
            for init in (node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__"):
                arguments = init.args.posonlyargs + init.args.args
                pairs = list(zip(arguments[len(arguments) - len(init.args.defaults) :], init.args.defaults))
                pairs += [(a, d) for a, d in zip(init.args.kwonlyargs, init.args.kw_defaults) if d is not None]
                for argument, default in pairs:
                    literal = isinstance(default, ast.Constant) and default.value is not None
                    if literal and argument.arg not in STRUCTURAL_ARGUMENTS:
                        where = path.relative_to(ROOT).as_posix()
                        found.append(f"{where}:{cls.name}.{argument.arg}={default.value!r}")
    return found


def test_model_and_network_constructors_have_no_literal_hyper_parameter_defaults():
    """A setting a constructor is called without takes mkd train's default (mkd_tf.config), so that a model
    built in a notebook is the one `mkd train` builds; the defaults live in one place."""
    assert literal_constructor_defaults("mkd_tf/models") == []


def test_the_constructor_check_sees_a_literal_default(tmp_path, monkeypatch):
    module = tmp_path / "pkg" / "m.py"
    module.parent.mkdir()
    module.write_text("class A:\n    def __init__(self, a, b=None, c=D['c'], *, d=0.5, num_domains=1):\n        pass\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert literal_constructor_defaults("pkg") == ["pkg/m.py:A.d=0.5"]


#: the longest a function of mkd_tf may be, in lines of code (no docstring, comment or blank lines)
MAX_FUNCTION_LINES = 60


def long_functions(root, limit=MAX_FUNCTION_LINES):
    """``["file:function (n lines)"]`` for ``root``'s functions over ``limit`` lines of code."""
    found = []
    for path in sorted((ROOT / root).rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = node.body[0]
            docstring = set()
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstring = set(range(first.lineno, first.end_lineno + 1))
            code = [
                number
                for number in range(node.lineno, node.end_lineno + 1)
                if number not in docstring
                and lines[number - 1].strip()
                and not lines[number - 1].strip().startswith("#")
            ]
            if len(code) > limit:
                found.append(f"{path.relative_to(ROOT).as_posix()}:{node.name} ({len(code)} lines)")
    return found


def test_no_function_of_the_package_is_longer_than_sixty_lines_of_code():
    assert long_functions("mkd_tf") == []


def test_the_length_check_counts_code_lines_only(tmp_path, monkeypatch):
    module = tmp_path / "pkg" / "m.py"
    module.parent.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(3))
    module.write_text(f'def f():\n    """Doc.\n\n    More.\n    """\n    # why\n\n{body}')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_functions("pkg", limit=4) == []  # def + 3 lines
    assert long_functions("pkg", limit=3) == ["pkg/m.py:f (4 lines)"]
