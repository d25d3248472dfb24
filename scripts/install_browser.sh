#!/usr/bin/env bash
# Installs the system Chromium that the reviewer page's browser test drives through Playwright.
# Debian's package, not `playwright install`: the build machines cannot download Playwright's own browsers.
# Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  echo "[browser] /usr/bin/chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
  exit 0
fi
echo "[browser] installing Debian's chromium"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
echo "[browser] installed: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
