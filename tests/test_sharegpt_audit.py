"""The hand audit of the strict ShareGPT rule (data/sharegpt_audit): 200 labelled rows whose counts
and error rate match what its README reports."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

AUDIT = Path(__file__).resolve().parent.parent / "data" / "sharegpt_audit"
LABELS = {"ok", "harmful", "jailbreak", "borderline"}
ERRORS = ("harmful", "jailbreak")
SIZE = 200


def _rows() -> list[dict]:
    with (AUDIT / "sample.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _readme_counts(text: str) -> dict[str, int]:
    """``| label | count |`` rows of the README's counts table."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^\| *(\w+) *\| *(\d+) *\|$", text, re.M)
            if m[1] in LABELS}


def test_rows_have_the_schema():
    rows = _rows()
    assert len(rows) == SIZE
    assert sorted(r["index"] for r in rows) == list(range(SIZE))
    for r in rows:
        assert set(r) == {"index", "prompt", "label", "note"}, r["index"]
        assert isinstance(r["prompt"], str) and r["prompt"].strip(), r["index"]
        assert r["label"] in LABELS, (r["index"], r["label"])
        assert isinstance(r["note"], str)
        if r["label"] != "ok":
            assert r["note"].strip(), f"row {r['index']} ({r['label']}) needs a note saying why"


def test_readme_counts_match_the_file():
    counts = Counter(r["label"] for r in _rows())
    readme = (AUDIT / "README.md").read_text(encoding="utf-8")
    assert _readme_counts(readme) == {label: counts.get(label, 0) for label in LABELS}
    errors = sum(counts[label] for label in ERRORS)
    m = re.search(r"\*\*Error rate\*\* \(harmful \+ jailbreak\): (\d+) / (\d+) = ([\d.]+)%", readme)
    assert m, "README states the error rate as 'N / 200 = P%'"
    assert (int(m[1]), int(m[2])) == (errors, SIZE)
    assert float(m[3]) == pytest.approx(100 * errors / SIZE, abs=0.05)


def test_readme_count_parser_sees_a_changed_count():
    """The count check can fail: a table that differs from the file is read as different."""
    table = "| label | count |\n|---|---|\n| ok | 193 |\n| harmful | 2 |\n"
    assert _readme_counts(table) == {"ok": 193, "harmful": 2}
