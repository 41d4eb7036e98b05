"""Shared set-up for benchmarks: load the shipped checkpoint and run batches of requests."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safety_training.datasets import default_data_dir

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = default_data_dir()  # filled by `ess data fetch`
CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-ess"


def load(checkpoint: Path = CHECKPOINT, dtype: str = "auto", quantization: str = "none", device: str = "cpu",
         compile: bool = False):
    """``(decoder, tokenizer)`` for the checkpoint on the prepared base model, on ``device`` in
    ``dtype`` (names as ``ESS_DEVICE`` / ``ESS_DTYPE`` take them; ``auto``: what ``ess serve``
    picks here, `safety_decoding.device`) with ``quantization`` (``ESS_QUANTIZATION``) and
    ``compile`` (``ESS_COMPILE``: one-row decode steps compiled on their first call)."""
    from safety_decoding.base_model import prepare_base_model
    from safety_decoding.decode import Decoder

    decoder = Decoder.from_checkpoint(checkpoint, prepare_base_model(log=lambda m: print(m, file=sys.stderr)),
                                      device=device, dtype=dtype, quantization=quantization,
                                      compile=compile)
    return decoder, decoder.tok


def timed_batch(decoder, batch: int, prompt_tokens: int, safety, steps: int):
    """``batch`` identical greedy ``ignore_eos`` requests (a prompt of about ``prompt_tokens``
    tokens) in one `DecodeBatch`, warmed up by 3 steps; returns ``(rows, ms per decode step over
    the next steps, prompt token count)``, with room left for ``steps`` more steps."""
    from safety_decoding.decode import GenerationRequest
    from safety_decoding.prompt import build_chat_prompt
    from safety_decoding.sampling import SamplingParams

    sentence = "Please explain the history of the printing press and its effect on Europe. "
    prompt = build_chat_prompt(decoder.tok, [{"role": "user", "content": sentence * max(1, prompt_tokens // 15)}])
    rows = decoder.new_batch()
    rows.add([GenerationRequest(prompt, SamplingParams(max_new_tokens=2 * steps + 8, ignore_eos=True), safety)
              for _ in range(batch)])
    for _ in range(3):  # warm-up
        rows.step()
    t = time.perf_counter()
    for _ in range(steps):
        rows.step()
    return rows, (time.perf_counter() - t) / steps * 1000, len(prompt.ids)


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


def shuffled(n: int, round_: int) -> list[int]:
    """Indices ``0..n-1`` in a seeded random order for round ``round_``, so that no
    configuration always runs after the same one (in `benchmarks.overhead` the guard's copy of
    the weights evicts what the caches hold of the model, and whatever runs next pays for it)."""
    return random.Random(round_).sample(range(n), n)


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def free_port() -> int:
    """A free localhost TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildServer:
    """An HTTP server in a child process on a free localhost port (``ess serve`` or a peer such
    as ``llama-server``), its log in a temporary file (a pipe nobody reads would fill up and
    block a long run).

    Args:
        argv: the command; ``{port}`` in any argument is replaced by the chosen port.
        env: added to this process's environment (``ESS_PORT`` is set to the port too).
        name: for messages.
        health: the path that answers 200 once the model is loaded.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, name: str = "server",
                 health: str = "/health"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name, self.health = name, health
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)
        full = {**os.environ, "ESS_HOST": "127.0.0.1", "ESS_PORT": str(self.port), **(env or {})}
        self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in argv], cwd=REPO,
                                     env=full, stdout=self.log, stderr=subprocess.STDOUT)

    @classmethod
    def ess(cls, env: dict[str, str] | None = None) -> "ChildServer":
        """``ess serve`` on the shipped checkpoint unless ``env`` or this process's environment
        names another (``ESS_CHECKPOINT``)."""
        return cls([sys.executable, "-m", "ess.cli", "serve"],
                   {"ESS_CHECKPOINT": os.environ.get("ESS_CHECKPOINT", str(CHECKPOINT)), **(env or {})},
                   name="ess-serve")

    def wait_ready(self, timeout: float = 900.0) -> None:
        """Poll ``health`` until 200. The default leaves room for ``ess serve``'s compiled warm-up
        (314 s on 2 AVX2-only cores, session 20; 300 s was too short there).

        Raises:
            RuntimeError: the process exited or did not become healthy in ``timeout`` seconds.
        """
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become healthy: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def peak_rss_bytes(self) -> int | None:
        """The process's peak resident memory (Linux ``VmHWM``), None where unreadable."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (``ess serve`` drains), then the exit status; killed after ``timeout`` s (None)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
