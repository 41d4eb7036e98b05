#!/usr/bin/env bash
# Install, prepare the base model (integration tests need it), run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ess prepare
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
