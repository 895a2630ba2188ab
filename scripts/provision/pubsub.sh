#!/usr/bin/env bash
# Google's Pub/Sub fake (cloud.google.com/go/pubsub/v2/pstest) for the tests, built from
# tests/pstest/ into .cache/pstest/pstest. Needs Go >= 1.24: the installed `go` when it is
# new enough, else the official toolchain fetched once from the Go module proxy (it is the
# module golang.org/toolchain) into .cache/go-toolchain. Every module comes from the Go
# module proxy. Idempotent: rebuilds only when the sources changed.
set -euo pipefail
cd "$(dirname "$0")/../.."

src=tests/pstest
out=.cache/pstest
binary="$out/pstest"
stamp="$out/sources.sha256"
proxy=https://proxy.golang.org
toolchain_version=1.24.13

sum="$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -d' ' -f1)"
if [ -x "$binary" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
  echo "pstest is up to date ($binary)"
  exit 0
fi

go_is_new_enough() {
  command -v go >/dev/null || return 1
  local v minor
  v="$(go env GOVERSION 2>/dev/null || true)"      # e.g. go1.26.8
  [[ "$v" =~ ^go1\.([0-9]+) ]] || return 1
  minor="${BASH_REMATCH[1]}"
  [ "$minor" -ge 24 ]
}

if ! go_is_new_enough; then
  case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64|arm64) arch=arm64 ;;
    armv6l|armv7l) arch=armv6l ;;
    *) echo "no Go toolchain for $(uname -m); install Go >= 1.24" >&2; exit 1 ;;
  esac
  name="v0.0.1-go${toolchain_version}.linux-${arch}"
  root=".cache/go-toolchain/go${toolchain_version}-${arch}"
  if [ ! -x "$root/bin/go" ]; then
    echo "==> Go ${toolchain_version} toolchain from the module proxy"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    curl -fsSL "$proxy/golang.org/toolchain/@v/${name}.zip" -o "$tmp/toolchain.zip"
    python3 -m zipfile -e "$tmp/toolchain.zip" "$tmp/x"
    # zip entries carry no exec bits through python's zipfile
    chmod -R u+x "$tmp/x/golang.org/toolchain@${name}/bin" "$tmp/x/golang.org/toolchain@${name}/pkg/tool"
    mkdir -p "$(dirname "$root")"
    rm -rf "$root"
    mv "$tmp/x/golang.org/toolchain@${name}" "$root"
  fi
  export PATH="$PWD/$root/bin:$PATH"
fi

mkdir -p "$out"
echo "==> go build pstest ($(go env GOVERSION))"
(
  cd "$src"
  export GOFLAGS=-mod=mod GOPROXY="$proxy" GOTOOLCHAIN=local GOPRIVATE= GONOSUMDB=
  go build -o "../../$binary" .
)
echo "$sum" > "$stamp"
echo "built $binary"
