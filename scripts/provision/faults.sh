#!/usr/bin/env bash
# The fault suite (tests/integration/test_faults_*.py) needs strace: it counts the daemon's
# fsync calls under store.durability full vs normal. The power-cut emulation additionally
# needs root, losetup and mkfs.ext4 (util-linux, e2fsprogs); it is skipped without root.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_setup_common.sh
command -v strace >/dev/null || install_debian strace
