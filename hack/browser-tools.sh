#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver from Debian's packages (`chromium`,
# `chromium-driver`) when /usr/bin/chromium or /usr/bin/chromedriver is missing; tests/portal.rs
# drives the portal with them. Needs root (or sudo) the first time only.
set -euo pipefail
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  exit 0
fi
echo "[browser-tools] installing Debian packages chromium and chromium-driver" >&2
sudo=""
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null; then
    sudo="sudo"
  else
    echo "[browser-tools] need root to install chromium and chromium-driver: run as root, or install them" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq chromium chromium-driver >&2
/usr/bin/chromedriver --version >/dev/null
