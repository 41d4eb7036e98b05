"""Running streams while bursts of large, refused requests arrive.

Bad input costs its sender only (our rule): a request that is refused must not slow the streams
already running. The cost that escapes is Python work done with the GIL held before the refusal
(JSON parsing, client-text normalization), which the engine thread waits for between its
kernels, and tokenizer work, which takes a core. For each burst kind in turn, ``--streams``
``/generate_stream`` requests of ``--tokens`` tokens run; one second in, ``--burst`` ``/generate``
requests of one message at the character bound (``--chars``: 4,096 tokens x 81 characters, the
default ``ESS_MAX_INPUT_TOKENS`` and SmolLM2's longest token; combining marks out of canonical
order, which NFC would sort, at the byte bound) are sent at once, and each is refused as too
long. Reported per kind (median over ``--rounds``, kinds in a seeded order each
round): the burst's statuses, the streams' wall time and largest gap between two events, and
both as a ratio to the rounds with no burst.

Without ``--url`` it starts ``ess serve`` on a free localhost port (``ESS_*`` variables pass
through; ``ESS_COMPILE=false`` starts in about a minute), then stops it.

Run: ``python -m benchmarks.refused_burst [--url URL] [--rounds 2] [--json PATH]`` (about 3
minutes with a running server on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.common import ChildServer, markdown_table, shuffled, write_json
from benchmarks.normalize import texts
from benchmarks.soak import require_loopback

NO_BURST = "none"


# burst kind: its text in `benchmarks.normalize.texts`
_NORMALIZE_KINDS = {"Russian": "Russian", "Hindi": "Hindi (vowel signs)",
                    "ḅ (3 bytes each)": "Latin letters with accents (ḅ)", "ASCII English": "ASCII English"}


def burst_texts(chars: int) -> dict[str, str | None]:
    """One message of ``chars`` characters per burst kind (None: no burst)."""
    everyday = texts(chars)
    return {
        NO_BURST: None,
        **{kind: everyday[name] for kind, name in _NORMALIZE_KINDS.items()},
        # 2 bytes each, half as many (the byte bound as sent): NFC would sort them, quadratically
        "marks out of canonical order": "a" + "\u0301" * (chars // 4) + "\u0316" * (chars // 4),
    }


async def stream(client, url: str, i: int, tokens: int) -> tuple[float, float]:
    """Wall seconds of one ``/generate_stream`` request and its largest gap between events."""
    body = {"inputs": f"Write a long story about lighthouse keeper number {i}.",
            "parameters": {"max_new_tokens": tokens}}
    t0, times = time.perf_counter(), []
    async with client.stream("POST", url + "/generate_stream", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                times.append(time.perf_counter())
    return times[-1] - t0, max(b - a for a, b in zip(times, times[1:]))


async def one_round(client, url: str, text: str | None, streams: int, burst: int, tokens: int) -> dict:
    running = [asyncio.create_task(stream(client, url, i, tokens)) for i in range(streams)]
    await asyncio.sleep(1.0)
    statuses = []
    if text is not None:
        replies = await asyncio.gather(*(client.post(url + "/generate", json={
            "inputs": text, "parameters": {"max_new_tokens": 4}}) for _ in range(burst)))
        statuses = [r.status_code for r in replies]
    done = await asyncio.gather(*running)
    return {"statuses": statuses, "wall_s": max(w for w, _ in done), "max_gap_s": max(g for _, g in done)}


async def run(url: str, args) -> dict[str, list[dict]]:
    import httpx

    kinds = burst_texts(args.chars)
    names = list(kinds)
    results: dict[str, list[dict]] = {k: [] for k in names}
    async with httpx.AsyncClient(timeout=300) as client:
        await stream(client, url, -1, 4)  # warm
        for r in range(args.rounds):
            for i in shuffled(len(names), r):
                results[names[i]].append(await one_round(client, url, kinds[names[i]], args.streams,
                                                         args.burst, args.tokens))
    return results


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Medians per burst kind, and their ratios to the rounds with no burst."""
    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    base_wall, base_gap = median(NO_BURST, "wall_s"), median(NO_BURST, "max_gap_s")
    return [{"burst": kind, "statuses": sorted({s for r in rs for s in r["statuses"]}),
             "wall_s": median(kind, "wall_s"), "wall_x": median(kind, "wall_s") / base_wall,
             "max_gap_s": median(kind, "max_gap_s"), "max_gap_x": median(kind, "max_gap_s") / base_gap}
            for kind, rs in results.items()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.refused_burst", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server on this machine (default: start ess serve)")
    ap.add_argument("--chars", type=int, default=4096 * 81)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--burst", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/refused_burst.json")
    args = ap.parse_args(argv)

    server = None
    if args.url:
        require_loopback(args.url)
        url = args.url.rstrip("/")
    else:
        server = ChildServer.ess()
        server.wait_ready()
        url = server.url
    try:
        results = asyncio.run(run(url, args))
    finally:
        if server is not None:
            server.stop()
    rows = summarize(results)
    print(markdown_table(["burst", "statuses", "streams' wall s", "x no burst", "largest gap s", "x no burst"],
                         [[r["burst"], r["statuses"], round(r["wall_s"], 2), round(r["wall_x"], 2),
                           round(r["max_gap_s"], 3), round(r["max_gap_x"], 2)] for r in rows]))
    out = {"args": vars(args), "rounds": results, "summary": rows}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
