"""The CUDA path decodes as the CPU path does (skipped where no CUDA device is present; CI has
none, so these run on a GPU machine: ``pytest tests/test_cuda.py``).

Both sides run the same float32 tiny model; logits come back to the CPU before sampling
(`decode.DecodeBatch.step`), so seeded sampling draws the same tokens, and every verdict must
agree to float tolerance: CUDA kernels sum in another order than the CPU's.
"""

import copy

import pytest
import torch

from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QUERIES = ("What is the capital of France?", "Hi", "Write a haiku about rain, then explain it.")
POLICIES = (SafetyParams(), SafetyParams(schedule="periodic", action="reweight"), SafetyParams(action="monitor"))


def _requests(tokenizer) -> list[GenerationRequest]:
    return [GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": q}]),
                              SamplingParams(max_new_tokens=16, do_sample=True, seed=i, temperature=0.8),
                              policy, trace=True)
            for i, (q, policy) in enumerate(zip(QUERIES, POLICIES))]


def _decode(model, tokenizer, fused: bool, prefill_chunk: int | None = None) -> dict[int, tuple]:
    """Per request: (token ids, finish_reason, verdict scores), through a batch where the third
    request joins while the first two decode."""
    dec = Decoder(model, tokenizer, fused=fused)
    reqs = _requests(tokenizer)
    batch = dec.new_batch(prefill_chunk)
    events = batch.add(reqs[:2])[1]
    events += batch.step()
    events += batch.add(reqs[2:])[1]
    while batch:
        events += batch.step()
    out = {}
    for e in events:
        ids, _, _ = out.get(e.index, ([], None, None))
        ids = ids + [t.id for t in e.tokens]
        scores = [v["score"] for v in e.safety["trace"]] if e.safety else None
        out[e.index] = (ids, e.finish_reason, scores)
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("prefill_chunk", [None, 8])
def test_cuda_decodes_as_the_cpu(tiny_model, tokenizer, fused, prefill_chunk):
    cpu = _decode(copy.deepcopy(tiny_model), tokenizer, fused, prefill_chunk)
    gpu = _decode(copy.deepcopy(tiny_model).to("cuda"), tokenizer, fused, prefill_chunk)
    assert sorted(gpu) == sorted(cpu) == [0, 1, 2]
    for i in cpu:
        assert gpu[i][:2] == cpu[i][:2], i
        assert gpu[i][2] == pytest.approx(cpu[i][2], abs=1e-4), i


def test_cuda_bfloat16_decodes_a_batch(tiny_model, tokenizer):
    """bf16 on the GPU: every row ends with its query verdict (no comparison: bf16 rounds)."""
    finals = [e for step in Decoder(copy.deepcopy(tiny_model).to("cuda", torch.bfloat16), tokenizer)
              .generate(_requests(tokenizer)) for e in step if e.finish_reason]
    assert sorted(e.index for e in finals) == [0, 1, 2]
    assert all(e.safety["query_score"] is not None for e in finals)
