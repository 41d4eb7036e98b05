"""The decode loop: prefill with ``[CLS]`` at slot 0, then one forward per step over
``[token, CLS-probe?]`` rows, the policy verdict, token selection, stops and release.

Written batch-first (``B`` rows, left-padded prefill) so batching does not fork the code path:
`DecodeBatch` is the running batch that requests join and leave at step boundaries (continuous
batching) and `Decoder.generate` drives one for a fixed list. Neither does I/O. The KV cache
is a `kv_cache.SlotCache` (written in place); the probe's slot is dropped after each step (method.md decision 1), and a
truncation back to S_t marks the dropped slots ``PAD`` instead of rewriting the cache, so rows
of one batch never need the same length.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .attention import use_ess_attention
from .kv_cache import SlotCache
from .masks import CLS, PAD, PROBE, TOKEN, strategic_attention_mask
from .model import SafetyModel
from .policy import SafetyParams, SafetyState, Trip
from .prompt import Prompt
from .sampling import SamplingParams, logits_processors, make_generator, select_token
from .text import IncrementalDetokenizer, StopStringBuffer

# Finish reasons (TGI's names; the OpenAI layer maps eos_token/stop_sequence to "stop").
LENGTH, EOS, STOP_SEQUENCE, ABORT = "length", "eos_token", "stop_sequence", "abort"


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
    finish_reason: str | None = None
    safety: dict | None = None
    """The `SafetyState.summary` object, on the finishing event only."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    checked: bool = False
    """This step ran a ``[CLS]`` re-check for the request (an event is sent even when the
    check released no token, so callers can time checked and unchecked steps apart)."""

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


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
                      torch.cat([torch.full((B, width), -1, dtype=torch.long), self.gen], 1))


