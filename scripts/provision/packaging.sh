#!/usr/bin/env bash
# The package tests (tests/integration/test_package.py) build .debs with dpkg-deb, lint the
# packaging scripts with shellcheck and the amd64 package with lintian, install the arm64
# package into a debootstrapped root under qemu-user (packaging/check-arm64.sh), and build and
# run Dockerfile.arm64 with buildah (packaging/build-arm64-image.sh). Those scripts also
# install their own tools when run on their own.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_setup_common.sh
install_debian dpkg shellcheck lintian file debootstrap qemu-user-static binfmt-support buildah
