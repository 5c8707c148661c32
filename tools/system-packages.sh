#!/usr/bin/env bash
# Install the Debian packages that some tests drive, when they are missing and we may install them:
#   chromium    - the dashboard's headless-browser test (tests/dashboard)
#   postgresql  - the two-worker distributed sweep test (tests/sweep)
# Without root or apt-get this prints what is missing and exits 0: those tests then skip, saying why.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
{ command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-packages: missing ${need[*]} (not root or no apt-get): the tests that need them will skip" >&2
  exit 0
fi
echo "system-packages: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "system-packages: apt-get install ${need[*]} failed: the tests that need them will skip" >&2
exit 0
