"""The decode loop: prefill with ``[CLS]`` at slot 0, then one forward per step over
``[token, CLS-probe?]`` rows, the policy verdict, token selection, stops and release.

Written batch-first (``B`` rows, left-padded prefill) so batching does not fork the code path:
`DecodeBatch` is the running batch that requests join and leave at step boundaries (continuous
batching) and `Decoder.generate` drives one for a fixed list. Neither does I/O. The KV cache
is a `kv_cache.SlotCache` (written in place); the probe's slot is dropped after each step
(docs/method.md, "Decision 1"), and a truncation back to S_t marks the dropped slots ``PAD``
instead of rewriting the cache, so rows of one batch never need the same length
(docs/architecture.md, "The KV cache and slot layout").

Each request is a `RowState` (its generated tokens as `TokenRecord`s, the forced refusal tokens
still to come, what was released); after the shared forward a step runs three small steps per
row, as TGI splits them into a next-token chooser, stopping criteria and a detokenizer:
`choose` (forced, steered or sampled token), `finish` (EOS, length, abort, the end trip) and
`release` (what passed the checks, detokenized, stop strings, the event).

Fault isolation (our choice): an exception while handling one row (sampling, logits
processors, the policy, detokenizing, stop strings) fails that row alone: it leaves the batch
with finish_reason ``error`` and `StepEvent.error`, and the other rows go on from the same step.
An exception in the shared forward propagates with every row as it was at the step boundary,
so a caller can move the rows to a fresh batch (`DecodeBatch.resume`).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .attention import use_ess_attention
from .first_check import DEFAULT_CANDIDATES, default_candidates, draft_candidates, with_candidates
from .kv_cache import SlotCache
from .layout import NOT_RESPONSE, SlotBatch, SlotLayout, sequence_layout, stack_layouts
from .masks import CLS, PAD, PROBE, TOKEN, strategic_attention_mask
from .model import SafetyModel
from .policy import SafetyParams, SafetyState, Trip
from .prompt import Prompt, encode
from .sampling import SamplingParams, logits_processors, make_generator, select_token
from .text import IncrementalDetokenizer, StopStringBuffer, refusal_separator
from .types import Action, FinishReason, Quantization

log = logging.getLogger(__name__)

RELEASE_ALL = (FinishReason.EOS, FinishReason.LENGTH)
"""Finish reasons after which everything generated is released (once the end trip ran)."""

PREFILL_BUCKET = 16
"""A prefill's columns are left-padded to a multiple of this. Our choice: on CPU, oneDNN and
the attention kernel build a primitive for each new row count of a product and cache it, which
made a prefill of a length not seen before 15 % slower than one of a length seen before (2 AMX
cores, bfloat16, ShareGPT prompts); with buckets, 32 row counts cover every prompt of up to 512
tokens, at the price of up to 15 padding columns, about 2 % (``python -m
benchmarks.prefill_shapes``). Chunked prefills are not bucketed: their chunks have fixed widths."""


@dataclass
class GenerationRequest:
    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)
    safety: SafetyParams = field(default_factory=SafetyParams)
    cancelled: Callable[[], bool] = lambda: False
    """Polled at every step boundary; True aborts the request."""
    trace: bool = False
    """Add every verdict (``safety["trace"]``) to the final event."""


@dataclass(frozen=True)
class TokenOutput:
    id: int
    text: str
    """Text released with this token ("" while held for UTF-8, stop strings or a check)."""
    logprob: float
    forced: bool
    """Inserted by the safety policy rather than chosen by sampling."""


@dataclass
class StepEvent:
    """What one request released in one step."""

    index: int
    """Id of the request: its position in ``generate``'s list, or the id `DecodeBatch.add` gave."""
    tokens: list[TokenOutput]
    finish_reason: FinishReason | None = None
    safety: dict | None = None
    """The `SafetyState.summary` object, on the finishing event only (None on an error)."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    checked: bool = False
    """This step ran a ``[CLS]`` re-check for the request (an event is sent even when the
    check released no token, so callers can time checked and unchecked steps apart)."""
    error: str | None = None
    """Why the request failed (finish_reason ``error``): ``"<ExceptionType>: <message>"``."""

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


@dataclass(frozen=True)
class TokenRecord:
    """One generated token of a row."""

    id: int
    logprob: float
    """Log-probability under the processed distribution (0.0 when inserted without logits)."""
    forced: bool
    """Inserted by the safety policy rather than chosen by sampling."""


@dataclass
class RowState:
    """One request in a running batch: everything about it that is not the shared KV cache.

    Generated-token indices ``g_0, g_1, ...`` (`policy`) index `records`.
    """

    id: int
    req: GenerationRequest
    safety: SafetyState
    procs: object
    """The transformers ``LogitsProcessorList`` of its sampling parameters."""
    generator: torch.Generator
    detok: IncrementalDetokenizer
    stopbuf: StopStringBuffer
    cls_slot: int = 0
    """Cache slot of this row's ``[CLS]`` (moves when the batch is padded or trimmed)."""
    records: list[TokenRecord] = field(default_factory=list)
    """One record per generated token still in the response (truncated tokens are gone)."""
    forced_tokens: deque = field(default_factory=deque)
    """Refusal-prefix ids still to come: inserted one a step (``refuse``) or steered toward
    (``reweight``)."""
    refusal_ends: bool = False
    """The queued refusal is the server's whole refusal (`SafetyConfig.refusal_completion`):
    once it starts the rest is inserted at once, and the response ends with it."""
    released: int = 0
    """``records[:released]`` reached the caller."""
    prechecked: TokenRecord | None = None
    """``g_0``'s record when the prefill ran its check (`first_check`): step 1 skips it."""
    ending: FinishReason | None = None
    """The response ended (EOS or length) with tokens no check has cleared yet: the next step
    only checks them (`needs_final_check`), then the row ends with this reason."""
    finish_reason: FinishReason | None = None
    error: str | None = None

    @classmethod
    def start(cls, id: int, req: GenerationRequest, tokenizer) -> "RowState":
        """A fresh row for ``req`` (its processors, generator, detokenizer, stop buffer).

        Raises:
            whatever building them raises for this request's parameters.
        """
        prefill = len(req.prompt.ids) - req.prompt.response_start
        return cls(id, req, SafetyState(req.safety, prefill=prefill), logits_processors(req.sampling),
                   make_generator(req.sampling), IncrementalDetokenizer(tokenizer),
                   StopStringBuffer(req.sampling.stop))

    @property
    def prompt_len(self) -> int:
        """``[CLS]`` + prompt (tokens): the position of ``g_0``."""
        return 1 + len(self.req.prompt.ids)

    @property
    def n_generated(self) -> int:
        return len(self.records)

    @property
    def generated_ids(self) -> list[int]:
        return [r.id for r in self.records]

    @property
    def last_id(self) -> int | None:
        """The newest token id: the last generated one, else the prompt's last, else None."""
        if self.records:
            return self.records[-1].id
        return self.req.prompt.ids[-1] if self.req.prompt.ids else None

    def history(self) -> torch.Tensor:
        """``(n,)`` long: prompt + generated ids (what the repetition penalty reads)."""
        return torch.tensor(list(self.req.prompt.ids) + self.generated_ids, dtype=torch.long)

    def layout(self) -> SlotLayout:
        """What this row's cache holds at a step boundary: ``[CLS]`` + prompt + every generated
        token but the newest (the next step feeds that one)."""
        p = self.req.prompt
        return sequence_layout(p.ids, p.query_mask, self.generated_ids[:-1], response_start=p.response_start,
                               cls=self.req.safety.enabled, tokens_read_cls=self.req.safety.tokens_read_cls)

    def truncate(self, t: int) -> None:
        """Keep ``g_0 .. g_{t-1}``.

        Raises:
            AssertionError: a token from ``t`` on was already released (a policy bug).
        """
        assert self.released <= t, "a token covered by a failed check was released"
        del self.records[t:]

    def insert_forced(self) -> None:
        """Append the queued forced tokens at once (the response ends: no step is left), as
        many as ``max_new_tokens`` leaves room for. Our choice, as in vLLM and TGI: no response
        is longer than the client asked, so a refusal at the token cap is cut short."""
        room = self.req.sampling.max_new_tokens - self.n_generated
        while self.forced_tokens and room > 0:
            self.records.append(TokenRecord(self.forced_tokens.popleft(), 0.0, True))
            room -= 1
        self.forced_tokens.clear()


