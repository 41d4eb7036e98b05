"""The one slot layout that training, decoding and evaluation share."""

import torch

from safety_decoding.layout import CLS_SLOT, NOT_RESPONSE, reads_cls_from, sequence_layout, stack_layouts
from safety_decoding.masks import CLS, PAD, PROBE, TOKEN
from safety_decoding.prompt import build_chat_prompt

# prompt: [sys, q, q, tail, tail]; response: [r0, r1]
PROMPT, QUERY, RESPONSE = (11, 12, 13, 14, 15), (False, True, True, False, False), (21, 22)


def test_cls_prompt_response_and_probes_take_their_slots():
    x = sequence_layout(PROMPT, QUERY, RESPONSE, probes=2)
    assert x.ids == (0, *PROMPT, *RESPONSE, 0, 0)
    assert x.kinds[CLS_SLOT] == CLS and x.kinds[1:8] == (TOKEN,) * 7 and x.kinds[8:] == (PROBE, PROBE)
    assert x.positions == (0, 1, 2, 3, 4, 5, 6, 7, 0, 0)  # probes run at [CLS]'s position
    assert x.in_query == (False, False, True, True, False, False, False, False, False, False)
    # rows after the last query token (template tail and response) read [CLS]; nothing else
    assert x.reads_cls == (False, False, False, False, True, True, True, True, False, False)
    N = NOT_RESPONSE
    assert x.gen == (N, N, N, N, N, N, 0, 1, N, N)
    assert [x.prompt_slot(i) for i in range(5)] == [1, 2, 3, 4, 5]
    assert [x.response_slot(j) for j in range(2)] == [6, 7] and list(x.probe_slots) == [8, 9]
    assert sequence_layout(PROMPT, QUERY, RESPONSE).with_probes(2) == x


def test_a_prefill_gets_negative_response_indices_before_g0():
    # prompt tokens 3 and 4 are a client's prefill: response tokens -2, -1, then g_0, g_1
    x = sequence_layout(PROMPT, QUERY, RESPONSE, response_start=3)
    N = NOT_RESPONSE
    assert x.gen == (N, N, N, N, -2, -1, 0, 1)


def test_safety_off_masks_the_cls_slot_and_nobody_reads_it():
    x = sequence_layout(PROMPT, QUERY, RESPONSE, cls=False)
    assert x.kinds[CLS_SLOT] == PAD and not any(x.reads_cls)
    assert x.positions == tuple(range(8))  # positions do not shift without [CLS]


def test_reads_cls_from_is_the_prompt_rule():
    assert reads_cls_from(QUERY) == 3 and reads_cls_from((False, False)) == 0


def test_padding_left_for_the_decoder_and_right_for_training():
    short, long = sequence_layout(PROMPT[:2], QUERY[:2]), sequence_layout(PROMPT, QUERY, RESPONSE)
    left = stack_layouts([short, long], left=True)
    assert left.offsets == (5, 0)
    assert left.kinds[0, :5].tolist() == [PAD] * 5 and left.kinds[0, 5] == CLS
    assert left.ids[0, 5:].tolist() == [0, 11, 12] and left.positions[0, 5:].tolist() == [0, 1, 2]
    right = stack_layouts([short, long])
    assert right.offsets == (0, 0) and right.kinds[0, 3:].tolist() == [PAD] * 5
    assert (right.gen[0, 3:] == NOT_RESPONSE).all() and not right.reads_cls[0, 3:].any()


def test_padding_rounds_the_columns_up_to_a_multiple():
    short, long = sequence_layout(PROMPT[:2], QUERY[:2]), sequence_layout(PROMPT, QUERY, RESPONSE)
    batch = stack_layouts([short, long], left=True, multiple_of=5)  # 3 and 8 slots
    assert batch.kinds.shape[1] == 10 and batch.offsets == (7, 2)
    assert batch.kinds[1, :2].tolist() == [PAD] * 2 and batch.kinds[1, 2] == CLS
    assert stack_layouts([long], left=True, multiple_of=8).kinds.shape[1] == 8


def test_mask_follows_the_layout(tokenizer):
    p = build_chat_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    x = sequence_layout(p.ids, p.query_mask, (5, 6), probes=1)
    batch = stack_layouts([x])
    window = torch.zeros(1, len(x), len(x), dtype=torch.bool)
    probe = x.probe_slots[0]
    window[0, probe, x.response_slot(0)] = True
    m = batch.mask(window)[0, 0]
    query = [s for s in range(len(x)) if x.in_query[s]]
    assert m[CLS_SLOT].nonzero().flatten().tolist() == [CLS_SLOT] + query  # [CLS] reads the query
    assert m[probe].nonzero().flatten().tolist() == query + [x.response_slot(0), probe]
    assert m[x.response_slot(1), CLS_SLOT] and not m[query[0], CLS_SLOT]
    assert not m[:probe, probe].any()  # no token row reads a probe
