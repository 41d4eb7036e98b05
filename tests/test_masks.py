import torch

from safety_decoding.masks import CLS, PAD, PROBE, TOKEN, strategic_attention_mask


def _mask(kinds, query, reads, window=None):
    kinds = torch.tensor([kinds])
    L = kinds.shape[1]
    win = None
    if window is not None:
        win = torch.zeros(1, L, L, dtype=torch.bool)
        for row, cols in window.items():
            win[0, row, cols] = True
    return strategic_attention_mask(kinds, torch.tensor([query]), torch.arange(L).expand(1, L),
                                    torch.tensor([reads]), win)[0, 0]


# slots: 0 CLS | 1 template | 2,3 query | 4 template tail | 5,6 response | 7 probe | 8 pad
KINDS = [CLS, TOKEN, TOKEN, TOKEN, TOKEN, TOKEN, TOKEN, PROBE, PAD]
QUERY = [False, False, True, True, False, False, False, False, False]
READS = [False, False, False, False, True, True, True, False, False]


def test_cls_reads_only_itself_and_query():
    m = _mask(KINDS, QUERY, READS)
    assert m[0].nonzero().flatten().tolist() == [0, 2, 3]  # non-causal row, query only (rule 4)


def test_query_and_template_rows_do_not_read_cls():
    m = _mask(KINDS, QUERY, READS)
    for row in (1, 2, 3):
        assert not m[row, 0]
        assert m[row, 1:row + 1].all() and not m[row, row + 1:].any()


def test_response_rows_read_cls_and_are_causal():
    m = _mask(KINDS, QUERY, READS)
    assert m[5, 0] and m[6, 0] and m[4, 0]
    assert m[5, :6].all() and not m[5, 6:].any()


def test_nobody_reads_probe_or_pad():
    m = _mask(KINDS, QUERY, READS)
    assert not m[:7, 7].any() and not m[:8, 8].any()


def test_probe_reads_query_plus_window_not_cls_slot():
    m = _mask(KINDS, QUERY, READS, window={7: [5, 6]})
    assert m[7].nonzero().flatten().tolist() == [2, 3, 5, 6, 7]


def test_window_never_exposes_pad_or_template_to_the_probe():
    m = _mask(KINDS, QUERY, READS, window={7: [0, 8]})  # CLS slot and PAD in the window
    assert m[7].nonzero().flatten().tolist() == [2, 3, 7]


def test_pad_row_sees_only_itself():
    m = _mask(KINDS, QUERY, READS)
    assert m[8].nonzero().flatten().tolist() == [8]
