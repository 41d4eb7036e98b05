"""Strategic attention: the one place that turns the mask rules into a 4-D attention mask.

Training (joint SFT) and decoding (prefill and every decode step) both call
`strategic_attention_mask`, so the rules cannot drift apart. Every position in a sequence (a
KV-cache slot) has a kind:

- ``PAD``: padding or a slot that was truncated away; nobody attends to it.
- ``TOKEN``: an ordinary text token (template, query or response).
- ``CLS``: the ``[CLS]`` slot at index 0 of every sequence.
- ``PROBE``: a re-evaluation of ``[CLS]`` (a second query row in a decode step, or an extra
  training position for the response-window loss). No token row ever reads a probe.

Rules (docs/method.md, "Strategic attention mask"):

- A token row attends causally to earlier ``TOKEN`` slots, and to the ``CLS`` slot only when
  the row "reads CLS": the rows after the last query token (template tail and response). Query
  and system rows keep plain causal attention, so the base model's prompt states are untouched.
- A ``CLS`` / ``PROBE`` row attends to itself, to the query tokens, and to the extra
  window it is given (generated tokens chosen by the window rules); never to padding, BOS,
  template tokens, the ``CLS`` slot of another evaluation, or other probes (rule 4).
"""

from __future__ import annotations

import torch

PAD, TOKEN, CLS, PROBE = 0, 1, 2, 3


def strategic_attention_mask(
    key_kind: torch.Tensor,
    key_in_query: torch.Tensor,
    row_index: torch.Tensor,
    row_reads_cls: torch.Tensor,
    row_window: torch.Tensor | None = None,
) -> torch.Tensor:
    """Build the boolean attention mask for ``q`` query rows over ``kv`` key slots.

    Args:
        key_kind: ``(B, kv)`` int, one of ``PAD, TOKEN, CLS, PROBE`` per key slot. The rows
            being computed are themselves key slots (their K/V joins the cache), so their kinds
            are included.
        key_in_query: ``(B, kv)`` bool, True for user-query tokens.
        row_index: ``(B, q)`` long, the key slot of each query row (its causal horizon).
        row_reads_cls: ``(B, q)`` bool, token rows that may attend to the ``CLS`` slot.
        row_window: ``(B, q, kv)`` bool or None, extra slots visible to ``CLS``/``PROBE`` rows
            (the generated-token window of rules 1-3); ignored for token rows.

    Returns:
        ``(B, 1, q, kv)`` bool, True where attention is allowed. Every row allows at least
        its own slot, so softmax is always defined; a ``PAD`` row sees only itself.
    """
    B, kv = key_kind.shape
    slots = torch.arange(kv, device=key_kind.device)
    own = slots.view(1, 1, kv) == row_index.unsqueeze(-1)  # (B, q, kv)
    causal = slots.view(1, 1, kv) <= row_index.unsqueeze(-1)
    kind = key_kind.unsqueeze(1)  # (B, 1, kv)
    is_token_key = kind == TOKEN

    token_row = causal & (is_token_key | ((kind == CLS) & row_reads_cls.unsqueeze(-1)))

    cls_view = key_in_query.unsqueeze(1)
    if row_window is not None:
        cls_view = cls_view | row_window
    cls_row = own | (is_token_key & cls_view)

    row_kind = torch.gather(key_kind, 1, row_index)  # (B, q)
    row_is_cls = ((row_kind == CLS) | (row_kind == PROBE)).unsqueeze(-1)
    allowed = torch.where(row_is_cls, cls_row, token_row)
    allowed = torch.where((row_kind == PAD).unsqueeze(-1), own, allowed | own)
    return allowed.unsqueeze(1)

