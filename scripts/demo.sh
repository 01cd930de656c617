#!/usr/bin/env bash
# Run the weekly reverse ETL on embedded defaults: ephemeral Prefect, local lake, bundled demo API,
# Salesforce dry run. Extra arguments go to the flow (see: scripts/demo.sh --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh runtime
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
# The demo's Prefect state (ephemeral API database, Variables, cached task results) lives beside its lake and
# tracking database, so `rm -rf lake .data .prefect` resets the demo and it never mixes with ~/.prefect.
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
exec .venv/bin/python -m flows.weekly "$@"
