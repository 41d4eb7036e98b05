"""Import direction between the packages (the layout in README.md): the runtime library imports
no other package of the project, training none of evaluation or serving, evaluation none of
serving, and the server nothing of training or evaluation. Every import counts: module-level,
inside a function, relative, and ``importlib.import_module`` / ``__import__`` of a constant name."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = {"safety_decoding", "safety_training", "safety_eval", "server", "benchmarks", "ess"}
FORBIDDEN = {
    "safety_decoding": {"safety_training", "safety_eval", "server", "benchmarks", "ess"},
    "safety_training": {"safety_eval", "server", "benchmarks", "ess"},
    "safety_eval": {"server", "benchmarks", "ess"},
    "server": {"safety_training", "safety_eval", "benchmarks", "ess"},
}


def module_name(path: Path) -> list[str]:
    """``server/openai/routes.py`` -> ``["server", "openai", "routes"]`` (a package's
    ``__init__`` is the package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_names(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                out.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__") or
                   (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            out.append((node.lineno, node.args[0].value))
    return sorted(out)


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, name in imported_names(path):
            top = name.partition(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    assert violations(package) == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The rule can fail: a lazy import inside a function and a relative import both count."""
    pkg = tmp_path / "server"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text(
        "def f():\n    from safety_training.data import x\n\n"
        "from .. import bootstrap\nfrom ..sub import other\n"
        "import importlib\nimportlib.import_module('benchmarks.serving')\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    names = [n for _, n in imported_names(pkg / "sub" / "mod.py")]
    assert names == ["safety_training.data", "server", "server.sub", "importlib",
                     "benchmarks.serving"]
    assert violations("server") == ["server/sub/mod.py:2 imports safety_training.data",
                                    "server/sub/mod.py:7 imports benchmarks.serving"]
