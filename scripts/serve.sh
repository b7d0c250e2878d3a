#!/usr/bin/env bash
# Set up and start `fiona serve` on the embedded defaults: AE title FIONA, port 11112 on
# 127.0.0.1 (this machine only; --bind 0.0.0.0 to listen on the network), the web portal on
# http://127.0.0.1:8080/ (--web-port N; 0 turns it off),
# data in ./var (archive, quarantine, SQLite index), projects from ./projects. Extra arguments
# go to `fiona serve` (for example --port 4242 or --config site.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fiona serve "$@"
