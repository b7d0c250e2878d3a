#!/usr/bin/env bash
# Set up everything the tests need (Debian packages too, when run as root) and run the whole
# suite: lint, type check, the import contract and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "== ruff";   .venv/bin/ruff check .
echo "== mypy";   .venv/bin/mypy
echo "== lint-imports"; .venv/bin/lint-imports  # the layers in pyproject.toml, run from the repo root
# The suite again with every index in PostgreSQL (a throw-away cluster from Debian's
# postgresql package, tests/pg_server.py), leaving out the modules that never touch the index
# (pure de-identification, rules on datasets, DICOM parsing): the SQLite run covers them.
NO_INDEX=(architecture audit deid deid_iod deid_pixels deid_verify deid_gate_corpus deid_overlays
  deid_rawclean deid_video dicom_dataset header metrics redcap_client redcap_contract synth
  transfer_files transport)
IGNORE=()
for name in "${NO_INDEX[@]}"; do IGNORE+=("--ignore=tests/test_${name}.py"); done
# The two runs go side by side: each keeps about one core busy (the rest is waiting on peers),
# so together they take little longer than the longer one. The PostgreSQL run's output is
# printed when both have ended.
pg_log=$(mktemp)
FIONA_TEST_INDEX=postgresql .venv/bin/python -m pytest -q -p no:cacheprovider \
  "${IGNORE[@]}" "$@" >"$pg_log" 2>&1 &
pg_run=$!
echo "== pytest (index on SQLite; the PostgreSQL run goes on beside it)"
sqlite_status=0
.venv/bin/python -m pytest -q "$@" || sqlite_status=$?
pg_status=0
wait "$pg_run" || pg_status=$?
echo "== pytest (index on PostgreSQL)"
cat "$pg_log"
rm -f "$pg_log"
if [ "$sqlite_status" -ne 0 ] || [ "$pg_status" -ne 0 ]; then
  echo "pytest failed: SQLite run exit $sqlite_status, PostgreSQL run exit $pg_status"
  exit 1
fi
