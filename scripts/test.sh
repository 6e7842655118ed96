#!/usr/bin/env bash
# Set up (idempotent), then run the test suite without the slow tests. The browser tests drive
# Debian's Chromium with Playwright (Playwright's own browser download needs the internet), and the
# scale-out tests start Debian's PostgreSQL: both installed here when missing (as root, or through sudo).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then  # the scale-out tests start a PostgreSQL of their own
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q postgresql >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q postgresql >/dev/null; }
fi
export PRUNEGRID_REQUIRE_BROWSER=1
exec .venv/bin/python -m pytest -m "not slow" -q "$@"
