# shellcheck shell=bash
# shellcheck disable=SC2034  # the ARM64_* names are for the scripts that source this file
# Sourced (not run) by packaging/check-arm64.sh and packaging/build-arm64-image.sh, from the
# repository's top directory, as root: qemu-user for arm64 binaries, and the minimal Debian 12
# arm64 root both use, debootstrapped once and cached as a tarball in .cache/arm64-root/
# ($ARM64_ROOT_CACHE overrides the directory).

ARM64_SUITE=bookworm
ARM64_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ARM64_INCLUDE=python3,python3-venv,adduser,ca-certificates
ARM64_ROOT_CACHE="${ARM64_ROOT_CACHE:-.cache/arm64-root}"
ARM64_ROOT_TARBALL="$ARM64_ROOT_CACHE/$ARM64_SUITE-arm64-minbase-$(echo "$ARM64_INCLUDE" | md5sum | cut -c1-8).tar"

# qemu-aarch64 registered with binfmt_misc (mounted if need be). Returns 3 when this machine
# cannot run arm64 binaries.
arm64_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || {
      echo "cannot mount binfmt_misc: this machine cannot run arm64 binaries" >&2; return 3; }
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # Register by hand: ELF64 little-endian, e_machine 0xb7 (AArch64); F = the interpreter is
    # opened now, so it works inside a chroot without a copy there. The kernel decodes the \x.
    # shellcheck disable=SC2028
    echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
      > /proc/sys/fs/binfmt_misc/register 2>/dev/null || true
  fi
  if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
    echo "qemu-aarch64 is not registered with binfmt_misc: this machine cannot run arm64 binaries" >&2
    return 3
  fi
  sed -n '1,3p' /proc/sys/fs/binfmt_misc/qemu-aarch64
}

# Lay the Debian arm64 root out in ROOT (an empty directory): from the cached tarball, or by
# debootstrap (a few minutes), which then fills the cache. LOG keeps debootstrap's output. The
# caller unmounts ROOT/proc and friends if it is stopped half-way (see arm64_remove).
arm64_root() {
  local root="$1" log="$2" attempt t0
  mkdir -p "$root" "$ARM64_ROOT_CACHE"
  if [ -f "$ARM64_ROOT_TARBALL" ]; then
    echo "==> debootstrapped root from the cache ($ARM64_ROOT_TARBALL)"
    tar -xpf "$ARM64_ROOT_TARBALL" -C "$root"
    return
  fi
  echo "==> debootstrap --arch=arm64 $ARM64_SUITE (no cache yet; a few minutes)"
  t0=$(date +%s)
  for attempt in 1 2; do   # a second try for a mirror that hiccuped
    if debootstrap --arch=arm64 --variant=minbase --include="$ARM64_INCLUDE" "$ARM64_SUITE" "$root" \
        "$ARM64_MIRROR" > "$log" 2>&1; then
      break
    fi
    tail -30 "$log" >&2
    for m in "$root/proc" "$root/sys"; do
      if mountpoint -q "$m"; then umount -l "$m"; fi
    done
    [ "$attempt" = 1 ] || return 1
    echo "debootstrap failed; trying once more" >&2
    rm -rf --one-file-system "$root" && mkdir -p "$root"
  done
  # debootstrap leaves its proc mount behind on some hosts.
  if mountpoint -q "$root/proc"; then umount -l "$root/proc"; fi
  apt-get -o Dir="$root" clean >/dev/null 2>&1 || rm -f "$root"/var/cache/apt/archives/*.deb
  echo "==> debootstrap took $(( $(date +%s) - t0 ))s"
  # Written aside and renamed: a concurrent or stopped run never sees half a tarball.
  tar -cpf "$ARM64_ROOT_TARBALL.tmp.$$" -C "$root" . \
    && mv "$ARM64_ROOT_TARBALL.tmp.$$" "$ARM64_ROOT_TARBALL"
}

# Delete WORK, which holds a root at ROOT: unmount first, deepest first, and never delete
# across a file system boundary.
arm64_remove() {
  local work="$1" root="$2" m
  for m in "$root/proc" "$root/sys" "$root/dev/pts" "$root/dev"; do
    if mountpoint -q "$m" 2>/dev/null; then umount -l "$m" || true; fi
  done
  if ! grep -q " $work/" /proc/mounts; then
    rm -rf --one-file-system "$work"
  else
    echo "warning: $work still has mounts; left in place" >&2
  fi
}