@dataclass
class _Row:
    id: int
    req: GenerationRequest
    state: SafetyState
    procs: object
    generator: torch.Generator
    detok: IncrementalDetokenizer
    stopbuf: StopStringBuffer
    prompt_len: int
    """``[CLS]`` + prompt (tokens)."""
    cls_slot: int = 0
    """Cache slot of this row's ``[CLS]`` (moves when the batch is padded or trimmed)."""
    gen: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    queue: deque = field(default_factory=deque)
    released: int = 0
    finish_reason: str | None = None


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
    """

    def __init__(self, decoder: "Decoder"):
        self.decoder = decoder
        self.rows: list[_Row] = []
        self.cache: SlotCache | None = None
        self.slots: _Slots | None = None
        self._next_id = 0

    def __len__(self) -> int:
        """Running rows."""
        return len(self.rows)

    @property
    def num_slots(self) -> int:
        """KV-cache length of the batch (slots per row, padding included)."""
        return 0 if self.slots is None else self.slots.kind.shape[1]

    @torch.inference_mode()
    def add(self, requests: list[GenerationRequest]) -> tuple[list[int], list[StepEvent]]:
        """Prefill ``requests`` and join them to the batch.

        Returns:
            The id of each request (`StepEvent.index` of its events) and the prefill events
            (the first token of each request, or its end).
        """
        d, model, B = self.decoder, self.decoder.model, len(requests)
        rows = []
        for r in requests:
            rows.append(_Row(self._next_id, r, SafetyState(r.safety), logits_processors(r.sampling),
                             make_generator(r.sampling), IncrementalDetokenizer(d.tok),
                             StopStringBuffer(r.sampling.stop), 1 + len(r.prompt.ids)))
            self._next_id += 1
        if not rows:
            return [], []
        # [PAD..., CLS, prompt] per row, left-padded
        P = max(r.prompt_len for r in rows)
        ids = torch.zeros(B, P, dtype=torch.long)
        kind = torch.full((B, P), PAD, dtype=torch.long)
        in_query = torch.zeros(B, P, dtype=torch.bool)
        reads = torch.zeros(B, P, dtype=torch.bool)
        pos = torch.zeros(B, P, dtype=torch.long)
        for b, row in enumerate(rows):
            p, o = row.req.prompt, P - row.prompt_len
            on = row.req.safety.enabled
            row.cls_slot = o
            ids[b, o + 1:] = torch.tensor(p.ids)
            kind[b, o] = CLS if on else PAD
            kind[b, o + 1:] = TOKEN
            in_query[b, o + 1:] = torch.tensor(p.query_mask)
            reads[b, o + 1 + p.reads_cls_from:] = on
            pos[b, o:] = torch.arange(row.prompt_len)
        slots = _Slots(kind, in_query, torch.full((B, P), -1, dtype=torch.long))
        cache = SlotCache(model.decoder.config)
        mask = strategic_attention_mask(kind, in_query, torch.arange(P).expand(B, P), reads)
        dev = d.device  # bookkeeping stays on the CPU; the forward's inputs go to the model
        hidden, _ = model.hidden_states(ids.to(dev), kind.to(dev), pos.to(dev), mask.to(dev), cache)
        logits = model.lm_logits(hidden[:, -1]).float().cpu()
        cls = torch.tensor([r.cls_slot for r in rows], device=dev)
        scores = torch.sigmoid(model.safety_logits(hidden[torch.arange(B, device=dev), cls]).float()).cpu()
        events = []
        for b, row in enumerate(rows):
            if row.req.safety.enabled:
                trip = row.state.on_query(float(scores[b]))
                if trip:
                    row.queue.extend(d.refusal_ids(row.req.prompt.ids[-1] if row.req.prompt.ids else None))
            events.append(d._advance(slots, b, row, logits[b]))
        self._join(rows, cache, slots)
        self._leave()
        return [r.id for r in rows], [e for e in events if e]

    def _join(self, rows: list[_Row], cache: SlotCache, slots: _Slots) -> None:
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

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One decode step over every running row: ``[token, CLS-probe?]`` per row.

        Returns:
            The events of this step (rows that released nothing and ran no check send none).
        """
        if not self.rows:
            return []
        d, model, rows, slots, cache = self.decoder, self.decoder.model, self.rows, self.slots, self.cache
        B = len(rows)
        check = [r.state.needs_check(len(r.gen)) for r in rows]
        q = 2 if any(check) else 1
        kv = slots.kind.shape[1]
        step_ids = torch.zeros(B, q, dtype=torch.long)
        step_kind = torch.full((B, q), PAD, dtype=torch.long)
        step_pos = torch.zeros(B, q, dtype=torch.long)
        window = torch.zeros(B, q, kv + q, dtype=torch.bool)
        step_reads = torch.zeros(B, q, dtype=torch.bool)
        new_gen = torch.full((B, q), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row.gen)
            step_ids[b, 0] = row.gen[-1]
            step_kind[b, 0] = TOKEN
            step_pos[b, 0] = row.prompt_len + n - 1
            step_reads[b, 0] = row.req.safety.enabled
            new_gen[b, 0] = n - 1
            if check[b]:
                step_kind[b, 1] = PROBE
                lo, hi = row.state.window(n)
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
        slots = self.slots = _Slots(key_kind[:, :kv + 1], key_in_query[:, :kv + 1],
                                    torch.cat([slots.gen, new_gen[:, :1]], 1))
        logits = model.lm_logits(hidden[:, 0]).float().cpu()
        events = []
        for b, row in enumerate(rows):
            trip = row.state.on_check(float(probe_scores[b]), len(row.gen)) if check[b] else None
            if trip:
                d._truncate(slots, b, row, trip)
                events.append(d._advance(slots, b, row, None, check[b]))
            else:
                events.append(d._advance(slots, b, row, logits[b], check[b]))
        self._leave()
        return [e for e in events if e]


