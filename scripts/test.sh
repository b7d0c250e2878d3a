#!/usr/bin/env bash
# Set up everything the tests need (Debian packages too, when run as root) and run the whole
# suite: lint, type check, the import contract and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "== ruff";   .venv/bin/ruff check .
echo "== mypy";   .venv/bin/mypy
echo "== lint-imports"; .venv/bin/lint-imports  # the layers in pyproject.toml, run from the repo root
echo "== pytest (index on SQLite)"; .venv/bin/python -m pytest -q "$@"
# The suite again with every index in PostgreSQL (a throw-away cluster from Debian's
# postgresql package, tests/pg_server.py), leaving out the modules that never touch the index
# (pure de-identification, rules on datasets, DICOM parsing): they ran above already.
NO_INDEX=(architecture audit deid deid_iod deid_pixels deid_verify deid_gate_corpus deid_overlays
  deid_rawclean deid_video dicom_dataset header metrics redcap_client redcap_contract synth
  transfer_files transport)
IGNORE=()
for name in "${NO_INDEX[@]}"; do IGNORE+=("--ignore=tests/test_${name}.py"); done
echo "== pytest (index on PostgreSQL)"
FIONA_TEST_INDEX=postgresql .venv/bin/python -m pytest -q "${IGNORE[@]}" "$@"
