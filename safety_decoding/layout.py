"""The slot layout of a sequence: the one place that decides which slot holds ``[CLS]``, which
slots are query, which rows read ``[CLS]``, and where the response and the probes sit.

Training (joint SFT), decoding (prefill, and the re-prefill of a resumed request) and evaluation
(teacher-forced likelihood) all lay sequences out here and turn them into an attention mask with
`masks.strategic_attention_mask`, so the three cannot drift apart. One sequence is::

    slot      0      1 .. P          P+1 .. P+R        P+R+1 ..
    kind      CLS    TOKEN (prompt)  TOKEN (response)  PROBE ...
    position  0      1 .. P          P+1 .. P+R        0 ...

(docs/method.md, "The [CLS] token and the head": ``[CLS]`` at index 0, positions from 0; a
probe is a re-evaluation of ``[CLS]``, so it runs at ``[CLS]``'s position.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .masks import CLS, PAD, PROBE, TOKEN, strategic_attention_mask

CLS_SLOT = 0
"""Slot of ``[CLS]`` in an unpadded sequence."""

NOT_RESPONSE = -(1 << 30)
"""`SlotLayout.gen` of a slot that holds no response token (below any window's start)."""


def reads_cls_from(query_mask: Sequence[bool]) -> int:
    """First prompt index whose row attends to ``[CLS]``: the token after the last query token
    (0 when there is no query token).

    Our choice: the template tail ("<|im_end|>... assistant\\n") reads ``[CLS]`` as the response
    does, because its last row predicts the first response token; query and system rows keep
    plain causal attention, so the base model's prompt states are untouched.
    """
    return max((i for i, q in enumerate(query_mask) if q), default=-1) + 1


@dataclass(frozen=True)
class SlotLayout:
    """One sequence, slot by slot (every field has one entry per slot, length ``L``)."""

    ids: tuple[int, ...]
    """Token id of each slot; 0 at ``[CLS]`` and probe slots (their embedding is the
    ``[CLS]`` row, `model.SafetyModel.embed`)."""
    kinds: tuple[int, ...]
    """`masks` kind: ``CLS`` (``PAD`` when the safety signal is off), ``TOKEN``, ``PROBE``."""
    in_query: tuple[bool, ...]
    """User-query tokens: what ``[CLS]`` reads."""
    reads_cls: tuple[bool, ...]
    """Token rows that attend to ``[CLS]`` (from `reads_cls_from` on)."""
    positions: tuple[int, ...]
    """Rotary positions."""
    gen: tuple[int, ...]
    """Index of the response token a slot holds: ``0, 1, ...`` for generated tokens, ``-k .. -1``
    for the ``k`` tokens of a client's prefill, `NOT_RESPONSE` elsewhere (the decoder's probe
    windows and truncations address response tokens by this index)."""
    prompt_len: int
    """Prompt tokens (``[CLS]`` not counted)."""
    response_len: int

    def __len__(self) -> int:
        return len(self.ids)

    def prompt_slot(self, i: int) -> int:
        """Slot of prompt token ``i``."""
        return CLS_SLOT + 1 + i

    def response_slot(self, j: int) -> int:
        """Slot of response token ``j``."""
        return self.prompt_slot(self.prompt_len) + j

    @property
    def probe_slots(self) -> range:
        """Slots of the ``PROBE`` rows, after the response."""
        return range(self.response_slot(self.response_len), len(self))

    def with_probes(self, n: int) -> "SlotLayout":
        """This layout with ``n`` more ``PROBE`` slots at the end (position 0, like ``[CLS]``;
        no token row reads them, and they read no query unless their window says so)."""
        return replace(self, ids=self.ids + (0,) * n, kinds=self.kinds + (PROBE,) * n,
                       in_query=self.in_query + (False,) * n,
                       reads_cls=self.reads_cls + (False,) * n,
                       positions=self.positions + (0,) * n, gen=self.gen + (NOT_RESPONSE,) * n)


def sequence_layout(prompt_ids: Sequence[int], query_mask: Sequence[bool],
                    response_ids: Sequence[int] = (), *, cls: bool = True, tokens_read_cls: bool = True,
                    probes: int = 0, response_start: int | None = None) -> SlotLayout:
    """``[CLS]`` + prompt + response + ``probes`` probe slots.

    Args:
        prompt_ids, query_mask: the prompt's token ids and its user-query mask (same length;
            `prompt.Prompt` fields, or training's shortened copies).
        response_ids: response tokens that follow the prompt in the same forward (training's
            reference answer, evaluation's scored answer, a resumed request's generated tokens).
        cls: False lays the ``[CLS]`` slot out as ``PAD`` and no row reads it (the safety signal
            off: plain decoding with unchanged positions).
        tokens_read_cls: False: no token row reads ``[CLS]`` (`model.tokens_read_cls`).
        probes: ``PROBE`` slots to append (training's response-window probes; the caller gives
            each its window in the mask).
        response_start: first prompt index of a client's prefill (`prompt.Prompt.response_start`);
            its tokens get response indices ``-k .. -1`` so the decoder's probe windows read them,
            as training's windows do. None: no prefill.

    Raises:
        ValueError: ``query_mask`` and ``prompt_ids`` differ in length.
    """
    if len(query_mask) != len(prompt_ids):
        raise ValueError(f"query_mask has {len(query_mask)} entries for {len(prompt_ids)} prompt tokens")
    P, R = len(prompt_ids), len(response_ids)
    n = P + R
    start_response = P if response_start is None else response_start
    start = reads_cls_from(query_mask)
    return SlotLayout(
        ids=(0, *map(int, prompt_ids), *map(int, response_ids)),
        kinds=(CLS if cls else PAD,) + (TOKEN,) * n,
        in_query=(False, *map(bool, query_mask)) + (False,) * R,
        reads_cls=(False,) + tuple(cls and tokens_read_cls and i >= start for i in range(n)),
        positions=tuple(range(1 + n)),
        gen=(NOT_RESPONSE,) * (1 + start_response) + tuple(range(start_response - P, R)),
        prompt_len=P, response_len=R).with_probes(probes)


@dataclass(frozen=True)
class SlotBatch:
    """Padded layouts as ``(B, L)`` CPU tensors; padding is ``PAD`` (never attended), id 0,
    position 0, gen `NOT_RESPONSE`."""

    ids: torch.Tensor
    kinds: torch.Tensor
    in_query: torch.Tensor
    reads_cls: torch.Tensor
    positions: torch.Tensor
    gen: torch.Tensor
    offsets: tuple[int, ...]
    """Padding columns before each row: its ``[CLS]`` slot is ``CLS_SLOT + offset``."""

    def mask(self, window: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 1, L, L)`` bool strategic-attention mask of every slot as a row.

        Args:
            window: ``(B, L, L)`` bool or None, the slots each probe row may read besides the
                query (`masks.strategic_attention_mask`'s ``row_window``).
        """
        B, L = self.kinds.shape
        return strategic_attention_mask(self.kinds, self.in_query, torch.arange(L).expand(B, L),
                                        self.reads_cls, window)


def round_up(n: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is at least ``n``."""
    return -(-n // multiple) * multiple


def stack_layouts(layouts: Sequence[SlotLayout], left: bool = False, multiple_of: int = 1) -> SlotBatch:
    """Pad ``layouts`` to the longest, rounded up to a multiple of ``multiple_of``, and stack them.

    Args:
        left: pad on the left (the decoder: every row's next token lands in the same last
            column); else on the right (training and evaluation).
        multiple_of: columns of the stacked batch are a multiple of this (the decoder's
            `PREFILL_BUCKET`).
    """
    B, L = len(layouts), round_up(max(len(x) for x in layouts), multiple_of)
    ids = torch.zeros(B, L, dtype=torch.long)
    kinds = torch.full((B, L), PAD, dtype=torch.long)
    in_query = torch.zeros(B, L, dtype=torch.bool)
    reads = torch.zeros(B, L, dtype=torch.bool)
    pos = torch.zeros(B, L, dtype=torch.long)
    gen = torch.full((B, L), NOT_RESPONSE, dtype=torch.long)
    offsets = []
    for b, x in enumerate(layouts):
        o = L - len(x) if left else 0
        cols = slice(o, o + len(x))
        ids[b, cols] = torch.tensor(x.ids)
        kinds[b, cols] = torch.tensor(x.kinds)
        in_query[b, cols] = torch.tensor(x.in_query)
        reads[b, cols] = torch.tensor(x.reads_cls)
        pos[b, cols] = torch.tensor(x.positions)
        gen[b, cols] = torch.tensor(x.gen)
        offsets.append(o)
    return SlotBatch(ids, kinds, in_query, reads, pos, gen, tuple(offsets))
