"""Generation cache: one JSON line per (system, set, request), appended as batches finish, so an
interrupted ``ess eval`` resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

CACHE_FILE = "generations.jsonl"


def record_key(system_digest: str, case_key: str, max_new_tokens: int) -> str:
    """Cache key of one generation (the system's digest already covers model and policy)."""
    return f"{system_digest}:{case_key}:{max_new_tokens}"


class Cache:
    """Records by key, loaded from and appended to ``<output>/generations.jsonl``.

    A truncated last line (a run killed mid-write) is skipped, not an error.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / CACHE_FILE
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.records[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, records: list[dict]) -> None:
        """Store ``records`` (each has ``key``) and append them to the file at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for rec in records:
                self.records[rec["key"]] = rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
