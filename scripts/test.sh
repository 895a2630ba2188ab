#!/usr/bin/env bash
# Install what the tests need, then lint, type-check and run every test against real servers.
# This is the command the README gives and the one CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_common.sh

install_debian python3-venv mosquitto mosquitto-clients redis-server kcat systemd
command -v java >/dev/null || install_debian openjdk-17-jre-headless
command -v mvn >/dev/null || install_debian maven
install_python "test"
# Each backend's test servers (jars, emulators) are provisioned by its own script.
for script in scripts/provision/*.sh; do
  echo "==> $script"
  bash "$script"
done

echo "==> ruff"
.venv/bin/ruff check gateway openhqm tests benchmarks
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
# Two workers, a test file each at a time (a file's servers and fixtures stay on one worker):
# most tests wait on servers and outages, so this halves the wall time on 2 cores.
# TEST_WORKERS=0 runs everything in this process. The 20 slowest tests are listed at the end
# (what to look at when the run grows).
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile \
  --durations=20 "$@"
