#!/usr/bin/env bash
# Build Dockerfile.arm64 for linux/arm64 with buildah, with no Docker daemon and no registry:
#   sudo packaging/build-arm64-image.sh [EXTRAS [IMAGE]]   default: redis, localhost/openhqm-gateway:arm64
#   sudo packaging/build-arm64-image.sh --clean             every image and container but the base goes
#
# The base is NOT the official python image (Docker Hub is out of reach here): it is the minimal
# Debian 12 arm64 root with python3 and python3-venv that check-arm64.sh debootstraps (the same
# cached tarball, packaging/arm64-root.sh), imported once as localhost/openhqm-arm64-base and
# passed as --build-arg PYTHON_IMAGE. The RUN steps run under qemu-user (binfmt_misc).
# buildah keeps its own storage (vfs driver) in .cache/buildah ($ARM64_BUILDAH_ROOT), so nothing
# system-wide is touched and `rm -rf .cache/buildah` removes it all. No --layers: with vfs every
# cached step is a full copy of the root, which costs more here than the venvs it would save.
# --jobs 2: the runtime stage's venv is made while the builder makes the wheels' venv.
# The host's CA bundle is mounted over the one in the build's RUN steps (not into the image),
# so that pip in there trusts what the host's pip trusts, a TLS-inspecting proxy for one.
# Exit codes: 0 built, 1 failed, 2 usage or not root, 3 this machine cannot emulate arm64.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_common.sh
source packaging/arm64-root.sh

if [ "$(id -u)" != 0 ]; then
  echo "build-arm64-image.sh must run as root (buildah storage, chroot, binfmt_misc)" >&2
  exit 2
fi
store="${ARM64_BUILDAH_ROOT:-.cache/buildah}"
mkdir -p "$store"
store="$(cd "$store" && pwd)"
buildah() { command buildah --storage-driver vfs --root "$store/storage" --runroot "$store/run" "$@"; }
BASE_REPO=localhost/openhqm-arm64-base
base="$BASE_REPO:$ARM64_SUITE-$(basename "$ARM64_ROOT_TARBALL" .tar | sed 's/.*-//')"

install_debian buildah debootstrap qemu-user-static binfmt-support

if [ "${1:-}" = --clean ]; then
  # Only this storage, which only this script and its test use.
  buildah rm --all >/dev/null
  mapfile -t images < <(buildah images --noheading --format '{{.Name}}:{{.Tag}} {{.ID}}' \
    | awk -v base="$base" '$1 != base { print $2 }' | sort -u)
  if [ "${#images[@]}" -gt 0 ]; then buildah rmi --force "${images[@]}" >/dev/null; fi
  buildah rmi --prune >/dev/null 2>&1 || true
  buildah images
  exit 0
fi

extras="${1:-redis}"
image="${2:-localhost/openhqm-gateway:arm64}"
if ! [[ "$extras" =~ ^[a-z0-9-]+(,[a-z0-9-]+)*$ ]]; then
  echo "extras must be comma-separated names, e.g. redis,kafka (got '$extras')" >&2
  exit 2
fi

echo "==> binfmt_misc"
arm64_binfmt || exit $?

# The base image: the cached root as one layer. Re-imported when the tarball changed.
stamp="$(stat -c '%Y-%s' "$ARM64_ROOT_TARBALL" 2>/dev/null || echo none)"
have="$(buildah inspect --type image --format '{{index .ImageAnnotations "org.openhqm.root-tarball"}}' \
  "$base" 2>/dev/null || true)"
if [ "$stamp" = none ] || [ "$have" != "$stamp" ]; then
  if [ ! -f "$ARM64_ROOT_TARBALL" ]; then
    work="$(mktemp -d "${TMPDIR:-/tmp}/openhqm-arm64-base.XXXXXX")"
    trap 'arm64_remove "$work" "$work/root"' EXIT
    trap 'exit 143' TERM INT   # so that a stopped run still unmounts
    arm64_root "$work/root" "$work/debootstrap.log"
    arm64_remove "$work" "$work/root"
    trap - EXIT
    stamp="$(stat -c '%Y-%s' "$ARM64_ROOT_TARBALL")"
  fi
  t0=$(date +%s)
  buildah rmi --force "$base" >/dev/null 2>&1 || true
  ctr="$(buildah from --arch arm64 --os linux scratch)"
  buildah add "$ctr" "$ARM64_ROOT_TARBALL" / >/dev/null
  buildah config --arch arm64 --os linux --annotation "org.openhqm.root-tarball=$stamp" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 "$ctr"
  buildah commit --quiet --rm "$ctr" "$base" >/dev/null
  echo "==> base image $base from $ARM64_ROOT_TARBALL in $(( $(date +%s) - t0 ))s"
else
  echo "==> base image $base (already there)"
fi

volumes=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  volumes=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
echo "==> buildah bud --platform linux/arm64 --build-arg EXTRAS=$extras -t $image"
t0=$(date +%s)
# --format docker: the OCI format has no HEALTHCHECK; --pull=never: no registry is asked.
buildah bud --isolation chroot --format docker --pull=never --jobs 2 --platform linux/arm64 \
  "${volumes[@]}" --build-arg "PYTHON_IMAGE=$base" --build-arg "EXTRAS=$extras" \
  -f Dockerfile.arm64 -t "$image" .
seconds=$(( $(date +%s) - t0 ))
size="$(buildah images --noheading --format '{{.Size}}' "$image" | head -1)"
base_size="$(buildah images --noheading --format '{{.Size}}' "$base" | head -1)"
echo "==> built $image in ${seconds}s: $size (base $base_size)"
