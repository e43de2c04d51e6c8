#!/usr/bin/env bash
# Install sealedtorch with its test extras into ./.venv (created if missing), lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[vision,test,real-model]'
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -q "$@"
