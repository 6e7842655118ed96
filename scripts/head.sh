#!/usr/bin/env bash
# The head node of a cluster: PostgreSQL (MLflow's backend store and Optuna's studies) and an MLflow
# tracking server on it, bound to 127.0.0.1 unless --host says otherwise.
#   eval "$(bash scripts/head.sh start)"          # start (idempotent); exports MLFLOW_TRACKING_URI, PRUNEGRID_OPTUNA_STORAGE
#   bash scripts/head.sh start --host 0.0.0.0 --artifacts /shared/mlartifacts   # for workers on other machines
#   bash scripts/head.sh status | env | stop
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m prunegrid.head "$@"
