#!/usr/bin/env bash
# Idempotent: the system programs tests/deploy runs, from Debian's packages: prometheus and
# promtool (`prometheus`), and beside a docker client without the compose plugin, Compose v1
# (`docker-compose`) for `config`. Installs only what is missing; needs root and apt-get then.
set -euo pipefail
need=()
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  need+=(prometheus)
fi
if command -v docker >/dev/null && ! docker compose version >/dev/null 2>&1 \
    && ! command -v docker-compose >/dev/null; then
  need+=(docker-compose)
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "deploy-test-deps: missing ${need[*]}, which needs root and apt-get to install;" \
       "the tests in tests/deploy that use them will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# RUNLEVEL=1: invoke-rc.d must not start the packaged daemon on :9090; the tests start their own.
RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
