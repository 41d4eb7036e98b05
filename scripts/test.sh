#!/usr/bin/env bash
# Install (Prometheus too: tests/deploy), prepare the base model (integration tests need it),
# fetch the safety data into the cache (the data tests read it: tests/conftest.py DATA_DIR),
# run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/deploy-test-deps.sh
.venv/bin/ess prepare
if [ -d ../shared/data ]; then
  .venv/bin/ess data fetch --from ../shared/data
else
  .venv/bin/ess data fetch || echo "test.sh: no safety data; the tests that need it skip" >&2
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
