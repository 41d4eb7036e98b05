"""Time to first text with the speculative first check's ``k`` candidates, in process.

`safety_decoding.first_check` runs the check of the first token inside the prefill, at the
price of ``2k`` more prefill rows; without it the first token waits one decode step. Which is
faster depends on the machine (`first_check.default_candidates`). This loads the shipped
checkpoint as ``ess serve`` does here (``--dtype``, the compiled decode step unless
``--eager``), takes ``--prompts`` prompts of ``ess bench peer``'s workload (ShareGPT, seed 0),
and times, per prompt and per ``k`` in ``--k``, a fresh batch from `DecodeBatch.add` to the
first event with text (safety ``each``, greedy). The ``k`` values take turns in a seeded order
per round (`benchmarks.common.shuffled`), so the machine's load moves them alike.

Run: ``python -m benchmarks.first_check_ttft [--k 16 4 0] [--prompts 24] [--rounds 2] [--json PATH]``
(on 2 AVX2-only cores about 6 minutes, 5 of them compiling the decode step).
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import load, markdown_table, shuffled, write_json


def time_to_first_text(decoder, request) -> tuple[float, int]:
    """Seconds from adding ``request`` to a fresh batch to its first event with text, and the
    decode steps that took (0: the first token left with the prefill)."""
    t = time.perf_counter()
    batch = decoder.new_batch()
    events, steps = batch.add([request])[1], 0
    while not any(tok.text for e in events for tok in e.tokens):
        events, steps = batch.step(), steps + 1
    return time.perf_counter() - t, steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.first_check_ttft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 4, 0], help="candidates (default 16 4 0)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--eager", action="store_true", help="ESS_COMPILE=false (default: compiled)")
    ap.add_argument("--json", default="benchmarks/results/first_check_ttft.json")
    args = ap.parse_args(argv)

    from benchmarks.serving import workload
    from safety_decoding.decode import GenerationRequest
    from safety_decoding.first_check import draft_candidates
    from safety_decoding.policy import SafetyParams
    from safety_decoding.prompt import build_chat_prompt
    from safety_decoding.sampling import SamplingParams

    decoder, tok = load(dtype=args.dtype, compile=not args.eager)
    policy = SafetyParams.from_config(decoder.model.config, enabled=True)

    def request(text: str, max_new_tokens: int = 2) -> GenerationRequest:
        return GenerationRequest(build_chat_prompt(tok, [{"role": "user", "content": text}]),
                                 SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True), policy)

    list(decoder.generate([request("Hello", 4)]))  # compiles the decode step, as the server's warm-up
    candidates = draft_candidates(decoder.model, tok, max(args.k))  # likeliest first: k takes a prefix
    requests = [request(text) for text, _ in workload(tok, 2 * args.prompts, 512, 96, 0)[:args.prompts]]
    seconds = {k: [] for k in args.k}
    waited = {k: 0 for k in args.k}
    for round_ in range(args.rounds):
        for i in shuffled(len(args.k), round_):
            k = args.k[i]
            decoder.first_candidates = candidates[:k]
            for r in requests:
                s, steps = time_to_first_text(decoder, r)
                seconds[k].append(s)
                waited[k] += steps > 0
    results = [{"k": k, "ttft_p50_seconds": round(statistics.median(seconds[k]), 4),
                "ttft_mean_seconds": round(statistics.mean(seconds[k]), 4),
                "waited_a_step": round(waited[k] / len(seconds[k]), 3)} for k in args.k]
    print(markdown_table(["k", "time to first text p50 s", "mean s", "share that waited a step"],
                         [[r["k"], r["ttft_p50_seconds"], r["ttft_mean_seconds"], r["waited_a_step"]]
                          for r in results]))
    out = {"dtype": str(next(decoder.model.parameters()).dtype).removeprefix("torch."),
           "compiled": decoder.compiled, "prompts": args.prompts, "rounds": args.rounds, "results": results}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
