"""How ``ess eval`` gets responses: the local decoder (batched, with an early stop once the
judge's verdict is fixed), the external guard applied to the base model's outputs, or a
running server over HTTP (``--url``)."""

from __future__ import annotations

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from safety_training.refusals import is_refusal
from safety_decoding.model import REFUSAL_PREFIX
from safety_decoding.types import FinishReason

MAX_BATCH = 32
TOKEN_BUDGET = 12288
"""Batch rows times (longest prompt + new tokens) at most: bounds prefill memory and keeps long
jailbreak prompts (up to ~1,200 tokens) from padding short ones (our choice for 2 CPU cores)."""


@dataclass
class Models:
    """What the local backend runs: decoders of the plain base model and of the checkpoint,
    the external guard, and the tokenizer (tests pass tiny random ones)."""

    tok: object
    plain: object
    """`Decoder` over `model.load_plain_model` (systems with ``model == "plain"``)."""
    checkpoint: object
    """`Decoder` over the ESS checkpoint."""
    guard: object | None
    model_ids: dict
    """Names the weights of each kind of system, ``{"plain", "checkpoint", "guard"}`` (part of
    every cache key, `id_for`)."""

    def id_for(self, spec) -> str:
        """The id of the weights ``spec`` runs. Our choice: plain systems are keyed by the base
        model alone, so a new checkpoint reuses their records; the guard by base and guard."""
        return self.model_ids["guard" if spec.guard else spec.model]


def batches(lengths: list[int], new_tokens: int, max_batch: int = MAX_BATCH,
            budget: int = TOKEN_BUDGET) -> list[list[int]]:
    """Indices grouped into batches by ascending length under `MAX_BATCH` and `TOKEN_BUDGET`."""
    out, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if cur and (len(cur) >= max_batch or (len(cur) + 1) * (lengths[i] + new_tokens) > budget):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def scores(safety: dict) -> dict:
    """What a record keeps of a response's ``safety`` object for the threshold sweep
    (`report.verdict_at`): the query verdict, the highest verdict of the decode (query included)
    and the threshold it ran at; None where safety was off."""
    return {k: safety.get(k) for k in ("query_score", "max_score", "threshold")}


def chat_messages(spec, text: str) -> list[dict]:
    """The conversation a system sends: its system prompt (if any) and the user message."""
    system = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    return system + [{"role": "user", "content": text}]


class LocalBackend:
    """Runs cases on the local decoders; see `generate`."""

    def __init__(self, models: Models):
        self.models = models
        self.tok = models.tok

    def prompt(self, spec, case):
        from safety_decoding.prompt import build_chat_prompt

        return build_chat_prompt(self.tok, chat_messages(spec, case.text), case.response_prefix)

    def generate(self, spec, cases: list, max_new_tokens: int) -> Iterator[list[dict]]:
        """Records of ``cases`` for ``spec`` (the guard excluded), one list per finished batch.

        A request stops as soon as its released text contains a refusal phrase: the judge is
        monotone, so the verdict can no longer change (our choice, to spend the CPU budget on
        requests that are still undecided). Such records have ``early_stop`` set.
        """
        from safety_decoding.decode import GenerationRequest
        from safety_decoding.policy import SafetyParams
        from safety_decoding.sampling import SamplingParams

        decoder = self.models.plain if spec.model == "plain" else self.models.checkpoint
        safety = SafetyParams.from_config(self.models.checkpoint.model.config, **dict(spec.safety))
        prompts = [self.prompt(spec, c) for c in cases]
        for idx in batches([len(p.ids) for p in prompts], max_new_tokens):
            stop = [False] * len(idx)
            reqs = [GenerationRequest(prompts[i], SamplingParams(max_new_tokens=max_new_tokens,
                                                                 **dict(cases[i].sampling)),
                                      safety, cancelled=(lambda j=j: stop[j]))
                    for j, i in enumerate(idx)]
            texts, ids, final = [""] * len(idx), [[] for _ in idx], [None] * len(idx)
            for step in decoder.generate(reqs):
                for e in step:
                    texts[e.index] += e.text
                    ids[e.index] += [t.id for t in e.tokens]
                    stop[e.index] = stop[e.index] or is_refusal(texts[e.index])
                    if e.finish_reason:
                        final[e.index] = e
            yield [self._record(cases[i], texts[j], ids[j], final[j]) for j, i in enumerate(idx)]

    @staticmethod
    def _record(case, text: str, ids: list[int], event) -> dict:
        s = event.safety or {}
        return {"attack": case.attack, "case_id": case.case_id, "text": text, "ids": ids,
                "finish_reason": event.finish_reason, "early_stop": event.finish_reason == FinishReason.ABORT,
                "intervened": bool(s.get("intervened")), "stage": s.get("stage"),
                "would_intervene": bool(s.get("would_trip")), **scores(s)}


