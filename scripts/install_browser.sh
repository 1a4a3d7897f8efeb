#!/usr/bin/env bash
# Installs what the browser tests of `multidiff serve` drive: Debian's chromium and chromium-driver
# (/usr/bin/chromium, /usr/bin/chromedriver). Needs root (or sudo); without either it says so and
# the browser tests skip (CI sets MULTIDIFF_REQUIRE_BROWSER=1, which makes a missing browser fail).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_browser: chromium and chromedriver are missing and this user cannot install them;" \
         "as root: apt-get install chromium chromium-driver (the browser tests skip until then)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q chromium chromium-driver >/dev/null
fi
echo "install_browser: $(chromium --version 2>/dev/null | head -1)"
