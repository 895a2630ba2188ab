#!/usr/bin/env bash
# Build the Debian package with plain dpkg-deb (no debhelper):
#   packaging/build-deb.sh <amd64|arm64> [EXTRAS]        EXTRAS: comma-separated, default: redis
# Output: dist/openhqm-gateway_<version>-<rev>_<arch>.deb ($OPENHQM_DIST overrides dist/;
# $DEB_REVISION the Debian revision, default 1; $PYTHON the Python with pip that builds).
#
# The package carries wheels for the TARGET architecture (the gateway's own wheel, its runtime
# dependencies and those of the chosen extras, all CPython 3.11); its postinst creates the
# virtualenv /opt/openhqm-gateway with the system python3 and installs from them offline.
# Building needs the network (PyPI) once; installing does not. See docs/packaging.md.
set -euo pipefail
cd "$(dirname "$0")/.."

arch="${1:-}"
extras="${2:-redis}"
case "$arch" in
  amd64) machine=x86_64 ;;
  arm64) machine=aarch64 ;;
  *) echo "usage: $0 <amd64|arm64> [extras, comma-separated; default redis]" >&2; exit 2 ;;
esac
if ! [[ "$extras" =~ ^[a-z0-9-]+(,[a-z0-9-]+)*$ ]]; then
  echo "extras must be comma-separated names, e.g. redis,kafka (got '$extras')" >&2
  exit 2
fi
# The wheels are built for CPython 3.11 (Debian 12 "bookworm", Raspberry Pi OS bookworm).
PY_VERSION=3.11
# Debian 12 and Raspberry Pi OS 12 ship 3.11.2: dependency markers are evaluated for it.
PY_FULL=3.11.2
PY_NEXT=3.12
DEB_REVISION="${DEB_REVISION:-1}"
NAME=openhqm-gateway

# A Python with pip for building the wheel and downloading the target's wheels.
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then
    python=.venv/bin/python
  elif python3 -m pip --version >/dev/null 2>&1; then
    python=python3
  else
    python=.cache/packaging/tools/bin/python
    [ -x "$python" ] || python3 -m venv .cache/packaging/tools
  fi
fi

version="$("$python" -c 'import re,sys; print(re.search(r"__version__ = \"([^\"]+)\"", open("gateway/__init__.py").read()).group(1))')"
deb_version="${version}-${DEB_REVISION}"

work="$(mktemp -d "${TMPDIR:-/tmp}/openhqm-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
wheels="$root/usr/lib/$NAME/wheels"
mkdir -p "$wheels" "$work/own"

echo "==> wheel of openhqm-gateway $version"
# Built from a copy, so concurrent builds do not share the checkout's build/ directory.
mkdir -p "$work/src"
cp -r pyproject.toml README.md gateway openhqm "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
if ! "$python" -m pip wheel -q --no-deps --disable-pip-version-check -w "$work/own" "$work/src" \
    >"$work/wheel.log" 2>&1; then
  cat "$work/wheel.log" >&2
  exit 1
fi
own_wheel="$(ls "$work/own/openhqm_gateway-${version}"-*.whl)"
cp "$own_wheel" "$wheels/"

echo "==> wheels for linux/$arch (CPython $PY_VERSION) with extras [$extras]"
platforms=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_${machine}")
done
"$python" -m pip download -q --disable-pip-version-check --only-binary=:all: \
  "${platforms[@]}" --python-version "$PY_VERSION" --implementation cp \
  --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
  -c scripts/constraints.txt -d "$wheels" "${own_wheel}[${extras}]"
# pip judged the dependencies' markers by this machine's Python; fetch what the target's needs.
for _ in 1 2 3 4 5; do
  mapfile -t more < <("$python" packaging/target_deps.py "$wheels" "${NAME}[${extras}]" "$PY_FULL" "$machine")
  [ "${#more[@]}" -gt 0 ] || break
  echo "    for the target's Python $PY_FULL: ${more[*]}"
  "$python" -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps \
    "${platforms[@]}" --python-version "$PY_VERSION" --implementation cp \
    --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
    -c scripts/constraints.txt -d "$wheels" "${more[@]}"
done
# Only wheels that CPython 3.11 on this architecture can use.
for whl in "$wheels"/*.whl; do
  case "$(basename "$whl")" in
    *-none-any.whl | *-cp311-*"$machine".whl | *-abi3-*"$machine".whl | *-none-*"$machine".whl) ;;
    *) echo "unexpected wheel for $arch: $(basename "$whl")" >&2; exit 1 ;;
  esac
done
echo "${NAME}[${extras}]==${version}" > "$root/usr/lib/$NAME/requirement.txt"

echo "==> files"
install -D -m 0644 systemd/$NAME.service "$root/lib/systemd/system/$NAME.service"
install -D -m 0644 config/gateway.yaml "$root/etc/$NAME/gateway.yaml"
install -d -m 0700 "$root/etc/$NAME/credentials"
# The pristine sample: postinst compares the conffile with it to decide whether to start.
install -D -m 0644 config/gateway.yaml "$root/usr/share/$NAME/gateway.yaml.sample"
install -d "$root/usr/bin"
ln -s /opt/$NAME/bin/$NAME "$root/usr/bin/$NAME"
doc="$root/usr/share/doc/$NAME"
install -D -m 0644 README.md "$doc/README.md"
install -m 0644 docs/packaging.md "$doc/packaging.md"
cp -r docs/uplinks "$doc/uplinks"
chmod -R u=rwX,go=rX "$doc/uplinks"
install -m 0644 packaging/debian/copyright "$doc/copyright"
{
  echo "$NAME ($deb_version) stable; urgency=medium"
  echo
  echo "  * Release $version (extras: $extras)."
  echo
  echo " -- OpenHQM maintainers <maintainers@openhqm.invalid>  $(date -R -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n > "$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"

echo "==> control"
install -d -m 0755 "$root/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
echo "/etc/$NAME/gateway.yaml" > "$root/DEBIAN/conffiles"
size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
sed -e "s/@VERSION@/$deb_version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@EXTRAS@/$extras/" -e "s/@PY@/$PY_VERSION/" -e "s/@PY_NEXT@/$PY_NEXT/" \
    packaging/debian/control.in > "$root/DEBIAN/control"
# Readable by all, writable by the owner only, whatever the builder's umask (owner: root, below).
chmod -R u+rwX,go+rX,go-w "$root"
chmod 0700 "$root/etc/$NAME/credentials"

out_dir="${OPENHQM_DIST:-dist}"
mkdir -p "$out_dir"
out="$out_dir/${NAME}_${deb_version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "==> $out ($(du -h "$out" | cut -f1))"
