#!/usr/bin/env bash
# Set up everything the tests need (Debian packages too, when run as root) and run the whole
# suite: lint, type check and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "== ruff";   .venv/bin/ruff check .
echo "== mypy";   .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest -q "$@"
