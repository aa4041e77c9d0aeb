#!/usr/bin/env bash
# Install dmzctl from this checkout onto the host, as root, so that nothing depends on the clone:
#   scripts/install.sh [--prefix /opt/dmzctl] [--systemd|--no-systemd] [--skip-packages]
#   scripts/install.sh [--prefix /opt/dmzctl] --uninstall
#
# Installing: the Debian packages dmzctl runs on (scripts/packages.sh, HOST_PACKAGES); a virtual
# environment at PREFIX made with Debian's python3 and --system-site-packages (it sees python3-libvirt
# and python3-nftables) holding a real, non-editable copy of dmzctl; the link /usr/local/sbin/dmzctl;
# bash completion; then `dmzctl install` of that copy, so the libvirt hooks run PREFIX's python and the
# systemd units (where systemd runs the machine, or with --systemd) run PREFIX's dmzctl.
# Run it again after a `git pull` to update; it changes only what differs.
#
# Uninstalling removes exactly that (the files it records in PREFIX/.dmzctl-install) and keeps the
# configs (/etc/dmzctl), dmzctl's state (/var/lib/dmzctl) and every libvirt volume and pool.
#
# Where things go, for packagers and tests (the same values are needed by --uninstall only when the
# record in PREFIX is gone):
#   DMZCTL_INSTALL_BIN_DIR         the PATH directory of the link   (/usr/local/sbin)
#   DMZCTL_INSTALL_COMPLETION_DIR  bash completion                  (/usr/share/bash-completion/completions)
#   DMZCTL_HOOKS_DIR               libvirt's hook directory         (/etc/libvirt/hooks; `up` reads it too)
#   DMZCTL_INSTALL_UNIT_DIR        systemd's unit directory         (/etc/systemd/system)
set -euo pipefail
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE  # nothing of the caller's Python reaches the installed copy

SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX=/opt/dmzctl
ACTION=install
SYSTEMD=()
PACKAGES=yes
BIN_DIR="${DMZCTL_INSTALL_BIN_DIR:-/usr/local/sbin}"
COMPLETION_DIR="${DMZCTL_INSTALL_COMPLETION_DIR:-/usr/share/bash-completion/completions}"
HOOKS_DIR="${DMZCTL_HOOKS_DIR:-/etc/libvirt/hooks}"
UNIT_DIR="${DMZCTL_INSTALL_UNIT_DIR:-/etc/systemd/system}"
MARK=.dmzctl-install
HEADER="# dmzctl bash completion, installed by scripts/install.sh"

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
usage() { sed -n '2,4s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="$2"; shift ;;
    --prefix=*) PREFIX="${1#--prefix=}" ;;
    --uninstall) ACTION=uninstall ;;
    --systemd|--no-systemd) SYSTEMD=("$1") ;;
    --skip-packages) PACKAGES=no ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
