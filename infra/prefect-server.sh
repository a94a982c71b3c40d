#!/usr/bin/env bash
# Start a local Prefect server for this project, bound to 127.0.0.1, with its own database under
# .prefect-server/; waits until /api/health answers, then prints the variable to export.
# Stop it with: kill -- -$(cat .prefect-server/pid)   (its whole process group)
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${PREFECT_SERVER_HOST:-127.0.0.1}
PORT=${PREFECT_SERVER_PORT:-4200}
DIR=${PREFECT_SERVER_DIR:-.prefect-server}
PREFECT=${PREFECT:-.venv/bin/prefect}
URL="http://$HOST:$PORT/api"
mkdir -p "$DIR"
if curl -sf "$URL/health" >/dev/null 2>&1; then
  echo "a Prefect server already answers at $URL"; exit 0
fi
PREFECT_HOME="$PWD/$DIR" PREFECT_SERVER_ANALYTICS_ENABLED=false \
  setsid "$PREFECT" server start --host "$HOST" --port "$PORT" >"$DIR/server.log" 2>&1 &
echo $! >"$DIR/pid"
for _ in $(seq 1 240); do
  if curl -sf "$URL/health" >/dev/null 2>&1; then
    echo "Prefect server at http://$HOST:$PORT (UI) (log: $DIR/server.log)"
    echo "use it:  export PREFECT_API_URL=$URL"
    exit 0
  fi
  sleep 0.5
done
echo "the Prefect server did not become healthy in 120 s; see $DIR/server.log" >&2
exit 1
