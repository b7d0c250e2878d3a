#!/usr/bin/env bash
# Set up everything the tests need (Debian packages too, when run as root) and run the whole
# suite: lint, type check, the import contract and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "== ruff";   .venv/bin/ruff check .
echo "== mypy";   .venv/bin/mypy
echo "== lint-imports"; .venv/bin/lint-imports  # the layers in pyproject.toml, run from the repo root
echo "== pytest"; .venv/bin/python -m pytest -q "$@"
