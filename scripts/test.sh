#!/usr/bin/env bash
# Install (Prometheus too: tests/deploy), prepare the base model (integration tests need it),
# run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/deploy-test-deps.sh
.venv/bin/ess prepare
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