# ---- the three per-row steps --------------------------------------------------------------


def choose(row: RowState, logits: torch.Tensor | None) -> TokenRecord:
    """The next token of ``row``: the next forced refusal token (``refuse``, or no logits after
    a trip), else a sampled one, steered toward the refusal while ``reweight`` steers.

    Args:
        logits: ``(V,)`` float next-token logits, or None right after a trip.

    Raises:
        SamplingError: see `sampling.select_token`.
    """
    queue = row.forced_tokens
    if queue and (logits is None or not row.safety.steering):
        token = queue.popleft()
        lp = float(torch.log_softmax(logits.float(), -1)[token]) if logits is not None else 0.0
        return TokenRecord(token, lp, True)
    history = row.history() if row.procs else None  # only the repetition penalty reads it
    if queue:  # reweight: steer toward the next refusal-prefix token
        logits = logits.clone()
        logits[queue[0]] += row.safety.steer_bias
    token, lp = select_token(logits, history, row.req.sampling, row.procs, row.generator)
    if queue:  # following the prefix keeps steering; any other token ends it
        if token == queue[0]:
            queue.popleft()
        else:
            queue.clear()
            row.refusal_ends = False
    return TokenRecord(token, lp, False)


def finish(row: RowState, record: TokenRecord, stop_ids: set[int]) -> Trip | None:
    """Add ``record`` to the response (unless it ends it) and decide whether the row ends.

    EOS (a sampled stop id, not kept), then length (``max_new_tokens``), then abort (the
    request's ``cancelled``). An EOS or length end with tokens still held for a check becomes
    `RowState.ending` (`needs_final_check`); otherwise it asks the policy for the end trip
    (`SafetyState.on_finish`). A server-written refusal (`RowState.refusal_ends`) is completed
    at once when its first token is inserted, or when steering has followed it to its end,
    and ends the response as an EOS would.

    Returns:
        The end trip, or None: the caller truncates and inserts the refusal.
    """
    sp = row.req.sampling
    if not record.forced and record.id in stop_ids and not sp.ignore_eos:
        row.finish_reason = FinishReason.EOS
    else:
        row.records.append(record)
        if row.refusal_ends and (record.forced or not row.forced_tokens):
            row.insert_forced()
            row.finish_reason = FinishReason.EOS
    if row.finish_reason is None and row.n_generated >= sp.max_new_tokens:
        row.finish_reason = FinishReason.LENGTH
    if row.finish_reason is None and row.req.cancelled():
        row.finish_reason = FinishReason.ABORT
    if row.finish_reason in RELEASE_ALL and needs_final_check(row):
        row.ending, row.finish_reason = row.finish_reason, None
        return None
    return row.safety.on_finish() if row.finish_reason in RELEASE_ALL else None


