#!/usr/bin/env bash
# Start the team's MLflow tracking server: PostgreSQL backend store, artifacts proxied through the
# server (--serve-artifacts) into an S3-compatible bucket, bound to 127.0.0.1 unless MLFLOW_HOST
# says otherwise; waits until /health answers, then prints the variable to export.
# Settings come from the environment first, then from infra/.env (see infra/.env.example):
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB, or built from
#                                 POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET[/PREFIX], or s3://$MLFLOW_BUCKET
#   MLFLOW_S3_ENDPOINT_URL        the endpoint of MinIO, Ceph, SeaweedFS...; leave it unset for AWS S3
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   the bucket's keys, or MINIO_ROOT_USER, MINIO_ROOT_PASSWORD
#   MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (4), MLFLOW_SERVER_DIR (.mlflow-team-server)
# The URIs reach mlflow through its environment, so the password never shows in `ps`.
# Stop it with: kill -- -$(cat .mlflow-team-server/pid)   (its whole process group)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_FILE=${VISIONTUNE_ENV_FILE:-infra/.env}
if [[ -f $ENV_FILE ]]; then  # the file docker compose reads; variables already set win
  while IFS='=' read -r key value; do
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    [[ -n ${!key+set} ]] && continue
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
      value=${BASH_REMATCH[1]}
    else
      value=${value%%[[:space:]]#*}  # an inline comment, as docker compose reads it
      value=${value%"${value##*[![:space:]]}"}
    fi
    export "$key=$value"
  done <"$ENV_FILE"
fi
PYTHON=${PYTHON:-.venv/bin/python}
MLFLOW=${MLFLOW:-.venv/bin/mlflow}
export MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
export MLFLOW_PORT=${MLFLOW_PORT:-5000}
DIR=${MLFLOW_SERVER_DIR:-.mlflow-team-server}

if [[ -z ${MLFLOW_BACKEND_STORE_URI:-} && -n ${POSTGRES_USER:-} && -n ${POSTGRES_PASSWORD:-} ]]; then
  password=$("$PYTHON" -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://$POSTGRES_USER:$password@${POSTGRES_HOST:-127.0.0.1}:${POSTGRES_PORT:-5432}/${POSTGRES_DB:-mlflow}"
fi
# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; name psycopg2 unless psycopg 3 is there
if [[ ${MLFLOW_BACKEND_STORE_URI:-} == postgresql://* ]] && ! "$PYTHON" -c "import psycopg" 2>/dev/null; then
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${MLFLOW_BACKEND_STORE_URI#postgresql://}"
fi
if [[ -z ${MLFLOW_ARTIFACTS_DESTINATION:-} && -n ${MLFLOW_BUCKET:-} ]]; then
  MLFLOW_ARTIFACTS_DESTINATION="s3://$MLFLOW_BUCKET"
fi
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-${MINIO_ROOT_USER:-}}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-${MINIO_ROOT_PASSWORD:-}}
[[ -n $AWS_ACCESS_KEY_ID ]] || unset AWS_ACCESS_KEY_ID  # empty keys would hide an IAM role or ~/.aws
[[ -n $AWS_SECRET_ACCESS_KEY ]] || unset AWS_SECRET_ACCESS_KEY
[[ -n ${MLFLOW_S3_ENDPOINT_URL:-} ]] || unset MLFLOW_S3_ENDPOINT_URL  # empty: AWS S3 itself
if [[ -z ${MLFLOW_BACKEND_STORE_URI:-} || -z ${MLFLOW_ARTIFACTS_DESTINATION:-} ]]; then
  echo "set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB) or POSTGRES_USER and" \
    "POSTGRES_PASSWORD, and MLFLOW_ARTIFACTS_DESTINATION (s3://BUCKET/PREFIX) or MLFLOW_BUCKET," \
    "in the environment or in $ENV_FILE (see infra/.env.example)" >&2
  exit 2
fi
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
driver=psycopg2
[[ $MLFLOW_BACKEND_STORE_URI == postgresql+psycopg://* ]] && driver=psycopg
if ! "$PYTHON" -c "import $driver, boto3" 2>/dev/null; then
  echo "$driver (the PostgreSQL driver) or boto3 (the S3 client) is missing:" \
    "$PYTHON -m pip install psycopg2-binary boto3" >&2
  exit 2
fi

URL="http://$MLFLOW_HOST:$MLFLOW_PORT"
if curl -sf "$URL/health" >/dev/null 2>&1; then
  echo "a server already answers at $URL"; exit 0
fi
mkdir -p "$DIR"
# its own session: mlflow's workers outlive a SIGTERM sent to the server's PID alone
setsid "$MLFLOW" server --serve-artifacts >"$DIR/server.log" 2>&1 &
pid=$!
echo $pid >"$DIR/pid"
for _ in $(seq 1 240); do
  if curl -sf "$URL/health" >/dev/null 2>&1; then
    echo "MLflow tracking server at $URL: PostgreSQL store, artifacts in $MLFLOW_ARTIFACTS_DESTINATION" \
      "(log: $DIR/server.log)"
    echo "use it:  export MLFLOW_TRACKING_URI=$URL"
    exit 0
  fi
  if ! kill -0 $pid 2>/dev/null; then
    echo "the server exited; the end of $DIR/server.log:" >&2
    tail -n 20 "$DIR/server.log" | sed -E 's#(postgresql://[^:/@]*:)[^@]*@#\1***@#g' >&2
    exit 1
  fi
  sleep 0.5
done
echo "the server did not become healthy in 120 s; see $DIR/server.log" >&2
exit 1
