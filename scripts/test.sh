#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: installs what it needs, starts what it needs.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh dev

# pyodbc talks to the real PostgreSQL through Debian's ODBC driver.
if ! odbcinst -q -d 2>/dev/null | grep -q "PostgreSQL Unicode"; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unixodbc odbc-postgresql >/dev/null
  else
    echo "needs Debian packages unixodbc and odbc-postgresql: sudo apt-get install unixodbc odbc-postgresql" >&2
    exit 1
  fi
fi

# Azurite (Azure Blob emulator) for the lake tests, pinned by package-lock.json.
if [ ! -x node_modules/.bin/azurite-blob ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --silent
fi

# PostgreSQL on 127.0.0.1:5432: start the machine's cluster if it is down.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

.venv/bin/ruff format --check .
.venv/bin/ruff check .

set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
