#!/usr/bin/env bash
# Create .venv and install fiona into it. With --test, also what the tests need: Debian packages
# (when run as root on a Debian-like system) and the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# Debian packages the test suite talks to as real peers.
DEBIAN_TEST_PACKAGES=(dcmtk dicom3tools openssl orthanc openssh-server systemd chromium chromium-driver
  tesseract-ocr tesseract-ocr-eng fonts-dejavu-core fonts-liberation)

if [ "$want_test" = 1 ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    missing=()
    for pkg in "${DEBIAN_TEST_PACKAGES[@]}"; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      echo "setup: installing Debian packages: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  else
    echo "setup: not root; make sure these Debian packages are installed: ${DEBIAN_TEST_PACKAGES[*]}"
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$want_test" = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
