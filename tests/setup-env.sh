#!/usr/bin/env bash
# Sets up everything kproxy needs on a fresh Debian machine (as root) and is cheap to
# re-run: the apt packages, a virtual environment in .venv, kproxy with its test
# dependencies (editable) and the contrib plugins. Source it or run it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

need=()
for cmd in nft:nftables ip:iproute2 conntrack:conntrack; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || need+=("${cmd##*:}")
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need+=(python3-venv); fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.kproxy-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ -n "$(find contrib -name pyproject.toml -newer "$stamp" 2>/dev/null)" ]; then
  echo "setup: installing kproxy and its test dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip setuptools >/dev/null
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  for c in contrib/*/; do
    [ -f "$c/pyproject.toml" ] && .venv/bin/pip install -q --disable-pip-version-check -e "$c"
  done
  touch "$stamp"
fi
