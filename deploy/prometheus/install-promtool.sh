#!/usr/bin/env bash
# promtool for `make test` (it checks and unit-tests alerts.yml), from Debian's prometheus package,
# installed only when missing, and without leaving a Prometheus server running or enabled.
set -euo pipefail
command -v promtool >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "promtool is missing: install Debian's prometheus package (sudo apt-get install prometheus), or run make as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The package's maintainer scripts would start the server; policy-rc.d is Debian's way to say no.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends prometheus >/dev/null
# Nor at the next boot.
if [ -d /run/systemd/system ]; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
update-rc.d prometheus disable >/dev/null 2>&1 || true
promtool --version 2>&1 | head -1
