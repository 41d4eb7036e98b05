"""The speculative first check: the re-check of the first response token, run inside the prefill.

A token is released only after a passing check covers it (docs/method.md, "Decision 2"), and
the check that covers ``g_0`` needs ``g_0``'s K/V, so without this the first token waits for the
first decode step: time to first token is prefill plus one decode step (at concurrency 1 on 2
CPU cores, 44 ms of prefill plus a 24 ms step). ``g_0`` is not known before the prefill's
logits, but a chat model opens most answers with one of a few tokens ("Sure", "To", "The", ...).
So the prefill carries, after each sequence's prompt, ``k`` candidate first tokens (`TOKEN`
slots at ``g_0``'s position, each reading the prompt and itself, never another candidate) and
one probe per candidate (reading the query and the window rule 2 gives at one generated token,
with its candidate as ``g_0``). When the sampled ``g_0`` is a candidate, its probe's verdict is
the check of ``g_0``: the same inputs, positions and mask as the first decode step's probe, so
the same function (in float32 the same values; where a kernel depends on the rows of a call,
bfloat16 blocking or int8's per-call activation scale, a score moves in its last digits, as it
does between batch compositions). ``g_0`` then leaves with the prefill, and step 1 does not check it again. The
candidate slots are cropped from the cache after the forward, which then holds what a plain
prefill leaves. A miss costs nothing but the extra rows (``2k`` in a prefill of hundreds).

The candidates (`draft_candidates`) are the ``k`` tokens the model itself most expects first,
averaged over `DRAFT_PROMPTS`, 40 everyday requests of ours (no request a client sent: a list
learnt from traffic would let one client time what others were answered). With 16 of them the
shipped checkpoint's greedy first token is a candidate for 76 % of 200 ShareGPT prompts (a draw
other than the benchmarks' workload; 56 % with 8), and the 32 extra rows add about 1 ms to a
prefill of 300 tokens. Our choice, in the manner of speculative decoding's draft and verify;
``ESS_FIRST_CHECK_CANDIDATES`` sets ``k`` (0: off; unset: `default_candidates`).

That holds where a prefill's products are bound by reading the weights, so that a few more
columns cost next to nothing: bfloat16 on CPUs with AMX or AVX512-BF16, and GPUs. A CPU that
runs float32 (one without native bfloat16) pays for every column: on 2 AVX2-only cores the 32
rows cost about 32 prompt tokens' worth of prefill, 0.1-0.2 s, where a decode step takes about
75 ms, and the check made time to first token worse (`default_candidates`).
"""

from __future__ import annotations

import torch

from .layout import SlotBatch, sequence_layout, stack_layouts
from .masks import PAD, PROBE, TOKEN, strategic_attention_mask

DEFAULT_CANDIDATES = 16
"""Candidate first tokens per prefill where the check pays (`default_candidates`)."""


def default_candidates(dtype: torch.dtype) -> int:
    """``k`` when ``ESS_FIRST_CHECK_CANDIDATES`` is unset: `DEFAULT_CANDIDATES` for a model that
    computes in bfloat16 or float16, 0 (off) in float32.

    Our choice, measured: with bfloat16 on 2 cores with AMX the 32 extra rows add about 1 ms to a
    prefill and the check brought time to first token with ``each`` from 1.76x the prefill to
    1.15-1.32x (README, "Engine"). In float32 on 2 AVX2-only cores (session 21, compiled decode step,
    24 ShareGPT prompts of the peer workload, in process, second round): median time to first
    text 0.438 s with 16 candidates, 0.361 s with 4 and 0.374 s with none (over both rounds
    0.499 / 0.418 / 0.374 s; `benchmarks.first_check_ttft` repeats it:
    `benchmarks/results/first_check_ttft-s21-avx2.json`): every prompt then waits one decode
    step for its first token, and that step costs less than the extra rows. The dtype stands for the hardware here:
    `device.resolve_dtype`'s ``auto`` picks float32 exactly where bfloat16 is not native."""
    return DEFAULT_CANDIDATES if dtype in (torch.bfloat16, torch.float16) else 0

