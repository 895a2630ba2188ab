#!/usr/bin/env bash
# Install OpenHQM Edge Gateway on Raspberry Pi OS (64-bit) or Debian 12, from a checkout:
#   sudo packaging/install.sh                       build the package for this machine, install it
#   sudo packaging/install.sh --extras redis,kafka  the same with other uplink extras
#   sudo packaging/install.sh path/to/openhqm-gateway_*.deb   install a package built elsewhere
# Safe to run again: the same version is left as it is (apt says so), a newer one upgrades.
# Building needs the network (PyPI); installing the package does not.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=""
extras=redis
while [ $# -gt 0 ]; do
  case "$1" in
    --extras) extras="${2:?--extras needs a value}"; shift 2 ;;
    --extras=*) extras="${1#--extras=}"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *.deb) deb="$1"; shift ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "run it with sudo: sudo $0 $*" >&2
  exit 2
fi
arch="$(dpkg --print-architecture)"
case "$arch" in
  arm64|amd64) ;;
  armhf) echo "32-bit Raspberry Pi OS (armhf) is not supported: install the 64-bit (arm64) image" >&2; exit 1 ;;
  *) echo "unsupported architecture: $arch (arm64 and amd64 are)" >&2; exit 1 ;;
esac
py="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)"
if [ "$py" != 3.11 ]; then
  echo "this package is built for Python 3.11 (Debian 12 / Raspberry Pi OS 12 \"bookworm\"); python3 here: $py" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if [ -z "$deb" ]; then
  # Building needs pip and venv; on Raspberry Pi OS Lite neither is installed by default.
  need=()
  python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
  if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
  # Build as the user who called sudo, so dist/ and .cache/ in their checkout stay theirs.
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    sudo -u "$SUDO_USER" -H bash packaging/build-deb.sh "$arch" "$extras"
  else
    bash packaging/build-deb.sh "$arch" "$extras"
  fi
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' gateway/__init__.py)"
  deb="dist/openhqm-gateway_${version}-${DEB_REVISION:-1}_${arch}.deb"
fi
[ -f "$deb" ] || { echo "no such package: $deb" >&2; exit 1; }
pkg_arch="$(dpkg-deb -f "$deb" Architecture)"
if [ "$pkg_arch" != "$arch" ]; then
  echo "$deb is for $pkg_arch, this machine is $arch" >&2
  exit 1
fi
case "$deb" in /*) ;; *) deb="./$deb" ;; esac   # apt-get install wants a path, not a name

# apt-get resolves python3-venv and adduser from the archive; update its lists once a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  apt-get update -qq
fi
reinstall=()
installed="$(dpkg-query -W -f='${Status} ${Version}' openhqm-gateway 2>/dev/null || true)"
if [ "$installed" = "install ok installed $(dpkg-deb -f "$deb" Version)" ]; then
  # Same version: apt would do nothing, which is right unless the extras differ.
  wanted="$(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/lib/openhqm-gateway/requirement.txt)"
  if [ "$wanted" != "$(cat /usr/lib/openhqm-gateway/requirement.txt 2>/dev/null)" ]; then
    reinstall=(--reinstall)
  fi
fi
# An edited /etc/openhqm-gateway/gateway.yaml is kept without asking; a changed sample lands
# beside it as gateway.yaml.dpkg-dist.
apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confdef \
  -o Dpkg::Options::=--force-confold "${reinstall[@]}" "$deb"

echo
echo "Installed $(dpkg-query -W -f='${Package} ${Version}' openhqm-gateway)."
echo "  config:  /etc/openhqm-gateway/gateway.yaml   (then: sudo systemctl restart openhqm-gateway)"
echo "  status:  systemctl status openhqm-gateway;  journalctl -u openhqm-gateway -f"
echo "           sudo -u openhqm-gateway openhqm-gateway status"
