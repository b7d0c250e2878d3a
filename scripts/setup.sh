#!/usr/bin/env bash
# Create .venv and install fiona into it. With --test, also what the tests need: Debian packages
# (when run as root on a Debian-like system) and the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# Debian packages the test suite talks to as real peers.
DEBIAN_TEST_PACKAGES=(dcmtk dicom3tools openssl orthanc openssh-server systemd chromium chromium-driver
  slapd ldap-utils dcm2niix nodejs npm
  tesseract-ocr tesseract-ocr-eng fonts-dejavu-core fonts-liberation postgresql iproute2)
# The BIDS validator the convert tests run (npm; the legacy 1.x line runs on plain node, offline).
BIDS_VALIDATOR_VERSION=1.15.0

if [ "$want_test" = 1 ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    missing=()
    for pkg in "${DEBIAN_TEST_PACKAGES[@]}"; do
      # A nodejs from elsewhere (NodeSource) brings its own npm and conflicts with Debian's.
      [ "$pkg" = npm ] && command -v npm >/dev/null 2>&1 && continue
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      echo "setup: installing Debian packages: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
      # The tests start their own slapd; one the package may have started is not needed.
      if [[ " ${missing[*]} " == *" slapd "* ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now slapd >/dev/null 2>&1 || true
      fi
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

if [ "$want_test" = 1 ]; then
  validator=.cache/bids-validator/node_modules/.bin/bids-validator
  if command -v npm >/dev/null 2>&1 && \
     [ "$("$validator" --version 2>/dev/null)" != "$BIDS_VALIDATOR_VERSION" ]; then
    echo "setup: installing bids-validator $BIDS_VALIDATOR_VERSION into .cache/bids-validator"
    npm install --silent --no-audit --no-fund --prefix .cache/bids-validator \
      "bids-validator@$BIDS_VALIDATOR_VERSION" >/dev/null
  fi
fi
