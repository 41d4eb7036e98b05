"""benchmarks/peer.py: the ratios its table reports (the run itself needs llama.cpp: `ess bench peer`)."""

from benchmarks.peer import add_ratios, add_ttft_ratios, precision_name


def _row(system, precision, concurrency, tok_s, ttft=0.5):
    return {"system": system, "precision": precision, "safety": None, "concurrency": concurrency,
            "output_tokens_per_second": tok_s, "ttft_p50_seconds": ttft}


def test_ratios_are_taken_at_the_same_concurrency_and_missing_references_give_none():
    rows = [_row("llama.cpp", "bf16", 1, 20.0), _row("llama.cpp", "bf16", 8, 50.0),
            _row("ess", "float32", 1, 10.0), _row("ess", "float32", 8, 60.0), _row("ess", "float32", 16, 70.0)]
    add_ratios(rows)
    assert [r["x_llama"] for r in rows] == [1.0, 1.0, 0.5, 1.2, None]
    assert all(r["x_llama_q8_0"] is None for r in rows)


def test_ttft_over_prefill_uses_the_prefill_of_the_rows_own_weights_at_concurrency_1_only():
    rows = [_row("ess", "float32", 1, 10.0, ttft=0.3), _row("ess", "float32+int8", 1, 12.0, ttft=0.3),
            _row("ess", "float32+int8", 8, 40.0, ttft=2.0), _row("llama.cpp", "bf16", 1, 20.0, ttft=0.3)]
    add_ttft_ratios(rows, {"float32": 0.25, "float32+int8": 0.2})
    assert [r.get("ttft_over_prefill") for r in rows] == [1.2, 1.5, None, None]
    assert precision_name("float32", "none") == "float32"
    assert precision_name("float32", "int8") == "float32+int8"
