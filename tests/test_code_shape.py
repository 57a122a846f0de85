"""The package's shape, checked from its source: short functions, no function that fills a list
it was given, and inference code that never reaches training or export code, not even
through an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "vitdeploy"
MAX_LINES = 60  # a function's body; a Typer command's parameter list is its option table and is not counted
MAX_INNER_LINES = 15
# Inference: backends, bench, serve and the modules they stand on. None of it may import these.
INFERENCE = ("backends", "bench", "serve", "manifest.py", "parity.py", "preprocess.py", "images.py", "predictions.py",
             "tensorrt_runtime.py", "overlay.py", "files.py", "errors.py", "progress.py", "versions.py", "triton_model.py",
             "tome.py")
FORBIDDEN = ("vitdeploy.train", "vitdeploy.export")


def _functions(tree: ast.AST, outer: ast.AST | None = None):  # noqa: ANN202 - a generator of (node, enclosing function)
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child, outer
            yield from _functions(child, child)
        else:
            yield from _functions(child, outer)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_long_functions() -> None:
    long = []
    for path in _modules():
        for node, outer in _functions(ast.parse(path.read_text())):
            lines = node.end_lineno - node.body[0].lineno + 1
            limit = MAX_LINES if outer is None else MAX_INNER_LINES
            if lines > limit:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines, limit {limit})")
    assert not long, long


def test_no_function_appends_to_a_list_it_was_given() -> None:
    offenders = []
    for path in _modules():
        for node, _outer in _functions(ast.parse(path.read_text())):
            params = {a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]} - {"self", "cls"}
            for call in ast.walk(node):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr in ("append", "extend", "insert") and isinstance(call.func.value, ast.Name)
                        and call.func.value.id in params):
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno} {node.name} fills {call.func.value.id}")
    assert not offenders, offenders


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):  # every import, at the top or inside a function
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def test_inference_code_never_imports_training_or_export_code() -> None:
    paths = [p for p in _modules() if p.relative_to(PACKAGE).parts[0] in INFERENCE]
    assert len(paths) > 20
    bad = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in paths
           for line, name in _imports(ast.parse(path.read_text())) if name.startswith(FORBIDDEN)]
    assert not bad, bad


def test_the_shape_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    source = ("def f(records):\n    records.append(1)\n"
              "def g():\n    from vitdeploy.export import staging\n    return staging\n")
    tree = ast.parse(source)
    assert [n.name for n, _ in _functions(tree)] == ["f", "g"]
    assert (4, "vitdeploy.export.staging") in _imports(tree)
