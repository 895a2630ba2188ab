#!/usr/bin/env bash
# Azurite (Microsoft's Azure Storage emulator, npm package `azurite`) for the Event Hubs
# uplink's blob checkpoint store tests: installed with npm into .cache/azurite (or
# $AZURITE_DIR). The Event Hubs server itself is Python (tests/eventhubs_server) and needs
# nothing. Needs Node.js (18+) and npm; installs them from Debian when missing.
#
# Idempotent: a stamp file records the version; nothing is downloaded when it matches.
#   AZURITE_VERSION=3.37.0 bash scripts/provision/eventhubs.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

version="${AZURITE_VERSION:-3.37.0}"
dest="${AZURITE_DIR:-$PWD/.cache/azurite}"
stamp="$dest/.azurite-version"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$version" && -x "$dest/node_modules/.bin/azurite-blob" ]]; then
  echo "azurite $version already in $dest"
  exit 0
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  source scripts/_setup_common.sh
  install_debian nodejs npm
fi

tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
# --ignore-scripts: azurite needs no install scripts; engines warnings (node < 22) are
# harmless for the blob service the tests use.
npm install --prefix "$tmp" --no-audit --no-fund --ignore-scripts --loglevel=error \
    "azurite@$version"
echo "$version" > "$tmp/.azurite-version"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
trap - EXIT
echo "azurite $version installed in $dest"
