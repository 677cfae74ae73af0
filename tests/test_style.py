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