DRAFT_PROMPTS = (
    "What is the capital of Australia?",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
    "Can you explain how vaccines work?",
    "Give me three ideas for a birthday party.",
    "Translate 'good morning' into Spanish.",
    "Summarize the plot of a detective novel in two sentences.",
    "What are the health benefits of walking every day?",
    "Help me write an email asking for a day off.",
    "Explain the difference between weather and climate.",
    "Is it better to rent or to buy a house?",
    "List five fruits that are high in vitamin C.",
    "Why is the sky blue?",
    "Write a SQL query that counts the rows of a table.",
    "What should I pack for a weekend of hiking?",
    "Describe a good morning routine.",
    "How many legs does a spider have?",
    "Suggest a name for a coffee shop.",
    "What does an operating system do?",
    "Can you recommend a book about history?",
    "Tell me a fun fact about octopuses.",
    "How can I improve my handwriting?",
    "What is machine learning?",
    "Write a haiku about autumn leaves.",
    "Can you help me plan a trip to Italy?",
    "Do you know what a black hole is?",
    "Is it possible to learn a language in three months?",
    "Could you check my essay for grammar mistakes?",
    "Are tomatoes a fruit?",
    "Can you write code in JavaScript?",
    "Do you remember what we talked about?",
    "I need ideas for a science fair project.",
    "Please act as my English teacher.",
    "Tell me a bedtime story about a dragon.",
    "Write a letter to my landlord about a broken heater.",
    "Are you able to read a PDF?",
    "Can I use olive oil instead of butter when baking?",
    "Rewrite this sentence to sound more formal: we need the report soon.",
    "Who was the first person to walk on the moon?",
    "Should I learn Python or Java first?",
)
"""Everyday requests of ours that `draft_candidates` averages over (not from any data file)."""


def draft_candidates(model, tokenizer, k: int, prompts=DRAFT_PROMPTS) -> tuple[int, ...]:
    """The ``k`` token ids with the highest mean first-token probability over ``prompts``
    (chat template, ``[CLS]`` on, as the server lays a request out). ``k`` 0: ``()``."""
    from .model import tokens_read_cls
    from .prompt import build_chat_prompt

    if k <= 0:
        return ()
    layouts = []
    for text in prompts:
        p = build_chat_prompt(tokenizer, [{"role": "user", "content": text}])
        layouts.append(sequence_layout(p.ids, p.query_mask, tokens_read_cls=tokens_read_cls(model.config)))
    batch = stack_layouts(layouts, left=True)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        hidden, _ = model.hidden_states(batch.ids.to(dev), batch.kinds.to(dev), batch.positions.to(dev),
                                        batch.mask().to(dev))
        probs = torch.softmax(model.lm_logits(hidden[:, -1]).float(), -1).mean(0).cpu()
    return tuple(int(i) for i in probs.topk(min(k, probs.numel())).indices)


def with_candidates(batch: SlotBatch, candidates: tuple[int, ...], positions: list[int],
                    windows: list[tuple[int, int] | None], reads_cls: list[bool]):
    """The prefill's inputs with ``k`` candidate slots and ``k`` probe slots after every row.

    Args:
        batch: the rows' left-padded layouts ``(B, L)``.
        candidates: ``k`` token ids.
        positions: per row, ``g_0``'s rotary position.
        windows: per row, the probe window ``[lo, hi)`` of the check at one generated token
            (`policy.SafetyState.window(1)`), or None: the row does not speculate (its extra
            slots are ``PAD``).
        reads_cls: per row, whether its response rows read ``[CLS]``.

    Returns:
        ``(ids, kinds, positions, mask)``: ``(B, L + 2k)`` and ``(B, 1, L + 2k, L + 2k)`` bool;
        candidate ``j`` sits at column ``L + j``, its probe at ``L + k + j``.
    """
    B, L = batch.kinds.shape
    k = len(candidates)
    on = torch.tensor([w is not None for w in windows])
    cand_kind = torch.where(on, TOKEN, PAD).unsqueeze(1).expand(B, k)
    probe_kind = torch.where(on, PROBE, PAD).unsqueeze(1).expand(B, k)
    kinds = torch.cat([batch.kinds, cand_kind, probe_kind], 1)
    ids = torch.cat([batch.ids, torch.tensor(candidates).expand(B, k), torch.zeros(B, k, dtype=torch.long)], 1)
    pos = torch.cat([batch.positions, torch.tensor(positions).unsqueeze(1).expand(B, k),
                     torch.zeros(B, k, dtype=torch.long)], 1)
    in_query = torch.cat([batch.in_query, torch.zeros(B, 2 * k, dtype=torch.bool)], 1)
    reads = torch.cat([batch.reads_cls, (torch.tensor(reads_cls) & on).unsqueeze(1).expand(B, k),
                       torch.zeros(B, k, dtype=torch.bool)], 1)
    window = torch.zeros(B, L + 2 * k, L + 2 * k, dtype=torch.bool)
    for b, w in enumerate(windows):
        if w is not None:  # a prefill's tokens in the window, then the probe's own candidate
            # (g_0 is in every window at one generated token; `decode._first_check_applies`
            # still compares the window with the one step 1 would use)
            window[b, L + k:, :L] = (batch.gen[b] >= w[0]) & (batch.gen[b] < min(w[1], 0))
            window[b, L + k + torch.arange(k), L + torch.arange(k)] = True
    rows = torch.arange(L + 2 * k).expand(B, -1)
    mask = strategic_attention_mask(kinds, in_query, rows, reads, window)
    cand = slice(L, L + k)
    mask[:, 0, cand, cand] = torch.eye(k, dtype=torch.bool)  # a candidate never reads another
    return ids, kinds, pos, mask
