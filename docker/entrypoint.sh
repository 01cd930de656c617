#!/bin/sh
# Container entrypoint of the weekly-etl image. The first argument picks what the container does:
#   worker [prefect worker start options]   poll a work pool (default pool: $WEEKLY_ETL_POOL)
#   weekly [flow options]                   one run of the weekly flow now (python -m flows.weekly)
#   setup  [setup options]                  idempotent server setup (python -m flows.setup)
#   anything else                           executed as is; this is how the Docker and ACI workers start a
#                                           deployment's flow run (`prefect flow-run execute ...`)
set -eu

cmd="${1:-worker}"
[ "$#" -gt 0 ] && shift

case "$cmd" in
  worker)
    exec prefect worker start --pool "${WEEKLY_ETL_POOL:-weekly-etl-process}" "$@"
    ;;
  weekly)
    exec python -m flows.weekly "$@"
    ;;
  setup)
    exec python -m flows.setup "$@"
    ;;
  *)
    exec "$cmd" "$@"
    ;;
esac
