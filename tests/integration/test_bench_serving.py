"""`ess bench serving` (a small load) on the shipped checkpoint writes the JSON other tools read."""

import json

import pytest

from ess.cli import main

pytestmark = pytest.mark.integration


def test_serving_benchmark_json(tmp_path):
    out = tmp_path / "serving.json"
    assert main(["bench", "serving", "--concurrency", "1", "2", "--schedules", "each",
                 "--max-output", "6", "--min-requests", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {(r["system"], r["safety"]) for r in results} == {
        ("ess", True), ("ess", False), ("hf_generate", False)}
    assert sorted({r["concurrency"] for r in results}) == [1, 2]
    for r in results:
        assert {"system", "concurrency", "safety", "output_tokens_per_second", "ttft_p50_seconds",
                "ttft_p99_seconds", "tpot_p50_seconds", "scaling_vs_concurrency_1"} <= set(r)
        assert r["output_tokens_per_second"] > 0 and r["ttft_p50_seconds"] > 0
        assert r["requests"] == max(2, 2 * r["concurrency"])
        assert 4 * r["requests"] <= r["output_tokens"] <= 6 * r["requests"]  # ignore_eos
