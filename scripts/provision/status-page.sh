#!/usr/bin/env bash
# The status page test (tests/integration/test_status_page.py) renders http://127.0.0.1:<port>/
# in headless Chromium (Debian's chromium package) and checks the DOM after the page's
# JavaScript ran, and a screenshot. benchmarks/status_page_screenshot.py uses it as well.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_setup_common.sh
command -v chromium >/dev/null || install_debian chromium
