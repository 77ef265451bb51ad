#!/usr/bin/env bash
# Install Debian's headless Chromium and its matching chromedriver for tests/test_browser.py.
# Idempotent: does nothing when both are present. Needs root (or sudo) and the Debian package mirror;
# nothing is downloaded at test time (Selenium gets the driver path explicitly).
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "install_browser: chromium and chromedriver already installed:"
    /usr/bin/chromium --version 2>/dev/null || true
    /usr/bin/chromedriver --version 2>/dev/null || true
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_browser: need root (or sudo) to apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found; install Chromium and chromedriver at /usr/bin by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
/usr/bin/chromium --version
/usr/bin/chromedriver --version
