#!/usr/bin/env bash
# Everything dmzctl and its tests need on a fresh Debian 12 machine, as root:
# Debian packages, /dev/kvm permissions, virtlogd + libvirtd running, and a
# virtual environment (.venv) with dmzctl installed. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (libvirt's system daemon and nftables need it)" >&2
  exit 1
fi

# shellcheck source=scripts/packages.sh
. scripts/packages.sh
install_packages "${HOST_PACKAGES[@]}" "${TEST_PACKAGES[@]}"

# No udev here: give /dev/kvm what Debian's udev rule gives it. Without it,
# libvirt re-probes QEMU on every call and each domain start takes minutes.
if [ -e /dev/kvm ]; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# No systemd either: start the daemons ourselves when they are not running.
if ! pgrep -x virtlogd >/dev/null; then
  log "starting virtlogd"
  virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
  log "starting libvirtd"
  libvirtd -d
fi
for _ in $(seq 1 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd does not answer" >&2; exit 1; }

# Debian's python3 sees python3-libvirt and python3-nftables only with system site packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import libvirt, nftables' 2>/dev/null; then
  log "creating .venv"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c 'import dmzctl, typer, pytest' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.dmzctl-installed ]; then
  log "installing dmzctl into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' >&2
  touch .venv/.dmzctl-installed
fi
# promtool judges docs/alerts.yml (tests/test_metrics.py). It comes from Debian's prometheus package,
# taken out of the .deb rather than installed: installing it would start a Prometheus server (its
# init script) and pull ~100 MB with a dozen JavaScript packages, for one static binary.
if [ ! -x .venv/bin/promtool ]; then
  log "extracting promtool from Debian's prometheus package"
  scratch=$(mktemp -d)
  chmod 0755 "$scratch"
  if ! (cd "$scratch" && apt-get download -q prometheus >&2 2>/dev/null); then
    apt-get update -q >&2
    (cd "$scratch" && apt-get download -q prometheus >&2)
  fi
  dpkg-deb --fsys-tarfile "$scratch"/prometheus_*.deb | tar -x -C "$scratch" ./usr/bin/promtool
  install -m 0755 "$scratch/usr/bin/promtool" .venv/bin/promtool
  rm -rf "$scratch"
fi
log "ready: $(virsh -c qemu:///system version --daemon 2>/dev/null | tail -n 2 | head -n 1 | sed 's/^ *//')"

# Boot integration where systemd runs the machine (this sandbox has none: skipped).
# The libvirt hooks are left to `dmzctl install --hooks`: they need a libvirtd restart.
if [ -d /run/systemd/system ]; then
  log "installing dmzctl's systemd units"
  .venv/bin/dmzctl install --systemd --no-hooks >&2
fi
