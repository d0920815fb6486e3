#!/usr/bin/env bash
# Everything the tests need on a fresh machine: the Python packages, and the Debian packages
# for the tests that drive a real window (xvfb, xdotool, imagemagick) and a real browser
# (chromium, chromium-driver). Packages already there are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt -r tests/requirements.txt
missing=()
for pair in Xvfb:xvfb xdotool:xdotool import:imagemagick chromium:chromium \
            chromedriver:chromium-driver; do
  command -v "${pair%%:*}" > /dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get > /dev/null; then
    echo "installing Debian packages for the window and browser tests: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" > /dev/null
  else
    echo "warning: the window and browser tests need ${missing[*]} (Debian package names);" \
         "install them with your package manager, or those tests fail" >&2
  fi
fi
