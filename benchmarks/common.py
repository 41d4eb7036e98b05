"""Shared set-up for benchmarks: load the shipped checkpoint and run batches of requests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safety_training.datasets import default_data_dir

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = default_data_dir()  # filled by `ess data fetch`
CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-ess"


def load(checkpoint: Path = CHECKPOINT, dtype: str = "auto"):
    """``(decoder, tokenizer)`` for the checkpoint on the prepared base model, on the CPU in
    ``dtype`` (``auto``: what ``ess serve`` picks here, `safety_decoding.device`)."""
    from safety_decoding.base_model import prepare_base_model
    from safety_decoding.decode import Decoder

    decoder = Decoder.from_checkpoint(checkpoint, prepare_base_model(log=lambda m: print(m, file=sys.stderr)),
                                      dtype=dtype)
    return decoder, decoder.tok


def run_batches(decoder, requests, batch_size: int = 16, desc: str = ""):
    """Run requests in length-sorted batches; returns ``(text, final_event)`` in input order."""
    from tqdm import tqdm

    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt.ids))
    out = [None] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, file=sys.stderr, mininterval=10):
        idx = order[start:start + batch_size]
        texts = {j: "" for j in range(len(idx))}
        for step in decoder.generate([requests[i] for i in idx]):
            for e in step:
                texts[e.index] += e.text
                if e.finish_reason:
                    out[idx[e.index]] = (texts[e.index], e)
    return out


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (benchmarks print one and write JSON)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
