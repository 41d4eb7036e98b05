#!/usr/bin/env bash
# Main job: install, prepare the base model if missing, serve the shipped checkpoint on :8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/ess serve --host "${ESS_HOST:-127.0.0.1}" --port "${ESS_PORT:-8000}" "$@"
