#!/usr/bin/env bash
# Sets up kproxy (apt packages, .venv) and runs the network-namespace demo. Needs root.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
"$root/tests/setup-env.sh"
exec "$root/.venv/bin/python" "$root/examples/demo/demo.py"