def _update_cls(cache: SlotCache, batch_rows: list[int], rows: list[_Row]) -> None:
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
    """Runs `GenerationRequest`s on a `SafetyModel` (one thread owns it; not thread-safe)."""

    def __init__(self, model: SafetyModel, tokenizer):
        self.model = model
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        use_ess_attention(model._causal_lm())  # probe steps: no K/V head copies (attention.py)
        self.refusal = model.config.refusal_prefix
        # EOS plus the document end token (SmolLM2's <|endoftext|> doubles as its unk token).
        ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        self.stop_ids = {i for i in ids if isinstance(i, int) and i >= 0}

    @classmethod
    def from_checkpoint(cls, checkpoint, base_dir, device: str = "cpu", dtype: str = "float32") -> "Decoder":
        """Load ``checkpoint`` on the prepared base model in ``base_dir`` (LoRA merged).

        Args:
            device, dtype: names as ``ESS_DEVICE`` / ``ESS_DTYPE`` take them (``auto`` included,
                see `device.resolve_device` / `device.resolve_dtype`).

        Raises:
            CheckpointError: see `model.load_safety_model`.
            ValueError: an unknown dtype, or CUDA asked for where there is none.
        """
        from transformers import AutoTokenizer

        from .device import resolve_device, resolve_dtype
        from .model import load_safety_model

        dev = resolve_device(device)
        model = load_safety_model(checkpoint, base_dir, dtype=resolve_dtype(dtype, dev)).to(dev)
        return cls(model, AutoTokenizer.from_pretrained(str(base_dir)))

    def refusal_ids(self, previous_id: int | None) -> list[int]:
        """Token ids of the refusal prefix, with a space when it follows a word."""
        before = self.tok.decode([previous_id]) if previous_id is not None else ""
        text = self.refusal if not before or before[-1].isspace() else " " + self.refusal
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def new_batch(self) -> DecodeBatch:
        """An empty running batch (continuous batching: `DecodeBatch.add` / `.step`)."""
        return DecodeBatch(self)

    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[StepEvent]]:
        """Decode ``requests`` together; yields the events of each step until all finish.

        ``StepEvent.index`` is the request's position in ``requests``.
        """
        batch = self.new_batch()
        yield batch.add(requests)[1]
        while batch:
            yield batch.step()

    # ---- per-row helpers -------------------------------------------------------------------

    def _truncate(self, slots: "_Slots", b: int, row: _Row, trip: Trip) -> None:
        """Drop ``g_{S_t}..`` from the response and the cache view, queue the refusal."""
        t = trip.truncate_to
        slots.kind[b, slots.gen[b] >= t] = PAD
        del row.gen[t:], row.logprobs[t:], row.forced[t:]
        assert row.released <= t, "a token covered by a failed check was released"
        previous = row.gen[-1] if row.gen else (row.req.prompt.ids[-1] if row.req.prompt.ids else None)
        row.queue.clear()
        row.queue.extend(self.refusal_ids(previous))

    def _advance(self, slots: "_Slots", b: int, row: _Row, logits: torch.Tensor | None,
                 checked: bool = False) -> StepEvent | None:
        """Append the next token (forced or selected), apply stops, release what passed."""
        sp = row.req.sampling
        if row.queue and (logits is None or not row.state.steering):
            token = row.queue.popleft()
            lp = float(torch.log_softmax(logits.float(), -1)[token]) if logits is not None else 0.0
            row.gen.append(token), row.logprobs.append(lp), row.forced.append(True)
        else:
            # Only the repetition penalty reads the history: skip building it otherwise.
            history = (torch.tensor(list(row.req.prompt.ids) + row.gen, dtype=torch.long)
                       if row.procs else None)
            if row.queue:  # reweight: steer toward the next refusal-prefix token
                logits = logits.clone()
                logits[row.queue[0]] += row.state.steer_bias
            token, lp = select_token(logits, history, sp, row.procs, row.generator)
            if row.queue:  # following the prefix keeps steering; any other token ends it
                if token == row.queue[0]:
                    row.queue.popleft()
                else:
                    row.queue.clear()
            if token in self.stop_ids and not sp.ignore_eos:
                row.finish_reason = EOS
            else:
                row.gen.append(token), row.logprobs.append(lp), row.forced.append(False)
        if row.finish_reason is None and len(row.gen) >= sp.max_new_tokens:
            row.finish_reason = LENGTH
        if row.finish_reason is None and row.req.cancelled():
            row.finish_reason = ABORT
        if row.finish_reason in (EOS, LENGTH):
            trip = row.state.on_finish()
            if trip:  # an unresolved malicious streak: its tokens never pass
                self._truncate(slots, b, row, trip)
                while row.queue:
                    row.gen.append(row.queue.popleft()), row.logprobs.append(0.0), row.forced.append(True)
        limit = len(row.gen) if row.finish_reason in (EOS, LENGTH) else row.state.releasable(len(row.gen))
        tokens = []
        while row.released < limit and row.finish_reason != STOP_SEQUENCE:
            i = row.released
            text, matched = row.stopbuf.push(row.detok.push(row.gen[i]))
            row.released += 1
            tokens.append(TokenOutput(row.gen[i], text, row.logprobs[i], row.forced[i]))
            if matched:
                row.finish_reason = STOP_SEQUENCE
        if row.finish_reason in (EOS, LENGTH):
            tail = row.stopbuf.flush()
            if tail:
                if tokens:
                    last = tokens[-1]
                    tokens[-1] = TokenOutput(last.id, last.text + tail, last.logprob, last.forced)
                else:
                    tokens.append(TokenOutput(row.gen[-1], tail, 0.0, False))
        if not tokens and row.finish_reason is None and not checked:
            return None
        done = row.finish_reason is not None
        return StepEvent(row.id, tokens, row.finish_reason, row.state.summary(row.req.trace) if done else None,
                         prompt_tokens=len(row.req.prompt.ids),
                         generated_tokens=row.released if done else 0, checked=checked)
