#!/usr/bin/env bash
# Create .venv and install the locked dependencies. Usage: scripts/bootstrap.sh [runtime|dev]
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-runtime}"
lock="requirements.lock"
[ "$profile" = "dev" ] && lock="requirements-dev.lock"

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
  "$python" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check uv
fi
# uv installs the exact versions of the lock file (and removes what is not in it).
.venv/bin/uv pip sync --quiet --python .venv/bin/python "$lock"
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .
