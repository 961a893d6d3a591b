#!/usr/bin/env bash
# The whole test suite: unit tests, end-to-end tests with real nft and packets in
# network namespaces, and the flowtable tests in a VM (skipped, and said so, where qemu
# cannot run). Run as root on Debian: sudo tests/run.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
tests/setup-env.sh
if [ -x tests/vm/setup.sh ]; then
  tests/vm/setup.sh || echo "run: the VM could not be set up; its tests will be reported as skipped"
fi
exec .venv/bin/python -m pytest "$@"
