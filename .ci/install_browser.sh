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

source "$(dirname "$0")/apt_install.sh"
apt_install install_browser chromium chromium-driver
/usr/bin/chromium --version
/usr/bin/chromedriver --version
