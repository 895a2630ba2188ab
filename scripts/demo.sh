#!/usr/bin/env bash
# Install the gateway and run the demo: a local broker and Redis, simulated sensors,
# an uplink outage and the catch-up. Ends with a line saying what was published and delivered.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_common.sh

install_debian python3-venv mosquitto redis-server
install_python "demo"
exec .venv/bin/python scripts/demo.py "$@"
