"""`ess bench overhead --quick` on the shipped checkpoint writes the JSON other tools read."""

import json

import pytest

from ess.cli import main

pytestmark = pytest.mark.integration


def test_quick_overhead_benchmark_json(tmp_path):
    out = tmp_path / "overhead.json"
    assert main(["bench", "overhead", "--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    systems = {r["system"] for r in results}
    assert systems == {"plain", "ess", "external_guard"}
    assert {r["schedule"] for r in results if r["system"] == "ess"} == {"each", "annealing", "periodic", "first"}
    assert {r["action"] for r in results if r["schedule"] == "each"} == {"refuse", "reweight", "monitor"}
    for r in results:
        assert {"system", "schedule", "action", "tokens_per_second", "overhead_ratio",
                "ttft_seconds", "peak_memory_bytes"} <= set(r)
        assert r["tokens_per_second"] > 0 and r["overhead_ratio"] > 0
    assert next(r for r in results if r["system"] == "plain")["overhead_ratio"] == 1.0
