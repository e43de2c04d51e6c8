#!/usr/bin/env bash
# Install sealedtorch into ./.venv (created if missing) and run the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[vision,demo]'
.venv/bin/sealedtorch demo "$@"