def guard_checkpoints(n_tokens: int, every: int) -> list[int]:
    """Response lengths at which the guard checks: 0 (the prompt), every ``every`` tokens, and
    the end (as ``ess bench overhead`` times it)."""
    return sorted({0, *range(every, n_tokens + 1, every), n_tokens})


def apply_guard(guard, tok, prompt_ids: list, base_records: list[dict], every: int,
                batch_size: int = 16) -> list[dict]:
    """The external guard over the base model's responses.

    Decoding is unchanged by the guard until it trips, so checking the finished base response
    at each checkpoint gives what an online guard would have released: the tokens up to the
    last passing check, then `REFUSAL_PREFIX` (a blocked prompt gets the prefix alone; our
    choice, a guard answers with a fixed refusal). Checks run round by round, so a request
    stops being scored once it trips.
    """
    from safety_training.guard import guard_input

    points = [guard_checkpoints(len(r["ids"]), every) for r in base_records]
    tripped: dict[int, int] = {}  # record -> index into its checkpoints
    for rnd in range(max(len(p) for p in points)):
        todo = [i for i in range(len(base_records)) if i not in tripped and rnd < len(points[i])]
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            inputs = [guard_input(prompt_ids[i], base_records[i]["ids"][:points[i][rnd]]) for i in chunk]
            probs = guard.scores(inputs)
            tripped.update({i: rnd for i, p in zip(chunk, probs) if p > guard.threshold})
    out = []
    for i, r in enumerate(base_records):
        rec = {**r, "guard_checks": (tripped[i] + 1) if i in tripped else len(points[i])}
        if i in tripped:
            kept = tok.decode(r["ids"][:points[i][tripped[i] - 1]]) if tripped[i] else ""
            sep = " " if kept and not kept[-1].isspace() else ""
            rec.update(text=kept + sep + REFUSAL_PREFIX, intervened=True,
                       stage="query" if tripped[i] == 0 else "response")
        else:
            rec.update(intervened=False, stage=None)
        out.append(rec)
    return out


class HttpBackend:
    """Sends cases to a running ESS server's TGI ``/generate`` (``--url``)."""

    def __init__(self, url: str, workers: int = 4, timeout_s: float = 300.0, post=None):
        self.url = url.rstrip("/") + "/generate"
        self.workers, self.timeout_s = workers, timeout_s
        self.post = post or self._post

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(self.url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
            return json.loads(r.read())

    @staticmethod
    def request_body(case, max_new_tokens: int) -> dict:
        """The ``/generate`` body of a case (TGI fields plus ``response_prefix``)."""
        params = {"max_new_tokens": max_new_tokens, "details": True, **dict(case.sampling)}
        if case.response_prefix:
            params["response_prefix"] = case.response_prefix
        return {"inputs": case.text, "parameters": params}

    def generate(self, spec, cases: list, max_new_tokens: int) -> Iterator[list[dict]]:
        """Records of ``cases`` (``spec`` only names the row: the server's policy applies)."""
        with ThreadPoolExecutor(self.workers) as pool:
            for s in range(0, len(cases), 16):
                chunk = cases[s:s + 16]
                outs = list(pool.map(lambda c: self.post(self.request_body(c, max_new_tokens)), chunk))
                yield [self._record(c, o) for c, o in zip(chunk, outs)]

    @staticmethod
    def _record(case, out: dict) -> dict:
        s = out.get("safety") or {}
        details = out.get("details") or {}
        return {"attack": case.attack, "case_id": case.case_id, "text": out.get("generated_text", ""),
                "ids": [t["id"] for t in details.get("tokens", [])],
                "finish_reason": details.get("finish_reason"), "early_stop": False,
                "intervened": bool(s.get("intervened")), "stage": s.get("stage"),
                "would_intervene": bool(s.get("would_trip")), **scores(s),
                "server_schedule": s.get("schedule"), "server_action": s.get("action")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
