#!/usr/bin/env bash
# Run the comparison grid: restore the data (offline where possible), write params.yaml from
# conf/grid.yaml (every method in conf/prune/ joins), `dvc repro` (each cell prints which of how many
# it is and an ETA from the cells finished so far), and show reports/grid.md.
#   bash scripts/grid.sh                          # the default grid (laptop CPU)
#   bash scripts/grid.sh +experiment=paper_grid   # the papers' full grid (GPU)
#   bash scripts/grid.sh grid.seeds=[1,2,3]       # any override of conf/grid.yaml
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
python -m prunegrid.data.fetch
python -m prunegrid.grid "$@"
export PRUNEGRID_GRID_PROGRESS="$PWD/.dvc/tmp/prunegrid_progress.json"
mkdir -p .dvc/tmp
python -m prunegrid.progress init
dvc repro
cat reports/grid.md
