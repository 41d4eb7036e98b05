"""Deployment tests: a real Prometheus on loopback, the docker/ and k8s files, the image's
entry command run outside a container.

Prometheus comes from Debian's `prometheus` package (scripts/deploy-test-deps.sh, which CI runs
as root); a test skips only where it is missing and cannot be installed (no root or no apt-get).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DEPS_SCRIPT = REPO / "scripts" / "deploy-test-deps.sh"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "ess-serve.json"

# The server tests' helpers (serve, SlowDecoder) live beside them, not in a package.
sys.path.insert(0, str(REPO / "tests" / "server"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_program(name: str) -> str:
    """Path of ``name`` (``prometheus`` or ``promtool``), installing Debian's `prometheus`
    package through scripts/deploy-test-deps.sh when it is missing and we are root.

    Skips the test only when it is missing and cannot be installed (not root, no apt-get).
    """
    path = shutil.which(name)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(DEPS_SCRIPT)], check=True, timeout=900)
        path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed and cannot be installed here (needs root and "
                    f"apt-get); scripts/deploy-test-deps.sh installs Debian's prometheus")
    return path


def ess_setting_names() -> set[str]:
    """Every ``ESS_*`` variable the server reads: the `Settings` fields, plus ESS_CACHE_DIR
    (safety_decoding.base_model.cache_dir)."""
    from server.settings import Settings

    return {"ESS_" + name.upper() for name in Settings.model_fields} | {"ESS_CACHE_DIR"}


def dashboard_queries(rate_window: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the Grafana dashboard, with Grafana's
    ``$__rate_interval`` replaced by ``rate_window``."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", rate_window))
            for p in dash["panels"] for t in p["targets"]]


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its own config and storage under ``workdir``.

    Args:
        binary: the ``prometheus`` program.
        workdir: a fresh folder (config, TSDB, log).
        targets: ``host:port`` addresses scraped every second as job ``ess``.
    """

    def __init__(self, binary: str, workdir: Path, targets: list[str]):
        self.binary, self.workdir = binary, workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "ess", "scrape_interval": "1s",
                                "scrape_timeout": "1s", "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets}]}]}))
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 60.0, tries: int = 3) -> None:
        """Start and wait for ``/-/ready``; a port taken in between is retried on another.

        Raises:
            RuntimeError: it exited or was not ready within ``timeout`` seconds (log attached).
        """
        for _ in range(tries):
            port = free_port()
            log = open(self.workdir / "prometheus.log", "w")
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            log_text = self.log()
            self.stop()
            if "address already in use" not in log_text:
                raise RuntimeError(f"prometheus did not become ready:\n{log_text[-3000:]}")
        raise RuntimeError(f"prometheus found no free port in {tries} tries")

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Terminate (then kill) the process we started; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def query(self, expr: str) -> list[dict]:
        """The instant vector of ``expr`` now (``[{"metric": {...}, "value": [t, "v"]}]``).

        Raises:
            AssertionError: Prometheus rejected the query (the message says why).
        """
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    def query_range(self, expr: str, seconds: float, step: float = 1.0) -> list[dict]:
        """The range vector of ``expr`` over the last ``seconds``
        (``[{"metric": {...}, "values": [[t, "v"], ...]}]``).

        Raises:
            AssertionError: Prometheus rejected the query.
        """
        end = time.time()
        r = httpx.get(self.url + "/api/v1/query_range", timeout=10,
                      params={"query": expr, "start": end - seconds, "end": end, "step": step})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def values(self, expr: str) -> list[float]:
        return [float(s["value"][1]) for s in self.query(expr)]

    def wait_for(self, expr: str, ok, timeout: float = 60.0) -> list[float]:
        """Poll ``expr`` until ``ok(values)`` holds; returns those values.

        Raises:
            AssertionError: still false after ``timeout`` seconds (last values shown).
        """
        deadline = time.monotonic() + timeout
        values: list[float] = []
        while time.monotonic() < deadline:
            values = self.values(expr)
            if ok(values):
                return values
            time.sleep(0.5)
        raise AssertionError(f"{expr} stayed at {values} for {timeout} s")


def finite(values: list[float]) -> bool:
    """At least one value, none NaN or infinite."""
    return bool(values) and all(math.isfinite(v) for v in values)


@contextmanager
def running_prometheus(workdir: Path, targets: list[str]):
    """`Prometheus` started on ``targets``; stopped on exit, whatever happened."""
    prom = Prometheus(system_program("prometheus"), workdir, targets)
    try:
        prom.start()
        yield prom
    finally:
        prom.stop()


# ---- Dockerfiles ----------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile in order: continuation lines joined, comments
    and parser directives dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions after the last FROM (the image that ships)."""
    steps = dockerfile_instructions(path)
    last = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last:]


def image_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    """ENV ``KEY=VALUE ...`` of these instructions, later ones winning (``$PATH`` kept as text)."""
    import shlex

    env = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(steps: list[tuple[str, str]], keyword: str) -> list[str]:
    """The JSON (exec) form of the last ``keyword`` (ENTRYPOINT, or HEALTHCHECK's CMD)."""
    (rest,) = [r for k, r in steps if k == keyword][-1:]
    if keyword == "HEALTHCHECK":
        rest = rest[rest.index("CMD ") + len("CMD "):]
    return json.loads(rest)


# ---- Ray Serve -----------------------------------------------------------------------------


def tiny_slow_decoder(delay: float = 0.02):
    """A `SlowDecoder` on the tiny random model (``delay`` seconds a step), built where it is
    called: a Ray replica imports this module by name (PYTHONPATH: the repository and
    tests/), so the factory pickles by reference."""
    from transformers import AutoTokenizer

    from conftest import ASSETS, tiny_safety_model

    from _server_helpers import SlowDecoder

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "smollm2-tokenizer"))
    return SlowDecoder(tiny_safety_model(tok), tok, delay=delay)
