#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the pinned CPU torch, then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
# The pinned CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
# test: every command's extra (train, eval, bench) and the test tools; ray: `ess serve --ray`.
python -m pip install --quiet --disable-pip-version-check -e '.[test,ray]'
