"""ESS_DEVICE / ESS_DTYPE resolution, and decoding a bfloat16 model."""

import copy

import pytest
import torch

from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.device import cpu_has_fast_bf16, resolve_device, resolve_dtype
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams


@pytest.mark.parametrize("flags, fast", [("fpu avx2 avx512f amx_bf16 amx_tile", True),
                                         ("fpu avx2 avx512f avx512_bf16", True),
                                         ("fpu avx2 avx512f avx512bw", False)])
def test_fast_bf16_is_read_from_cpu_flags(tmp_path, flags, fast):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_has_fast_bf16(str(info)) is fast
    assert cpu_has_fast_bf16(str(tmp_path / "missing")) is False


def test_auto_dtype_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr("safety_decoding.device.cpu_has_fast_bf16", lambda fast=fast: fast)
        assert resolve_dtype("auto", cpu) is expected
    assert resolve_dtype("float32", cpu) is torch.float32 and resolve_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolve_dtype("float64", cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CPU", ""])
def test_an_unknown_device_name_is_a_clear_error(name):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_settings_validate_device_and_dtype(monkeypatch):
    from pydantic import ValidationError

    from server.settings import Settings

    monkeypatch.setenv("ESS_DTYPE", "bfloat16")
    monkeypatch.setenv("ESS_DEVICE", "cuda:1")
    assert (Settings().dtype, Settings().device) == ("bfloat16", "cuda:1")
    assert (Settings(_env_file=None, dtype="auto").dtype) == "auto"
    monkeypatch.setenv("ESS_QUANTIZATION", "int8")
    assert Settings().quantization == "int8"
    for var, bad in (("ESS_DTYPE", "fp8"), ("ESS_DEVICE", "gpu"), ("ESS_QUANTIZATION", "int4")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValidationError, match=var.removeprefix("ESS_").lower()):
            Settings()
        monkeypatch.delenv(var)


def test_bfloat16_model_decodes_a_batch_with_checks(tiny_model, tokenizer, monkeypatch):
    """Rows, probes and sampling work in bf16; the sampler gets float32 logits."""
    import safety_decoding.decode as decode

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    dec = Decoder(model, tokenizer)
    seen = []
    original = decode.select_token
    monkeypatch.setattr(decode, "select_token", lambda logits, *a: seen.append(logits.dtype) or original(logits, *a))
    reqs = [GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": t}]),
                              SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=True, seed=1),
                              SafetyParams(action="monitor"), trace=True)
            for t in ("What is the capital of France?", "Hi")]
    finals = [e for step in dec.generate(reqs) for e in step if e.finish_reason]
    assert sorted(e.index for e in finals) == [0, 1]
    assert all(e.finish_reason == "length" and e.generated_tokens == 12 for e in finals)
    assert all(e.safety["checks"] >= 10 for e in finals)
    assert set(seen) == {torch.float32}
