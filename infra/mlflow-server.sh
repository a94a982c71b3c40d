#!/usr/bin/env bash
# Start a real MLflow tracking server for this project: SQLite backend, proxied artifact storage
# (--serve-artifacts), bound to 127.0.0.1; waits until /health answers, then prints the variable
# to export. Stop it with: kill -- -$(cat .mlflow-server/pid)   (its whole process group)
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
DIR=${MLFLOW_SERVER_DIR:-.mlflow-server}
MLFLOW=${MLFLOW:-.venv/bin/mlflow}
mkdir -p "$DIR/artifacts"
if curl -sf "http://$HOST:$PORT/health" >/dev/null 2>&1; then
  echo "a server already answers at http://$HOST:$PORT"; exit 0
fi
# its own session: mlflow's job workers outlive a SIGTERM sent to the server's PID alone
setsid "$MLFLOW" server --host "$HOST" --port "$PORT" \
  --backend-store-uri "sqlite:///$PWD/$DIR/mlflow.db" \
  --artifacts-destination "$PWD/$DIR/artifacts" --serve-artifacts \
  >"$DIR/server.log" 2>&1 &
echo $! >"$DIR/pid"
for _ in $(seq 1 120); do
  if curl -sf "http://$HOST:$PORT/health" >/dev/null 2>&1; then
    echo "MLflow tracking server at http://$HOST:$PORT (log: $DIR/server.log)"
    echo "use it:  export MLFLOW_TRACKING_URI=http://$HOST:$PORT"
    exit 0
  fi
  sleep 0.5
done
echo "the server did not become healthy in 60 s; see $DIR/server.log" >&2
exit 1
