#!/usr/bin/env bash
# Run prefect.yaml's deployments on this machine: create the `visiontune` process work pool if
# it is missing, register the deployments, and start a process worker in the foreground (Ctrl-C
# stops it). Needs PREFECT_API_URL (infra/prefect-server.sh prints it).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-.venv/bin/prefect}
POOL=${PREFECT_WORK_POOL:-visiontune}
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api (make prefect-server)}"
"$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1 || "$PREFECT" work-pool create "$POOL" --type process
"$PREFECT" --no-prompt deploy --all
exec "$PREFECT" worker start --pool "$POOL"
