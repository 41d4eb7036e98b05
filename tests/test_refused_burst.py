"""`benchmarks.refused_burst`'s pure parts (the benchmark itself needs a server)."""

from benchmarks.refused_burst import NO_BURST, burst_texts, summarize


def test_every_burst_text_is_at_a_bound_and_one_kind_sends_none():
    texts = burst_texts(1000)
    assert texts[NO_BURST] is None
    assert len(texts["ASCII English"]) == 1000
    # the others are over the byte bound as sent (1000 bytes here), refused before any work
    assert all(len(t.encode()) > 1000 for k, t in texts.items() if k not in (NO_BURST, "ASCII English"))
    assert not all(t.isascii() for t in texts.values() if t)  # non-ASCII kinds: the costly path


def test_the_summary_is_medians_and_ratios_to_the_rounds_with_no_burst():
    rounds = {NO_BURST: [{"statuses": [], "wall_s": 5.0, "max_gap_s": 0.5},
                         {"statuses": [], "wall_s": 7.0, "max_gap_s": 0.7}],
              "x": [{"statuses": [422, 422], "wall_s": 12.0, "max_gap_s": 3.0},
                    {"statuses": [422], "wall_s": 12.0, "max_gap_s": 3.0}]}
    none, x = summarize(rounds)
    assert (none["wall_x"], none["max_gap_x"]) == (1.0, 1.0)
    assert x == {"burst": "x", "statuses": [422], "wall_s": 12.0, "wall_x": 2.0,
                 "max_gap_s": 3.0, "max_gap_x": 5.0}
