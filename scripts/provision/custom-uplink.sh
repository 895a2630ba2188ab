#!/usr/bin/env bash
# The example uplink plugin (examples/openhqm-file-uplink) into the test environment: the
# custom-uplink tests load it through its entry point, as a pip-installed plugin is loaded.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" -m pip install -q --no-deps -e examples/openhqm-file-uplink
