#!/usr/bin/env bash
# shellcheck disable=SC2015  # "check && expect ... || fail ...": expect only prints, never fails
# Install the arm64 package into a fresh Debian 12 arm64 root under qemu-user emulation and run
# it there:  sudo packaging/check-arm64.sh [path/to/openhqm-gateway_*_arm64.deb]
# Without a .deb it builds one (packaging/build-deb.sh arm64). Needs root (debootstrap, chroot,
# mounts). The debootstrapped root is cached as .cache/arm64-root/*.tar (ARM64_ROOT_CACHE
# overrides the directory; packaging/arm64-root.sh); the package is always installed into a
# fresh copy of it.
# Exit codes: 0 checked, 1 a check failed, 3 this machine cannot emulate arm64 (binfmt_misc).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_common.sh

if [ "$(id -u)" != 0 ]; then
  echo "check-arm64.sh must run as root (debootstrap, chroot, mount)" >&2
  exit 2
fi
source packaging/arm64-root.sh

step() { echo "==> $*"; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

install_debian debootstrap qemu-user-static binfmt-support file

step "binfmt_misc"
arm64_binfmt || exit $?

deb="${1:-}"
if [ -z "$deb" ]; then
  t0=$(date +%s)
  bash packaging/build-deb.sh arm64
  step "package built in $(elapsed "$t0")"
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' gateway/__init__.py)"
  deb="${OPENHQM_DIST:-dist}/openhqm-gateway_${version}-${DEB_REVISION:-1}_arm64.deb"
fi
[ -f "$deb" ] || { echo "no such package: $deb" >&2; exit 2; }
[ "$(dpkg-deb -f "$deb" Architecture)" = arm64 ] || { echo "$deb is not an arm64 package" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/openhqm-arm64.XXXXXX")"
root="$work/root"
trap 'arm64_remove "$work" "$root"' EXIT
trap 'exit 143' TERM INT   # so that a stopped run still unmounts

arm64_root "$root" "$work/debootstrap.log"

mount -t proc proc "$root/proc"
run() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

step "the root runs arm64 binaries"
arch_in="$(run uname -m)"
echo "uname -m in the root: $arch_in"
[ "$arch_in" = aarch64 ] || { echo "expected aarch64, got $arch_in" >&2; exit 1; }
file -L "$root/usr/bin/python3"
file -L "$root/usr/bin/python3" | grep -q "ARM aarch64" || { echo "python3 in the root is not aarch64" >&2; exit 1; }

cp "$deb" "$root/tmp/"
pkg="/tmp/$(basename "$deb")"
step "dpkg -i $(basename "$deb") (offline: the dependencies are in the root already)"
t0=$(date +%s)
run dpkg -i "$pkg"
step "installed in $(elapsed "$t0")"

step "checks"
expect() { echo "  ok: $1"; }
fail() { echo "  FAILED: $1" >&2; exit 1; }
run dpkg-query -W -f='${Status} ${Version}\n' openhqm-gateway | grep -q "install ok installed" \
  && expect "dpkg status: installed" || fail "package not configured"
run getent passwd openhqm-gateway | grep -q ":/var/lib/openhqm-gateway:/usr/sbin/nologin$" \
  && expect "system user openhqm-gateway" || fail "no system user"
so="$(find "$root/opt/openhqm-gateway/lib" -name '*.so' -path '*orjson*' | head -1)"
[ -n "$so" ] || fail "no compiled orjson module in the virtualenv"
file "$so" | grep -q "ARM aarch64" && expect "orjson extension is aarch64: $(file -b "$so" | cut -d, -f1-2)" \
  || fail "orjson extension is not aarch64: $(file -b "$so")"
version_out="$(run openhqm-gateway --version)"
echo "  openhqm-gateway --version: $version_out"
[[ "$version_out" == "openhqm-gateway $(dpkg-deb -f "$deb" Version | sed 's/-[^-]*$//')" ]] \
  || fail "unexpected --version output"
run openhqm-gateway --config /etc/openhqm-gateway/gateway.yaml config check > "$work/check.out" \
  || { cat "$work/check.out"; fail "config check"; }
head -1 "$work/check.out"
expect "config check as root"
# The service's user can read its config (0640 root:openhqm-gateway via dpkg-statoverride).
[ "$(run stat -c '%a %U %G' /etc/openhqm-gateway/gateway.yaml)" = "640 root openhqm-gateway" ] \
  && expect "config is 0640 root:openhqm-gateway" || fail "config permissions"
run setpriv --reuid=openhqm-gateway --regid=openhqm-gateway --init-groups \
  openhqm-gateway config check >/dev/null && expect "config check as openhqm-gateway" \
  || fail "config check as the service user"
[ -f "$root/etc/openhqm-gateway/credentials/mqtt-password" ] && expect "credential placeholder" \
  || fail "no credential placeholder for LoadCredential="
[ -L "$root/etc/systemd/system/multi-user.target.wants/openhqm-gateway.service" ] \
  && expect "service enabled (not started: no systemd in a chroot)" || fail "service not enabled"

step "reinstall (the upgrade path: the virtualenv is rebuilt, the state kept)"
echo marker > "$root/var/lib/openhqm-gateway/keep"
t0=$(date +%s)
run dpkg -i "$pkg" >/dev/null
run openhqm-gateway --version >/dev/null && expect "runs after reinstall ($(elapsed "$t0"))" || fail "reinstall"
[ ! -e "$root/opt/openhqm-gateway.old" ] || fail "old virtualenv left behind"

step "remove, then purge"
run dpkg -r openhqm-gateway >/dev/null
[ ! -e "$root/opt/openhqm-gateway" ] && expect "remove: virtualenv gone" || fail "remove left /opt"
[ -f "$root/var/lib/openhqm-gateway/keep" ] && expect "remove: state kept" || fail "remove deleted state"
[ -f "$root/etc/openhqm-gateway/gateway.yaml" ] && expect "remove: config kept" || fail "remove deleted config"
run dpkg -P openhqm-gateway >/dev/null
[ ! -e "$root/var/lib/openhqm-gateway" ] && expect "purge: state gone" || fail "purge kept state"
[ ! -e "$root/etc/openhqm-gateway" ] && expect "purge: config gone" || fail "purge kept config"
run getent passwd openhqm-gateway >/dev/null && expect "purge: system user kept" || fail "user gone"

step "arm64 package checked"
