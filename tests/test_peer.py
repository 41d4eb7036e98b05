"""benchmarks/peer.py: the ratios its table reports (the run itself needs llama.cpp: `ess bench peer`)."""

from benchmarks.peer import add_ratios, precision_name, ttft_floor


def _row(system, precision, concurrency, tok_s, ttft=0.5):
    return {"system": system, "precision": precision, "safety": None, "concurrency": concurrency,
            "output_tokens_per_second": tok_s, "ttft_p50_seconds": ttft}


def test_ratios_are_taken_at_the_same_concurrency_and_missing_references_give_none():
    rows = [_row("llama.cpp", "bf16", 1, 20.0), _row("llama.cpp", "bf16", 8, 50.0),
            _row("ess", "float32", 1, 10.0), _row("ess", "float32", 8, 60.0), _row("ess", "float32", 16, 70.0)]
    add_ratios(rows)
    assert [r["x_llama"] for r in rows] == [1.0, 1.0, 0.5, 1.2, None]
    assert all(r["x_llama_q8_0"] is None for r in rows)


def test_the_ttft_floor_is_timed_at_concurrency_1_only():
    timed = []

    def prefill():
        timed.append(1)
        return 0.25

    assert ttft_floor(1, {"ttft_p50_seconds": 0.3}, prefill) == {"prefill_p50_seconds": 0.25, "ttft_over_prefill": 1.2}
    assert ttft_floor(8, {"ttft_p50_seconds": 2.0}, prefill) == {}
    assert timed == [1]
    assert precision_name("float32", "none") == "float32"
    assert precision_name("float32", "int8") == "float32+int8"