def needs_final_check(row: RowState) -> bool:
    """Whether a response that ends now holds tokens that no passing check covers (the newest
    token under ``each``, a ``periodic`` tail, or a client's prefill and ``g_0`` when
    ``max_new_tokens`` is 1), outside a malicious streak (`SafetyState.on_finish` settles
    that). Such tokens get one more check before the end instead of leaving unchecked: a
    client asking for one token at a time must not get text no check has read. Our choice."""
    return not row.safety.streak and row.safety.releasable(row.n_generated) < row.n_generated


def release(row: RowState, checked: bool = False) -> StepEvent | None:
    """Release what passed the checks (all of it once the response ended), through the
    detokenizer and the stop strings; build the step's event.

    Returns:
        None when nothing was released, the row goes on and no check ran.
    """
    ended = row.finish_reason in RELEASE_ALL
    limit = row.n_generated if ended else row.safety.releasable(row.n_generated)
    tokens = []
    while row.released < limit and row.finish_reason != FinishReason.STOP_SEQUENCE:
        rec = row.records[row.released]
        text, matched = row.stopbuf.push(row.detok.push(rec.id))
        row.released += 1
        tokens.append(TokenOutput(rec.id, text, rec.logprob, rec.forced))
        if matched:
            row.finish_reason = FinishReason.STOP_SEQUENCE
    if row.finish_reason in RELEASE_ALL:
        tokens = _with_tail(tokens, row.stopbuf.flush(), row.records[-1].id if row.records else None)
    if not tokens and row.finish_reason is None and not checked:
        return None
    done = row.finish_reason is not None
    return StepEvent(row.id, tokens, row.finish_reason,
                     row.safety.summary(row.req.trace) if done else None,
                     prompt_tokens=len(row.req.prompt.ids),
                     generated_tokens=row.released if done else 0, checked=checked)


def _with_tail(tokens: list[TokenOutput], tail: str, last_id: int | None) -> list[TokenOutput]:
    """Attach the stop buffer's held text to the last token (or to a token of its own)."""
    if not tail:
        return tokens
    if tokens:
        last = tokens[-1]
        return tokens[:-1] + [TokenOutput(last.id, last.text + tail, last.logprob, last.forced)]
    return [TokenOutput(last_id, tail, 0.0, False)]


def error_event(index: int, prompt_tokens: int, generated_tokens: int, exc: BaseException) -> StepEvent:
    """The final event of a request that failed with ``exc``."""
    return StepEvent(index, [], FinishReason.ERROR, None, prompt_tokens=prompt_tokens,
                     generated_tokens=generated_tokens, error=f"{type(exc).__name__}: {exc}")


def fail(row: RowState, exc: BaseException) -> StepEvent:
    """End ``row`` with finish_reason ``error`` (it leaves the batch at the end of the step)."""
    log.warning("request %d failed alone: %s: %s", row.id, type(exc).__name__, exc, exc_info=exc)
    event = error_event(row.id, len(row.req.prompt.ids), row.released, exc)
    row.finish_reason, row.error = FinishReason.ERROR, event.error
    return event


@dataclass
class _Slots:
    """What each KV-cache slot holds, per row: ``(B, kv)`` tensors."""

    kind: torch.Tensor
    """`masks` kind; truncated slots become ``PAD``."""
    in_query: torch.Tensor
    gen: torch.Tensor
    """Generated-token index of the slot, -1 for prompt and padding."""

    def select(self, index: torch.Tensor, start: int) -> "_Slots":
        """Rows ``index``, columns from ``start`` on."""
        return _Slots(self.kind[index, start:], self.in_query[index, start:], self.gen[index, start:])

    def pad_left(self, width: int) -> "_Slots":
        """Prepend ``width`` ``PAD`` columns."""
        B = self.kind.shape[0]
        return _Slots(torch.cat([torch.full((B, width), PAD, dtype=torch.long), self.kind], 1),
                      torch.cat([torch.zeros(B, width, dtype=torch.bool), self.in_query], 1),
                      torch.cat([torch.full((B, width), NOT_RESPONSE, dtype=torch.long), self.gen], 1))

    def drop_from(self, b: int, t: int) -> None:
        """Row ``b``'s slots of ``g_t`` on become ``PAD`` (a truncation to ``t`` tokens)."""
        self.kind[b, self.gen[b] >= t] = PAD


def _pad_cache_left(cache: SlotCache, width: int) -> None:
    """Prepend ``width`` zero slots to every layer (they are ``PAD``: never attended)."""
    if width:
        for layer in cache.layers:
            B, H, _, D = layer.keys.shape
            zeros = layer.keys.new_zeros(B, H, width, D)
            layer.keys = torch.cat([zeros, layer.keys], 2)
            layer.values = torch.cat([zeros, layer.values], 2)


