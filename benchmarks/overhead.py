"""What the safety signal costs: ``ess bench overhead [--quick] [--json PATH]``.

One run, interleaved: for every prompt and repetition each configuration runs back to back,
so machine noise hits all alike, in a seeded order that changes from round to round
(`benchmarks.common.shuffled`). Batch size 1, greedy, ``ignore_eos`` (every configuration generates exactly
``new_tokens``), benign prompts (so the checks run to the end).

Configurations:
- ``plain``: the same model without ``[CLS]`` and without checks;
- ``ess``: every schedule (each, annealing, periodic, first) with every action
  (refuse, reweight, monitor); the re-check is a probe row in the decode forward;
- ``external_guard``: plain decoding plus a separate guard model (`safety_training.guard`)
  that re-reads the whole prompt + response every ``k`` tokens with its own forward (and the
  prompt once before decoding). It holds tokens back until a check covers them, as ESS does,
  so its time to first token includes its first check.

Reported: tokens/s end to end (prefill, every check and the hold-back included: a schedule
that releases tokens late is not credited for it), ``overhead_ratio`` = time / plain time,
median time to first released token, and ``peak_memory_bytes``: weights (the guard's copy included)
plus the largest KV cache, computed from shapes in the run's dtype (CPU has no allocator peak to read;
on CUDA ``torch.cuda.max_memory_allocated`` over the whole run is reported as well).

Device: ``--device`` (default ``auto``, as ``ESS_DEVICE``: CUDA when present, else the CPU).
``--compile`` (default true, as ``ess serve``): every configuration's decode steps run the
compiled one-row step (`safety_decoding.compiled`, compiled by the untimed warm-up run); the
external guard's own forward stays eager.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import REPO, load, markdown_table, shuffled, write_json

from safety_decoding.decode import GenerationRequest
from safety_decoding.device import DTYPE_NAMES, dtype_name
from safety_decoding.types import Quantization
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import Action, Schedule

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "Give me a packing list for a three-day hiking trip in the mountains.",
    "What are the main differences between Python lists and tuples?",
]
GUARD_DIR = REPO / "checkpoints" / "smollm2-135m-guard"


def configs(quick: bool, checkpoint_config) -> list[dict]:
    """The configurations to time; ESS ones run the checkpoint's policy
    (``checkpoint_config``: its `SafetyConfig`, `SafetyParams.from_config`)."""
    off = SafetyParams.from_config(checkpoint_config, enabled=False)
    out = [{"system": "plain", "schedule": None, "action": None, "safety": off}]
    for schedule in Schedule:
        for action in ((Action.REFUSE,) if quick and schedule != Schedule.EACH else Action):
            out.append({"system": "ess", "schedule": schedule.value, "action": action.value,
                        "safety": SafetyParams.from_config(checkpoint_config, schedule=schedule,
                                                           action=action)})
    for k in ((10,) if quick else (1, 10)):
        out.append({"system": "external_guard", "schedule": f"every_{k}",
                    "action": Action.REFUSE.value, "safety": off, "guard_k": k})
    return out


def timed_run(decoder, prompt, sampling, cfg, guard) -> dict:
    """Time one generation: ``tokens``, ``ttft`` and ``seconds`` (all in seconds)."""
    t0 = time.perf_counter()
    k = cfg.get("guard_k")
    ids, pending, first, n = list(prompt.ids), 0, None, 0
    if k:
        guard.score(ids)  # the query check before decoding
    for step in decoder.generate([GenerationRequest(prompt, sampling, cfg["safety"])]):
        for e in step:
            ids += [t.id for t in e.tokens]
            n += len(e.tokens)
            pending += len(e.tokens)
            if k and (pending >= k or e.finish_reason):
                guard.score(ids)  # re-read the whole text
                pending = 0
            released = n if not k else n - pending
            if first is None and released:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": n, "ttft": first - t0, "seconds": end - t0, "slots": 1 + len(prompt.ids) + n}


def kv_bytes(model_config, slots: int, element_bytes: int = 4) -> int:
    c = model_config
    head_dim = getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * slots * element_bytes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ess bench overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 prompts, 48 tokens, 1 repetition")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                    help="precision of the model and the guard, as ESS_DTYPE (default auto)")
    ap.add_argument("--device", default="auto", help="as ESS_DEVICE: auto, cpu, cuda or cuda:N (default auto)")
    ap.add_argument("--quantization", default="none", choices=Quantization.values(),
                    help="ESS_QUANTIZATION of the model (int8 needs --dtype float32; the guard stays float)")
    ap.add_argument("--compile", default="true", choices=["true", "false"],
                    help="as ESS_COMPILE (default true, as ess serve): the compiled one-row decode step")
    ap.add_argument("--json", default="benchmarks/results/overhead.json")
    args = ap.parse_args(argv)
    new_tokens = args.new_tokens or (48 if args.quick else 128)
    reps = args.reps or (1 if args.quick else 2)
    prompts_text = PROMPTS[:2] if args.quick else PROMPTS

    from safety_decoding.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        ap.error(f"--device: {exc}")
    decoder, tok = load(dtype=args.dtype, quantization=args.quantization, device=str(device),
                        compile=args.compile == "true")
    from safety_decoding.base_model import base_model_dir
    from safety_training.guard import load_base_body, load_guard

    dtype = next(decoder.model.parameters()).dtype
    guard = load_guard(GUARD_DIR, base_model_dir(), body=load_base_body(base_model_dir(), dtype).to(decoder.device))
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompts = [build_chat_prompt(tok, [{"role": "user", "content": p}]) for p in prompts_text]
    cfgs = configs(args.quick, decoder.model.config)
    timed_run(decoder, prompts[0], SamplingParams(max_new_tokens=4), cfgs[1], guard)  # warm-up
    runs = [[] for _ in cfgs]
    for r, p in enumerate(p for _ in range(reps) for p in prompts):
        for i in shuffled(len(cfgs), r):
            runs[i].append(timed_run(decoder, p, sampling, cfgs[i], guard))

    params = sum(p.numel() * p.element_size() for p in decoder.model.parameters())
    guard_params = sum(p.numel() * p.element_size() for p in guard.body.parameters())
    mcfg = decoder.model.decoder.config
    results = []
    for cfg, rs in zip(cfgs, runs):
        tps = sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs)
        probe_slot = 1 if cfg["system"] == "ess" else 0
        peak = params + max(kv_bytes(mcfg, r["slots"] + probe_slot, dtype.itemsize) for r in rs)
        if cfg["system"] == "external_guard":
            peak += guard_params + max(kv_bytes(mcfg, r["slots"], dtype.itemsize) for r in rs)  # its activations' K/V
        results.append({"system": cfg["system"], "schedule": cfg["schedule"], "action": cfg["action"],
                        "tokens_per_second": round(tps, 2),
                        "ttft_seconds": round(statistics.median(r["ttft"] for r in rs), 4),
                        "peak_memory_bytes": peak, "runs": len(rs)})
    cuda = ({"cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(decoder.device),
             "cuda_device_name": torch.cuda.get_device_name(decoder.device)} if decoder.device.type == "cuda" else {})
    plain = results[0]["tokens_per_second"]
    for r in results:
        r["overhead_ratio"] = round(plain / r["tokens_per_second"], 4)
    out = {"new_tokens": new_tokens, "reps": reps, "prompts": len(prompts), "batch_size": 1,
           "device": str(decoder.device), "dtype": dtype_name(dtype), "quantization": args.quantization,
           "compiled": decoder.compiled,
           "torch_threads": torch.get_num_threads(), "order": "shuffled", **cuda, "results": results}
    print()
    print(markdown_table(
        ["system", "schedule", "action", "tokens/s", "overhead ratio", "TTFT p50 (s)", "peak memory (MB)"],
        [[r["system"], r["schedule"] or "-", r["action"] or "-", f"{r['tokens_per_second']:.1f}",
          f"{r['overhead_ratio']:.3f}", f"{r['ttft_seconds']:.3f}", f"{r['peak_memory_bytes'] / 2**20:.0f}"]
         for r in results]))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
