#!/usr/bin/env bash
# Browse every run in the MLflow UI, bound to 127.0.0.1, opened on the experiment's runs table.
#   bash scripts/ui.sh                              # the store at sqlite:///mlflow.db (or MLFLOW_TRACKING_URI)
#   bash scripts/ui.sh --experiment fashion_mnist --port 5001
# Uses the project's .venv when there is one (bash scripts/setup.sh), else the python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
exec python -m prunegrid.ui "$@"