class DecodeBatch:
    """The running batch of a `Decoder`: rows, one KV cache and what each slot holds.

    Continuous batching (our choice, the TGI v1 scheme): `add` runs the new requests' prefill
    as a forward of their own and merges their cache into the batch, left-padding the shorter
    side with ``PAD`` slots (positions are explicit, so padding never shifts rotary positions);
    `step` runs one decode step over every row; rows that finished leave the batch at the end
    of that step, and leading columns that became ``PAD`` in every row are trimmed. Every row
    keeps its own safety state, probe windows and mask. Not thread-safe: one thread owns it.

    Chunked prefill (``prefill_chunk`` tokens; None: off): while rows are decoding, a join
    whose layout is longer runs its prefill in chunks, one per `step`, before that step's
    decode forward, so running rows wait for one chunk at a time rather than a whole prompt
    (vLLM's and TGI's chunked prefill; see `_prefill_chunks` for where ``[CLS]`` goes). A join
    into an empty batch prefills at once: nobody waits, and one forward is faster.
    """

    def __init__(self, decoder: "Decoder", prefill_chunk: int | None = None):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1 token, or None")
        self.decoder = decoder
        self.prefill_chunk = prefill_chunk
        self.rows: list[RowState] = []
        self.cache: SlotCache | None = None
        self.slots: _Slots | None = None
        self._joining: deque = deque()
        """``(rows, chunks)`` of chunked prefills in progress (`_prefill_chunks` generators)."""
        self.prefill_chunks_run = 0
        """Chunks of chunked prefills run so far (each before one decode step's forward)."""
        self._next_id = 0

    def __len__(self) -> int:
        """Running rows, and rows whose chunked prefill is in progress."""
        return len(self.rows) + sum(len(rows) for rows, _ in self._joining)

    @property
    def num_slots(self) -> int:
        """KV-cache length of the batch (slots per row, padding included)."""
        return 0 if self.slots is None else self.slots.kind.shape[1]

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    @torch.inference_mode()
    def add(self, requests: list[GenerationRequest]) -> tuple[list[int], list[StepEvent]]:
        """Prefill ``requests`` and join them to the batch.

        A request whose row cannot be built, or whose first token fails, ends at once with an
        ``error`` event; the others are unaffected.

        Returns:
            The id of each request (`StepEvent.index` of its events) and the prefill events
            (the first token of each request, or its end; for a chunked prefill they come
            from the `step` that runs its last chunk).

        Raises:
            Exception: the shared prefill forward failed; the batch is untouched.
        """
        d = self.decoder
        ids, rows, events = [], [], []
        for r in requests:
            ids.append(self._new_id())
            try:
                rows.append((RowState.start(ids[-1], r, d.tok)))
            except Exception as exc:
                log.warning("request %d failed alone: %s: %s", ids[-1], type(exc).__name__, exc)
                events.append(error_event(ids[-1], len(r.prompt.ids), 0, exc))
        if rows and self.rows and self.prefill_chunk and max(r.prompt_len for r in rows) > self.prefill_chunk:
            self._joining.append((rows, self._prefill_chunks(rows)))  # `step` runs it
        elif rows:
            last, cls, cache, slots, first = self._prefill(rows, speculate=True)
            events += self._first_tokens(rows, last, cls, slots, first)
            self._join(rows, cache, slots)
            self._leave()
        return ids, sorted((e for e in events if e), key=lambda e: e.index)

    @torch.inference_mode()
    def resume(self, rows: list[RowState]) -> list[int]:
        """Join running ``rows`` taken from another batch (one whose shared forward failed):
        re-prefill each row's ``[CLS]`` + prompt + generated tokens but the newest, which the
        next `step` feeds as usual.

        Everything else carries over (policy state, sampling generator, detokenizer, stop
        buffer, released count), so no released text is released again and greedy rows go on
        as they would have. One difference (our choice, rare): with ``update_cls`` the
        ``[CLS]`` slot holds the query's state again instead of the last re-check's.

        Returns:
            The rows' new ids (`StepEvent.index` from now on).

        Raises:
            ValueError: a row that already finished, or has no generated token.
            Exception: the prefill forward failed; the batch is untouched.
        """
        if any(r.finish_reason is not None or not r.records for r in rows):
            raise ValueError("only running rows with a generated token can resume")
        if rows:
            _, _, cache, slots, _ = self._prefill(rows)
            for row in rows:
                row.id = self._new_id()
            self._join(rows, cache, slots)
        return [r.id for r in rows]

    def _stack(self, rows: list[RowState], bucket: int = 1) -> tuple[SlotBatch, SlotCache]:
        """``rows``' layouts left-padded to a multiple of ``bucket`` columns (each row's
        ``cls_slot`` set) and an empty cache."""
        batch = stack_layouts([row.layout() for row in rows], left=True, multiple_of=bucket)
        for row, offset in zip(rows, batch.offsets):
            row.cls_slot = offset
        return batch, SlotCache(self.decoder.model.decoder.config)

    def _prefill(self, rows: list[RowState], speculate: bool = False):
        """One forward over ``rows``' layouts, left-padded; sets each row's ``cls_slot``.

        Args:
            speculate: carry the decoder's candidate first tokens and their probes for the rows
                that check ``g_0`` (`first_check`; fresh rows only).

        Returns:
            ``(last (B, H), cls (B, H), their own cache, their slots, first)``: the final hidden
            states of the last prompt slot and of ``[CLS]``; ``first`` is None, or per row None
            or ``(probes (k, H), window)``: the final hidden states of its candidates' probes
            (in `Decoder.first_candidates` order) and the window they read.
        """
        d = self.decoder
        batch, cache = self._stack(rows, d.prefill_bucket)
        windows = [_first_window(r) for r in rows] if speculate and d.first_candidates else [None] * len(rows)
        if any(w is not None for w in windows):
            k = len(d.first_candidates)
            ids, kinds, pos, mask = with_candidates(
                batch, d.first_candidates, [r.prompt_len for r in rows], windows,
                [r.req.safety.tokens_read_cls for r in rows])
        else:
            k, ids, kinds, pos, mask = 0, batch.ids, batch.kinds, batch.positions, batch.mask()
        dev = d.device  # bookkeeping stays on the CPU; the forward's inputs go to the model
        hidden, _ = d.model.hidden_states(ids.to(dev), kinds.to(dev), pos.to(dev), mask.to(dev), cache)
        cls = hidden[torch.arange(len(rows), device=dev), torch.tensor(batch.offsets, device=dev)]
        first = None
        if k:
            cache.crop(-2 * k)  # the cache holds what a plain prefill leaves
            first = [None if w is None else (hidden[b, -k:], w) for b, w in enumerate(windows)]
        return hidden[:, -1 - 2 * k], cls, cache, _Slots(batch.kinds, batch.in_query, batch.gen), first

    def _first_tokens(self, rows: list[RowState], last: torch.Tensor, cls: torch.Tensor,
                      slots: _Slots, first: list | None = None) -> list[StepEvent]:
        """The query verdict and the first token of each freshly prefilled row.

        Args:
            last, cls: ``(B, H)`` final hidden states of the last prompt slot and of ``[CLS]``.
            first: `_prefill`'s speculative first checks, or None.
        """
        d, model = self.decoder, self.decoder.model
        logits = model.lm_logits(last).float().cpu()
        scores = torch.sigmoid(model.safety_logits(cls).float()).cpu()
        events = []
        for b, row in enumerate(rows):
            try:
                if row.req.safety.enabled and row.safety.on_query(float(scores[b])):
                    d.queue_refusal(row)
                events.append(d._advance(slots, b, row, logits[b], first_check=first and first[b]))
            except Exception as exc:
                events.append(fail(row, exc))
        return events

    def _prefill_chunks(self, rows: list[RowState]):
        """`_prefill` in chunks of ``prefill_chunk`` columns: a generator that yields None after
        each chunk but the last, then ``(last (B, H), cls (B, H), cache, slots)``.

        ``[CLS]`` reads the whole query, which lies after its slot, and the rows from the end
        of the query on read ``[CLS]`` (`layout`). So the chunks run the columns before the
        first such row (the ``[CLS]`` slot's own row there sees only part of the query, and no
        row reads it); the last chunk runs every later column plus one fresh ``[CLS]`` row per
        sequence (a probe at position 0 that reads the query), and its readers read that row in
        place of the ``[CLS]`` slot. The fresh row's K/V then replace the slot's
        (`_update_cls`) and its verdict is the query verdict: the same function as one forward.
        """
        model, size, dev = self.decoder.model, self.prefill_chunk, self.decoder.device
        batch, cache = self._stack(rows)  # not bucketed: chunks have fixed widths of their own
        B, P = batch.kinds.shape
        readers = batch.reads_cls.any(0).nonzero()
        first_reader = min(int(readers[0]) if len(readers) else P, P - 1)
        full = batch.mask()
        for s in range(0, first_reader, size):
            e = min(s + size, first_reader)
            model.hidden_states(batch.ids[:, s:e].to(dev), batch.kinds[:, s:e].to(dev),
                                batch.positions[:, s:e].to(dev), full[:, :, s:e, :e].to(dev), cache)
            yield None
        cls_cols = torch.tensor(batch.offsets)
        has_cls = batch.kinds[torch.arange(B), cls_cols] == CLS
        kinds = torch.cat([batch.kinds, torch.where(has_cls, PROBE, PAD).unsqueeze(1)], 1)
        mask = strategic_attention_mask(
            kinds, torch.cat([batch.in_query, torch.zeros(B, 1, dtype=torch.bool)], 1),
            torch.arange(first_reader, P + 1).expand(B, -1),
            torch.cat([batch.reads_cls[:, first_reader:], torch.zeros(B, 1, dtype=torch.bool)], 1))
        for b, c in enumerate(batch.offsets):  # readers read the fresh row, not the stale slot
            mask[b, 0, :-1, P] = mask[b, 0, :-1, c]
            mask[b, 0, :-1, c] = False
        ids = torch.cat([batch.ids[:, first_reader:], torch.zeros(B, 1, dtype=torch.long)], 1)
        pos = torch.cat([batch.positions[:, first_reader:], torch.zeros(B, 1, dtype=torch.long)], 1)
        hidden, _ = model.hidden_states(ids.to(dev), kinds[:, first_reader:].to(dev), pos.to(dev), mask.to(dev), cache)
        _update_cls(cache, [b for b in range(B) if has_cls[b]], rows)
        cache.crop(-1)
        yield hidden[:, -2], hidden[:, -1], cache, _Slots(batch.kinds, batch.in_query, batch.gen)

    def _run_chunk(self) -> list[StepEvent]:
        """One chunk of the oldest chunked prefill; after its last, the rows' first tokens and
        their join."""
        rows, chunks = self._joining[0]
        done = next(chunks)
        self.prefill_chunks_run += 1
        if done is None:
            return []
        self._joining.popleft()
        last, cls, cache, slots = done
        events = self._first_tokens(rows, last, cls, slots)
        self._join(rows, cache, slots)
        self._leave()
        return [e for e in events if e]

    def _join(self, rows: list[RowState], cache: SlotCache, slots: _Slots) -> None:
        """Append prefilled ``rows`` (their own ``cache``/``slots``) to the batch."""
        if self.cache is None:
            self.rows, self.cache, self.slots = rows, cache, slots
            return
        width = max(self.num_slots, slots.kind.shape[1])
        for side_rows, side_cache, side_slots in ((self.rows, self.cache, self.slots), (rows, cache, slots)):
            grow = width - side_slots.kind.shape[1]
            _pad_cache_left(side_cache, grow)
            for row in side_rows:
                row.cls_slot += grow
        old, new = self.slots.pad_left(width - self.num_slots), slots.pad_left(width - slots.kind.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys], 0)
            mine.values = torch.cat([mine.values, theirs.values], 0)
        self.slots = _Slots(torch.cat([old.kind, new.kind]), torch.cat([old.in_query, new.in_query]),
                            torch.cat([old.gen, new.gen]))
        self.rows = self.rows + rows

    def _leave(self) -> None:
        """Drop finished rows from the batch and trim columns that are ``PAD`` in every row."""
        keep = [b for b, r in enumerate(self.rows) if r.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.slots = [], None, None
            return
        index = torch.tensor(keep)
        used = (self.slots.kind[index] != PAD).any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        on_device = index.to(self.decoder.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[on_device, :, start:]
            layer.values = layer.values[on_device, :, start:]
        self.slots = self.slots.select(index, start)
        self.rows = [self.rows[b] for b in keep]
        for row in self.rows:
            row.cls_slot -= start

    def _plan(self) -> tuple[list[bool], list[tuple[int, int] | None], list[StepEvent]]:
        """Per row, before the forward: whether it runs a probe, and the probe's window.

        A row whose policy fails here leaves the batch before the forward (its error event is
        returned).
        """
        plans, events = [], []
        for row in self.rows:
            try:
                n = row.n_generated
                check = row.ending is not None or (
                    row.safety.needs_check(n) and not (n == 1 and row.prechecked is row.records[0]))
                plans.append((check, row.safety.window(n) if check else None))
            except Exception as exc:
                events.append(fail(row, exc))
                plans.append(None)
        if events:
            plans = [p for p in plans if p is not None]  # the rows `_leave` keeps, in order
            self._leave()
        return [c for c, _ in plans], [w for _, w in plans], events

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One decode step over every running row: ``[token, CLS-probe?]`` per row.

        Returns:
            The events of this step (rows that released nothing and ran no check send none).

        Raises:
            Exception: the shared forward failed. Every row is as it was before the step
            (nothing of its state changed), so the rows can `resume` in a fresh batch; this
            batch's cache may be inconsistent and must not step again.
        """
        joined = self._run_chunk() if self._joining else []
        if not self.rows:
            return joined
        check, windows, events = self._plan()
        events = joined + events
        if not self.rows:
            return events
        d, model, rows, slots, cache = self.decoder, self.decoder.model, self.rows, self.slots, self.cache
        B = len(rows)
        q = 2 if any(check) else 1
        kv = slots.kind.shape[1]
        step_ids = torch.zeros(B, q, dtype=torch.long)
        step_kind = torch.full((B, q), PAD, dtype=torch.long)
        step_pos = torch.zeros(B, q, dtype=torch.long)
        window = torch.zeros(B, q, kv + q, dtype=torch.bool)
        step_reads = torch.zeros(B, q, dtype=torch.bool)
        new_gen = torch.full((B, q), NOT_RESPONSE, dtype=torch.long)
        for b, row in enumerate(rows):
            n = row.n_generated
            step_ids[b, 0] = row.records[-1].id
            # an EOS end's newest token is in the cache already: its final step only checks
            step_kind[b, 0] = PAD if row.ending == FinishReason.EOS else TOKEN
            step_pos[b, 0] = row.prompt_len + n - 1
            step_reads[b, 0] = row.req.safety.enabled and row.req.safety.tokens_read_cls
            new_gen[b, 0] = n - 1
            if check[b]:
                step_kind[b, 1] = PROBE
                lo, hi = windows[b]
                gens = torch.cat([slots.gen[b], new_gen[b]])
                window[b, 1] = (gens >= lo) & (gens < hi)
        key_kind = torch.cat([slots.kind, step_kind], 1)
        key_in_query = torch.cat([slots.in_query, torch.zeros(B, q, dtype=torch.bool)], 1)
        row_index = torch.arange(kv, kv + q).expand(B, q)
        mask = strategic_attention_mask(key_kind, key_in_query, row_index, step_reads, window)
        dev = d.device
        hidden, _ = model.hidden_states(step_ids.to(dev), step_kind.to(dev), step_pos.to(dev),
                                        mask.to(dev), cache)
        if q == 2:
            _update_cls(cache, [b for b in range(B) if check[b] and rows[b].req.safety.update_cls], rows)
            cache.crop(-1)  # drop the probe's slot (its K/V may live on in the [CLS] slot)
            probe_scores = torch.sigmoid(model.safety_logits(hidden[:, 1]).float()).cpu()
        # a final check only checks: no LM head when every row runs one (a batch of 1 ending)
        logits = None if all(row.ending for row in rows) else model.lm_logits(hidden[:, 0]).float().cpu()
        slots = self.slots = _Slots(key_kind[:, :kv + 1], key_in_query[:, :kv + 1],
                                    torch.cat([slots.gen, new_gen[:, :1]], 1))
        for b, row in enumerate(rows):  # from here on a failure is the row's alone
            try:
                trip = row.safety.on_check(float(probe_scores[b]), row.n_generated) if check[b] else None
                if trip:
                    d._trip(slots, b, row, trip)
                    events.append(d._advance(slots, b, row, None, check[b]))
                elif row.ending:
                    events.append(d._end(slots, b, row))
                else:
                    events.append(d._advance(slots, b, row, logits[b], check[b]))
            except Exception as exc:
                events.append(fail(row, exc))
        self._leave()
        return [e for e in events if e]


def _update_cls(cache: SlotCache, batch_rows: list[int], rows: list[RowState]) -> None:
    """Copy the probe's K/V (the newest cache slot) into each row's ``[CLS]`` slot.

    The probe runs at position 0 like ``[CLS]``, so its rotary-encoded key is valid there.
    """
    if not batch_rows:
        return
    dev = cache.layers[0].keys.device
    idx = torch.tensor(batch_rows, device=dev)
    cls_slots = torch.tensor([rows[b].cls_slot for b in batch_rows], device=dev)
    for layer in cache.layers:
        layer.keys[idx, :, cls_slots] = layer.keys[idx, :, -1]
        layer.values[idx, :, cls_slots] = layer.values[idx, :, -1]


class Decoder:
    """Runs `GenerationRequest`s on a `SafetyModel` (one thread owns it; not thread-safe).

    Args:
        fused: run the body through `fused.FusedBody` where it can be fused (merged weights),
            else transformers' modules (the eager fallback, ``ESS_FUSED_FORWARD=false``).
        quantization: the fused body's weights (a `types.Quantization` value,
            ``ESS_QUANTIZATION``).
        first_check: candidate first tokens of the speculative first check (`first_check`,
            ``ESS_FIRST_CHECK_CANDIDATES``; 0: off).
        compile: run one-row decode steps through `compiled.CompiledStep` where it can run
            (`SafetyModel.use_compiled_step`; ``ESS_COMPILE``). The first such step compiles
            (about 110 s on 2 cores).

    Raises:
        ValueError: ``quantization`` is not ``none`` and the model cannot run it (not fused, or
            see `fused.check_quantization`).
    """

    def __init__(self, model: SafetyModel, tokenizer, fused: bool = True, quantization: str = "none",
                 first_check: int = DEFAULT_CANDIDATES, compile: bool = False):
        self.model = model
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        use_ess_attention(model._causal_lm())  # probe steps: no K/V head copies (attention.py)
        on = model.use_fused_forward(fused and not model.training, quantization)
        if quantization != Quantization.NONE and not on:
            raise ValueError(f"quantization: {quantization} needs the fused forward (ESS_FUSED_FORWARD=true, "
                             "merged weights)")
        self.compiled = model.use_compiled_step(compile and on)
        """Whether one-row decode steps run compiled (`compile`, where it can run)."""
        if compile and not self.compiled:
            log.info("compile: the compiled decode step needs the fused forward on CPU, no quantization and "
                     "an adapter merged into every row; every step runs eager")
        self.refusal = model.config.refusal_prefix
        self.refusal_completion = model.config.refusal_completion
        # EOS plus the document end token (SmolLM2's <|endoftext|> doubles as its unk token).
        ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        self.stop_ids = {i for i in ids if isinstance(i, int) and i >= 0}
        self.first_candidates = draft_candidates(model, tokenizer, first_check)
        """Candidate first tokens of the speculative first check (`first_check`; () off)."""
        self.prefill_bucket = PREFILL_BUCKET
        """A prefill's columns are a multiple of this (1: no bucketing; `PREFILL_BUCKET`)."""

    @classmethod
    def from_checkpoint(cls, checkpoint, base_dir, device: str = "cpu", dtype: str = "float32",
                        fused: bool = True, quantization: str = "none",
                        first_check: int | None = None, compile: bool = False) -> "Decoder":
        """Load ``checkpoint`` on the prepared base model in ``base_dir`` (LoRA merged).

        Args:
            device, dtype: names as ``ESS_DEVICE`` / ``ESS_DTYPE`` take them (``auto`` included,
                see `device.resolve_device` / `device.resolve_dtype`).
            fused, quantization, compile: see `Decoder`.
            first_check: see `Decoder`; None: `first_check.default_candidates` for the dtype the
                model runs in (what ``ess serve`` runs with ``ESS_FIRST_CHECK_CANDIDATES`` unset).

        Raises:
            CheckpointError: see `model.load_safety_model`.
            ValueError: an unknown dtype, CUDA asked for where there is none, or a quantization
                the model cannot run.
        """
        from transformers import AutoTokenizer

        from .device import resolve_device, resolve_dtype
        from .model import load_safety_model

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model = load_safety_model(checkpoint, base_dir, dtype=dt).to(dev)
        return cls(model, AutoTokenizer.from_pretrained(str(base_dir)), fused=fused, quantization=quantization,
                   first_check=default_candidates(dt) if first_check is None else first_check, compile=compile)

    def refusal_ids(self, row: RowState) -> list[int]:
        """Token ids of the refusal as it follows ``row``'s text (`text.refusal_separator`: a
        new paragraph after generated text, a space after a prefill's last word): the prefix,
        then the checkpoint's `SafetyConfig.refusal_completion` (empty: the LM writes the rest)."""
        generated = row.generated_ids
        before = self.tok.decode(generated if generated else [row.last_id] if row.last_id is not None else [])
        text = refusal_separator(before, mid_response=bool(generated)) + self.refusal + self.refusal_completion
        return encode(self.tok, text, split_special_tokens=False)

    def queue_refusal(self, row: RowState) -> None:
        """Queue ``row``'s refusal (`refusal_ids`); it ends the response when the checkpoint
        writes the whole refusal."""
        row.forced_tokens = deque(self.refusal_ids(row))
        row.refusal_ends = bool(self.refusal_completion)

    def prefill_columns(self, request: GenerationRequest) -> int:
        """Columns of ``request``'s own layout in a prefill: ``[CLS]``, its prompt, and with
        safety on the first check's ``2k`` candidate and probe slots (`first_check`; a
        ``monitor`` or ``update_cls`` row does not speculate, but shares them with rows that do).
        What ``ESS_MAX_BATCHED_TOKENS`` sums over a join. Rows are left-padded to the longest,
        rounded up to `Decoder.prefill_bucket`, so a join runs more columns than the sum (vLLM's
        budget has no padding): a soft limit."""
        return 1 + len(request.prompt.ids) + (2 * len(self.first_candidates) if request.safety.enabled else 0)

    def new_batch(self, prefill_chunk: int | None = None) -> DecodeBatch:
        """An empty running batch (continuous batching: `DecodeBatch.add` / `.step`;
        ``prefill_chunk``: see `DecodeBatch`)."""
        return DecodeBatch(self, prefill_chunk)

    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[StepEvent]]:
        """Decode ``requests`` together; yields the events of each step until all finish.

        ``StepEvent.index`` is the request's position in ``requests``.
        """
        batch = self.new_batch()
        yield batch.add(requests)[1]
        while batch:
            yield batch.step()

    # ---- per-row helpers -------------------------------------------------------------------

    def _trip(self, slots: _Slots, b: int, row: RowState, trip: Trip) -> None:
        """Drop ``g_{S_t}..`` from the response and the cache view, queue the refusal (a pending
        end is off: the refusal fills the room left)."""
        row.ending = None
        slots.drop_from(b, trip.truncate_to)
        row.truncate(trip.truncate_to)
        self.queue_refusal(row)

    def _advance(self, slots: _Slots, b: int, row: RowState, logits: torch.Tensor | None,
                 checked: bool = False, first_check: tuple | None = None) -> StepEvent | None:
        """Choose the next token, apply the stops, release what passed (`choose`, `finish`,
        `release`).

        Args:
            first_check: ``(probes (k, H), window)`` of the prefill's speculative check of
                ``g_0`` (`first_check`), or None.
        """
        trip = finish(row, choose(row, logits), self.stop_ids)
        if trip:  # an unresolved malicious streak at the end: its tokens never pass
            self._trip(slots, b, row, trip)
            row.insert_forced()
        elif first_check and _first_check_applies(row, self.first_candidates, first_check[1]):
            row.prechecked = row.records[0]
            probe = first_check[0][self.first_candidates.index(row.records[0].id)]
            trip = row.safety.on_check(float(torch.sigmoid(self.model.safety_logits(probe[None]).float())), 1)
            if trip:  # as step 1 would: g_0 goes, the refusal starts in its place
                self._trip(slots, b, row, trip)
                return self._advance(slots, b, row, None, True)
            checked = True
        if row.ending and not needs_final_check(row):  # the prefill's check cleared the end
            return self._end(slots, b, row)
        return release(row, checked)

    def _end(self, slots: _Slots, b: int, row: RowState) -> StepEvent | None:
        """End a `RowState.ending` row once its final check ran (a malicious streak it leaves
        open is an end trip, `SafetyState.on_finish`); release everything."""
        row.finish_reason, row.ending = row.ending, None
        trip = row.safety.on_finish()
        if trip:
            self._trip(slots, b, row, trip)
            row.insert_forced()
        return release(row, True)


def _first_window(row: RowState) -> tuple[int, int] | None:
    """The window of the check at ``g_0`` if this fresh row speculates on it (`first_check`),
    else None: safety on, an action that holds tokens (``monitor`` releases at once), no
    ``update_cls`` (the probe's K/V would have to replace ``[CLS]``), and a check due at one
    generated token."""
    p = row.req.safety
    if not p.enabled or p.action == Action.MONITOR or p.update_cls or row.records:
        return None
    return row.safety.window(1) if row.safety.needs_check(1) else None


def _first_check_applies(row: RowState, candidates: tuple[int, ...], window: tuple[int, int]) -> bool:
    """Whether the sampled ``g_0`` has a speculative verdict that is the check step 1 would run:
    ``g_0`` a candidate, not forced (a refusal after the query verdict), the response going on,
    and the window the same (the query verdict can switch it to rule 1)."""
    rec = row.records[0] if row.n_generated == 1 else None
    return (rec is not None and not rec.forced and rec.id in candidates and row.finish_reason is None
            and row.safety.needs_check(1) and row.safety.window(1) == window)