case "$PREFIX" in
  /*) ;;
  "") die "--prefix is empty" ;;
  *) PREFIX="$(pwd)/$PREFIX" ;;
esac
PREFIX="$(realpath -m "$PREFIX")"
case "$PREFIX" in
  /|/usr|/usr/local|/opt|/etc|/var|/home|/root|/tmp) die "--prefix $PREFIX: give a directory of dmzctl's own, e.g. /opt/dmzctl" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root (it installs Debian packages, libvirt hooks and systemd units)"

ours() { [ -f "$PREFIX/$MARK" ]; }
recorded() {  # recorded KEY DEFAULT: a destination from PREFIX's record, else the default
  local value
  value="$(sed -n "s/^$1=//p" "$PREFIX/$MARK" 2>/dev/null | tail -n 1)"
  echo "${value:-$2}"
}
link_is_ours() { [ -L "$1" ] && [ "$(readlink "$1")" = "$PREFIX/bin/dmzctl" ]; }
completion_is_ours() { [ -f "$1" ] && grep -qxF "$HEADER ($PREFIX)" "$1"; }

install_venv() {
  [ -x /usr/bin/python3 ] || die "Debian's /usr/bin/python3 is missing (apt-get install python3)"
  /usr/bin/python3 -c 'import libvirt, nftables, venv' 2>/dev/null \
    || die "Debian's python3 cannot import libvirt, nftables and venv: install python3-libvirt python3-nftables python3-venv"
  if ! "$PREFIX/bin/python" -c 'import libvirt, nftables' 2>/dev/null; then
    [ -e "$PREFIX" ] && rm -rf "$PREFIX"
    say "creating the virtual environment $PREFIX (Debian's python3, --system-site-packages)"
    /usr/bin/python3 -m venv --system-site-packages "$PREFIX" || die "python3 -m venv $PREFIX failed"
  fi
  echo "source=$SRC" >"$PREFIX/$MARK"
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' EXIT
  for part in pyproject.toml setup.py README.md dmzctl xml systemd; do
    [ -e "$SRC/$part" ] || die "$SRC is not a dmzctl checkout ($part is missing)"
  done
  # A copy to build from: pip builds in the tree it is given, and the clone stays untouched.
  tar -C "$SRC" --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml setup.py README.md dmzctl xml systemd \
    | tar -C "$stage" -xf -
  say "installing dmzctl from $SRC into $PREFIX"
  if ! (cd / && "$PREFIX/bin/pip" install -q --disable-pip-version-check --no-warn-script-location "$stage" \
        >"$stage/.pip.log" 2>&1); then
    grep -v 'is ignored: it is neither' "$stage/.pip.log" | tail -n 15 >&2
    die "pip could not install dmzctl into $PREFIX (its last lines above)"
  fi
  local where
  where="$(cd / && "$PREFIX/bin/python" -I -c 'import dmzctl; print(dmzctl.__file__)')" \
    || die "the installed dmzctl does not import"
  case "$where" in "$PREFIX"/*) ;; *) die "the installed python imports dmzctl from $where, not from $PREFIX" ;; esac
}

# Before anything is changed: every destination is free or already this install's.
preflight() {
  local link="$BIN_DIR/dmzctl" completion="$COMPLETION_DIR/dmzctl"
  if [ -e "$PREFIX" ] && ! ours && [ -n "$(ls -A "$PREFIX" 2>/dev/null)" ]; then
    die "$PREFIX exists and is not a dmzctl install (no $PREFIX/$MARK): choose another --prefix"
  fi
  if { [ -e "$link" ] || [ -L "$link" ]; } && ! link_is_ours "$link"; then
    [ -L "$link" ] || die "$link exists and is not a link to an installed dmzctl: move it away first"
    die "$link links to $(readlink "$link"), another install: uninstall that one first (its --prefix)"
  fi
  if [ -e "$completion" ] && ! completion_is_ours "$completion"; then
    die "$completion exists and is not this install's bash completion: move it away first"
  fi
}

install_link() {
  local link="$BIN_DIR/dmzctl"
  if link_is_ours "$link"; then say "$link already links to $PREFIX/bin/dmzctl"; return; fi
  mkdir -p "$BIN_DIR"
  ln -s "$PREFIX/bin/dmzctl" "$link"
  say "linked $link -> $PREFIX/bin/dmzctl"
}

install_completion() {
  local target="$COMPLETION_DIR/dmzctl" script
  script="$(cd / && _DMZCTL_COMPLETE=source_bash "$PREFIX/bin/dmzctl")" \
    || die "the installed dmzctl did not print its bash completion"
  case "$script" in *"complete -o default -F"*) ;; *) die "the installed dmzctl printed no bash completion" ;; esac
  mkdir -p "$COMPLETION_DIR"
  printf '%s\n%s\n' "$HEADER ($PREFIX)" "$script" >"$target.new"
  if cmp -s "$target.new" "$target"; then
    rm -f "$target.new"; say "$target already installed"
  else
    chmod 0644 "$target.new" && mv -f "$target.new" "$target"; say "installed $target (bash completion)"
  fi
}

record() {
  {
    echo "source=$SRC"
    echo "commit=$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "link=$BIN_DIR/dmzctl"
    echo "completion=$COMPLETION_DIR/dmzctl"
    echo "hooks_dir=$HOOKS_DIR"
    echo "unit_dir=$UNIT_DIR"
  } >"$PREFIX/$MARK"
}

# `dmzctl install` of the installed copy; libvirtd looks for hooks only when it starts or reloads, so
# when it runs and the real hooks are new it is told (SIGHUP), as `dmzctl up` does when it adds them.
integrate() {
  local out="$stage/.install.out" pid
  (cd / && "$PREFIX/bin/dmzctl" install "${SYSTEMD[@]}" --hooks-dir "$HOOKS_DIR" --unit-dir "$UNIT_DIR") >"$out" \
    || { sed 's/^/install.sh: dmzctl install: /' "$out"; die "dmzctl install failed (its message above)"; }
  sed 's/^/install.sh: dmzctl install: /' "$out"
  if [ "$HOOKS_DIR" = /etc/libvirt/hooks ] && grep -q '^hooks: installed' "$out"; then
    for pid in $(pgrep -x 'libvirtd|virtqemud|virtnetworkd' || true); do
      kill -HUP "$pid" && say "told $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid) to read the new hooks (SIGHUP)"
    done
  fi
}

do_install() {
  local began=$SECONDS
  preflight
  if [ "$PACKAGES" = yes ]; then
    # shellcheck source=scripts/packages.sh
    . "$SRC/scripts/packages.sh"
    install_packages "${HOST_PACKAGES[@]}" || die "apt-get could not install dmzctl's Debian packages"
  fi
  install_venv
  record
  install_link
  install_completion
  integrate
  say "dmzctl installed in $PREFIX in $((SECONDS - began)) s ($(du -sh "$PREFIX" | cut -f1)); run: dmzctl --help"
  case ":$PATH:" in *":$BIN_DIR:"*) ;; *) say "note: $BIN_DIR is not on this shell's PATH" ;; esac
}

# The hooks and units are removed only when they run this PREFIX's dmzctl: another install's stay.
uninstall_integration() {
  local hook unit flags=() ours_hooks=no ours_units=no
  for hook in "$HOOKS_DIR"/qemu.d/dmzctl "$HOOKS_DIR"/network.d/dmzctl; do
    [ -f "$hook" ] || continue
    if head -n 1 "$hook" | grep -q "^#!$PREFIX/bin/python"; then ours_hooks=yes
    else say "left $hook: it runs $(head -n 1 "$hook" | cut -c3- | cut -d' ' -f1), not $PREFIX"; fi
  done
  for unit in "$UNIT_DIR"/dmzctl.service "$UNIT_DIR"/dmzctl-guard.service; do
    [ -f "$unit" ] || continue
    if grep -q "$PREFIX/bin/dmzctl" "$unit"; then ours_units=yes; else say "left $unit: it runs another dmzctl"; fi
  done
  [ "$ours_hooks" = yes ] && flags+=(--hooks) || flags+=(--no-hooks)
  [ "$ours_units" = yes ] && flags+=(--systemd) || flags+=(--no-systemd)
  [ "$ours_hooks$ours_units" = nono ] && return 0
  if [ -x "$PREFIX/bin/dmzctl" ] && (cd / && "$PREFIX/bin/dmzctl" install --uninstall "${flags[@]}" \
        --hooks-dir "$HOOKS_DIR" --unit-dir "$UNIT_DIR") | sed 's/^/install.sh: dmzctl install: /'; then
    return 0
  fi
  # The installed dmzctl does not run any more: the same files, by hand.
  if [ "$ours_hooks" = yes ]; then
    rm -f "$HOOKS_DIR"/qemu.d/dmzctl "$HOOKS_DIR"/network.d/dmzctl; say "removed the hooks in $HOOKS_DIR"
  fi
  if [ "$ours_units" = yes ]; then
    rm -f "$UNIT_DIR"/dmzctl.service "$UNIT_DIR"/dmzctl-guard.service; say "removed the units in $UNIT_DIR"
  fi
}

do_uninstall() {
  local link completion
  ours || say "no dmzctl install recorded at $PREFIX ($PREFIX/$MARK): removing what still points at it"
  link="$(recorded link "$BIN_DIR/dmzctl")"
  completion="$(recorded completion "$COMPLETION_DIR/dmzctl")"
  HOOKS_DIR="$(recorded hooks_dir "$HOOKS_DIR")"
  UNIT_DIR="$(recorded unit_dir "$UNIT_DIR")"
  uninstall_integration
  if completion_is_ours "$completion"; then rm -f "$completion"; say "removed $completion"; fi
  if link_is_ours "$link"; then rm -f "$link"; say "removed $link"; fi
  if ours; then rm -rf "$PREFIX"; say "removed $PREFIX"; fi
  say "kept the configs (/etc/dmzctl), dmzctl's state (/var/lib/dmzctl) and every libvirt volume and pool"
}

"do_$ACTION"
