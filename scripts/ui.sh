#!/usr/bin/env bash
# Browse every run in the MLflow UI, bound to 127.0.0.1, opened on the experiment's runs table.
#   bash scripts/ui.sh                              # the store at sqlite:///mlflow.db (or MLFLOW_TRACKING_URI)
#   bash scripts/ui.sh --experiment fashion_mnist --port 5001
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m prunegrid.ui "$@"
