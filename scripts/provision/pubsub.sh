#!/usr/bin/env bash
# Google's Pub/Sub fake (cloud.google.com/go/pubsub/v2/pstest) for the tests, built from
# tests/pstest/ into .cache/pstest/pstest. Needs Go (>= 1.24, or a newer toolchain that the
# go command fetches through the module proxy); modules come from the Go module proxy only.
# Idempotent: rebuilds only when the sources changed.
set -euo pipefail
cd "$(dirname "$0")/../.."

src=tests/pstest
out=.cache/pstest
binary="$out/pstest"
stamp="$out/sources.sha256"

if ! command -v go >/dev/null; then
  source scripts/_setup_common.sh
  install_debian golang-go
fi

sum="$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -d' ' -f1)"
if [ -x "$binary" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
  echo "pstest is up to date ($binary)"
  exit 0
fi

mkdir -p "$out"
echo "==> go build pstest"
(
  cd "$src"
  export GOFLAGS=-mod=mod GOPROXY=https://proxy.golang.org GONOSUMDB= GOPRIVATE=
  go build -o "../../$binary" .
)
echo "$sum" > "$stamp"
echo "built $binary"
