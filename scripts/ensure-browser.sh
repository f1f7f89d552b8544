#!/usr/bin/env bash
# The browser test needs Debian's Chromium (no browser is downloaded by a test tool). As root with apt it is
# installed here, like the data; elsewhere this stops with one line saying how, unless VAELIB_SKIP_BROWSER=1.
set -euo pipefail
chromium=${VAELIB_CHROMIUM:-/usr/bin/chromium}
if [ -x "$chromium" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "browser: installing Debian's chromium for the browser test"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  exit 0
fi
if [ "${VAELIB_SKIP_BROWSER:-}" = 1 ]; then
  echo "browser: no Chromium at $chromium; skipping the browser test because VAELIB_SKIP_BROWSER=1" >&2
  exit 0
fi
echo "browser: the browser test needs Chromium at $chromium: sudo apt-get install chromium (or set VAELIB_CHROMIUM to a Chromium binary, or VAELIB_SKIP_BROWSER=1 to skip the test)" >&2
exit 2
