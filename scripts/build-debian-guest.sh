#!/bin/bash
# build-debian-guest.sh - build a realistic Debian 12 cloud guest from Debian
# packages: debootstrap from the mirror apt already uses, then the listed
# packages at apt's candidate versions, as an ext4 root file system made
# without loop mounts (mkfs.ext4 -d) and converted to qcow2.
#
# The guest: systemd, udev, dbus, cloud-init (NoCloud allowed, systemd-networkd
# as its network renderer), openssh-server, nginx, Debian's cloud kernel. It is
# a cloud image: no SSH keys, no passwords, no SSH host keys (generated at first
# boot), an empty machine-id; a `cidata` seed configures it.
#
# Output: ${DMZCTL_DEBIAN_GUEST_CACHE:-/var/cache/dmzctl/debian-guest}/<key>/
#   disk.qcow2    the root file system (ext4 on the whole disk, label dmzctl-root);
#                 use it as the backing file of an overlay, never directly
#   vmlinuz       the kernel from the image's /boot (direct kernel boot)
#   initrd.img    the initramfs from the image's /boot
#   cmdline-base  the kernel command line: root=/dev/vda console=ttyS0
#   packages      every package in the image, "name version"
#   build-info    KEY=VALUE facts about the build
# The last line on stdout is the absolute output directory; logs go to stderr.
# A complete build for the same key is reused without doing anything.
#
# Environment:
#   DMZCTL_DEBIAN_GUEST_CACHE  cache root (default /var/cache/dmzctl/debian-guest)
#   DMZCTL_DEBIAN_GUEST_SIZE   file system size (default 2G; qcow2 stores only what is used)
#
# Runs as root on Debian 12; needs debootstrap, e2fsprogs (mkfs.ext4 -d),
# qemu-utils, util-linux (unshare).
set -euo pipefail
umask 022
export LC_ALL=C

log() { printf 'build-debian-guest: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

SELF=$(readlink -f "${BASH_SOURCE[0]}")
CACHE_ROOT=${DMZCTL_DEBIAN_GUEST_CACHE:-/var/cache/dmzctl/debian-guest}
case "$CACHE_ROOT" in /*) ;; *) CACHE_ROOT="$PWD/$CACHE_ROOT" ;; esac
FS_SIZE=${DMZCTL_DEBIAN_GUEST_SIZE:-2G}

SUITE=bookworm
# What the image holds besides debootstrap's minbase. nginx, not nginx-light:
# in bookworm nginx-light is nginx plus the echo module; nginx alone is the
# smallest real web server Debian ships with its own systemd unit.
PACKAGES="systemd-sysv udev dbus cloud-init openssh-server nginx linux-image-cloud-amd64 netbase iproute2"
CMDLINE_BASE="root=/dev/vda console=ttyS0"
LABEL=dmzctl-root

TMP=
cleanup() {
    # Every mount of the build lives in a private mount namespace that ends
    # with its process; refuse to delete anything if one is left all the same.
    [ -n "${TMP:-}" ] && [ -d "$TMP" ] || return 0
    if awk -v t="$TMP/" 'index($2, t) == 1 {found = 1} END {exit !found}' /proc/mounts; then
        log "ERROR: file systems still mounted under $TMP; not removing it"
        return 0
    fi
    rm -rf "$TMP"
}
# apt-get update only when resolving or downloading fails; then start over
# once (re-exec), as the candidate versions and so the cache key may change.
apt_update_and_retry() {
    [ -z "${DMZCTL_GUEST_APT_UPDATED:-}" ] || die "$1 (even after apt-get update)"
    log "$1; running apt-get update and starting over"
    apt-get update -q >&2 || log "apt-get update failed"
    cleanup
    trap - EXIT
    DMZCTL_GUEST_APT_UPDATED=1 exec "$SELF"
}

# Candidate versions of $PACKAGES and of the kernel package the metapackage
# linux-image-cloud-amd64 depends on. Two apt-cache calls.
resolve_versions() {
    local dep re='(linux-image-[0-9][^ ,]*-cloud-amd64)( \(= ([^)]*)\))?' pkg ver
    VERSIONS=$(apt-cache policy $PACKAGES 2>/dev/null |
        awk '/^[^ ].*:$/ {p = substr($1, 1, length($1) - 1)} /^  Candidate:/ {print p "=" $2}') || return 1
    for pkg in $PACKAGES; do
        ver=$(printf '%s\n' "$VERSIONS" | sed -n "s/^$pkg=//p")
        [ -n "$ver" ] && [ "$ver" != "(none)" ] || return 1
    done
    dep=$(apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null | awk '/^Depends:/ {print; exit}')
    [[ $dep =~ $re ]] || return 1
    KPKG=${BASH_REMATCH[1]}
    KPKG_VER=${BASH_REMATCH[3]}
    [ -n "$KPKG_VER" ] || KPKG_VER=$(apt-cache policy "$KPKG" | awk '/^  Candidate:/ {print $2; exit}')
    [ -n "$KPKG_VER" ] && [ "$KPKG_VER" != "(none)" ]
}

# Memo of the resolution, valid while apt's lists and configuration are unchanged:
# keeps the cached path fast (no apt-cache call).
apt_fingerprint() {
    { stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* /etc/apt/sources.list \
        /etc/apt/sources.list.d/* /etc/apt/preferences /etc/apt/preferences.d/* 2>/dev/null || true; } |
        sha256sum | cut -c1-16
}
MEMO="$CACHE_ROOT/.resolved-$(apt_fingerprint)"
if [ -z "${DMZCTL_GUEST_APT_UPDATED:-}" ] && [ -r "$MEMO" ] && . "$MEMO" &&
   [ -n "${VERSIONS:-}" ] && [ -n "${KPKG:-}" ] && [ -n "${KPKG_VER:-}" ]; then
    :
else
    resolve_versions || apt_update_and_retry "cannot resolve the candidate versions of $PACKAGES via apt-cache"
    mkdir -p "$CACHE_ROOT"
    chmod 0755 "$CACHE_ROOT"
    rm -f "$CACHE_ROOT"/.resolved-*
    printf 'VERSIONS=%q\nKPKG=%q\nKPKG_VER=%q\n' "$VERSIONS" "$KPKG" "$KPKG_VER" > "$MEMO"
fi
# debootstrap shapes the image too (dpkg-query: ~10 ms, no memo needed).
DEBOOTSTRAP_VER=$(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null) && [ -n "$DEBOOTSTRAP_VER" ] ||
    die "debootstrap is not installed (scripts/setup.sh installs it)"
KREL=${KPKG#linux-image-}   # e.g. 6.1.0-57-cloud-amd64

SELF_SHA=$(sha256sum "$SELF" | cut -d' ' -f1)
MANIFEST="suite=$SUITE
$VERSIONS
$KPKG=$KPKG_VER
debootstrap=$DEBOOTSTRAP_VER
fs-size=$FS_SIZE
build-script-sha256=$SELF_SHA"
KEY=$(printf '%s\n' "$MANIFEST" | sha256sum | cut -c1-16)
OUT="$CACHE_ROOT/$KEY"

is_complete() {
    [ -f "$1/.complete" ] && [ -s "$1/disk.qcow2" ] && [ -s "$1/vmlinuz" ] && [ -s "$1/initrd.img" ] &&
        [ -s "$1/cmdline-base" ]
}

check_traversable() {  # QEMU (user libvirt-qemu) must reach the files
    local d=$1
    while [ "$d" != / ] && [ -n "$d" ]; do
        if [ -d "$d" ] && [ "$(( 0$(stat -c %a "$d") & 1 ))" = 0 ]; then
            log "WARNING: $d is not world-searchable; QEMU (libvirt-qemu) will not be able to open the files"
        fi
        d=$(dirname "$d")
    done
}

# The image is a backing file only: nobody writes it. libvirt gives a backing
# file to libvirt-qemu when a VM starts and, as it may be shared, never gives it
# back; any QEMU process could then write the image every VM is built from.
own_image() {
    if [ "$(stat -c %u:%g:%a "$1/disk.qcow2")" != 0:0:444 ]; then
        log "restoring root ownership and mode 0444 of $1/disk.qcow2"
        chown 0:0 "$1/disk.qcow2"
        chmod 0444 "$1/disk.qcow2"
    fi
}

if is_complete "$OUT"; then
    log "cached build $OUT"
    own_image "$OUT"
    check_traversable "$OUT"
    printf '%s\n' "$OUT"
    exit 0
fi

# --- build -----------------------------------------------------------------
for tool in debootstrap mkfs.ext4 qemu-img unshare; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh installs it)"
done
mkdir -p "$CACHE_ROOT"
chmod 0755 "$CACHE_ROOT"
check_traversable "$CACHE_ROOT"

exec 9>"$CACHE_ROOT/.lock"
flock 9
if is_complete "$OUT"; then   # built by a concurrent run while we waited
    log "cached build $OUT"
    printf '%s\n' "$OUT"
    exit 0
fi

TMP=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")  # same file system as $OUT: atomic mv
R="$TMP/root"; O="$TMP/out"
trap cleanup EXIT
mkdir -p "$R" "$O"
T0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
log "building $KEY: $(printf '%s ' $VERSIONS)$KPKG=$KPKG_VER"

# The Debian repositories apt uses (base, updates, security), from apt itself.
REPOS=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT) $(ORIGIN) $(ARCHITECTURE)' \
    'Created-By: Packages' | awk -v s="$SUITE" '$4 == "Debian" && $5 == "amd64" &&
        ($2 == s || $2 == s "-updates" || $2 == s "-security") {print $1, $2, $3}' | sort -u)
MIRROR=$(printf '%s\n' "$REPOS" | awk -v s="$SUITE" '$2 == s && $3 == "main" {print $1; exit}')
[ -n "$MIRROR" ] || die "apt has no Debian $SUITE main repository (see /etc/apt/sources.list*)"

# Run "$@" chrooted into $R with /proc and /sys mounted in a private mount
# namespace: the mounts vanish with the command, whatever happens to it.
in_root() {
    unshare --mount --propagation private -- /bin/sh -c '
        r=$1; shift
        mount -t proc proc "$r/proc" && mount -t sysfs sysfs "$r/sys" || exit 1
        exec chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C \
            DEBIAN_FRONTEND=noninteractive "$@"' sh "$R" "$@"
}

# 1. debootstrap minbase from the base suite (in its own mount namespace too).
T1=$(date +%s.%N)
unshare --mount --propagation private -- debootstrap --variant=minbase --components=main \
    --include=debian-archive-keyring "$SUITE" "$R" "$MIRROR" >&2 ||
    apt_update_and_retry "debootstrap $SUITE from the mirror apt uses failed"
DEBOOTSTRAP_S=$(elapsed "$T1")
log "debootstrap took $DEBOOTSTRAP_S s"

# 2. The packages, at the candidate versions the key names, from the same
#    repositories and the very package lists apt has on the host.
printf '%s\n' "$REPOS" | awk '{print "deb", $1, $2, $3}' > "$R/etc/apt/sources.list"
rm -rf "$R/var/lib/apt/lists"
mkdir -p "$R/var/lib/apt/lists/partial"
cp -p /var/lib/apt/lists/*Release* /var/lib/apt/lists/*Packages* "$R/var/lib/apt/lists/"
for key in Acquire::Check-Valid-Until Acquire::Check-Date Acquire::GzipIndexes; do
    value=$(apt-config shell v "$key" | sed -n "s/^v='\(.*\)'$/\1/p")
    [ -z "$value" ] || printf '%s "%s";\n' "$key" "$value"
done > "$R/etc/apt/apt.conf.d/99dmzctl-build"
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"   # start no service in the chroot
chmod 0755 "$R/usr/sbin/policy-rc.d"
echo force-unsafe-io > "$R/etc/dpkg/dpkg.cfg.d/99dmzctl-build"
# A small initramfs: this image boots only from virtio-blk (root=/dev/vda, ext4
# is built into the cloud kernel). Debian's default (MODULES=most) makes a
# 15 MB initramfs that loads every storage driver it finds: ~4 s more boot under TCG.
mkdir -p "$R/etc/initramfs-tools/conf.d" "$R/etc/initramfs-tools/hooks"
echo MODULES=list > "$R/etc/initramfs-tools/conf.d/dmzctl.conf"
cat > "$R/etc/initramfs-tools/hooks/dmzctl" <<'EOF'
#!/bin/sh
# dmzctl's Debian guest: the root disk is virtio-blk on virtio-pci.
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk
EOF
chmod 0755 "$R/etc/initramfs-tools/hooks/dmzctl"

PINNED=$(printf '%s\n' "$VERSIONS" "$KPKG=$KPKG_VER" | tr '\n' ' ')
T1=$(date +%s.%N)
in_root apt-get -q -y -o APT::Install-Recommends=false upgrade >&2 ||
    apt_update_and_retry "apt-get upgrade in the guest failed"
# shellcheck disable=SC2086
in_root apt-get -q -y -o APT::Install-Recommends=false install $PINNED >&2 ||
    apt_update_and_retry "apt-get install in the guest failed"
INSTALL_S=$(elapsed "$T1")
log "package installation took $INSTALL_S s"

# 3. Configuration: a cloud image configured by a NoCloud seed at first boot.
mkdir -p "$R/etc/cloud/cloud.cfg.d"
cat > "$R/etc/cloud/cloud.cfg.d/99_dmzctl.cfg" <<'EOF'
# dmzctl's Debian test guest: a NoCloud seed (a `cidata` ISO or disk) configures
# it; None keeps cloud-init's defaults when there is no seed.
datasource_list: [ NoCloud, None ]
# No boot loader here (direct kernel boot): nothing for grub-dpkg to do.
grub_dpkg:
  enabled: false
# C.UTF-8 is built into glibc. cloud-init's default, en_US.UTF-8, fails here:
# Debian's locale-gen ignores the locale cloud-init names, so update-locale
# refuses it and cloud-config.service fails.
locale: C.UTF-8
system_info:
  network:
    renderers: [ networkd ]
EOF
in_root systemctl enable systemd-networkd.service >&2
# e2scrub checks ext4 file systems on LVM logical volumes; this image has no LVM
# (ext4 on the whole disk), yet its reaper holds multi-user.target ~20 s under TCG.
in_root systemctl disable e2scrub_reap.service e2scrub_all.timer >&2
# SSH host keys: cloud-init makes them on an instance's first boot (the types
# in ssh_genkeytypes); only when there is none at all (cloud-init disabled) are
# all types made before sshd starts.
mkdir -p "$R/etc/systemd/system/ssh.service.d"
cat > "$R/etc/systemd/system/ssh.service.d/10-dmzctl-host-keys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || exec /usr/bin/ssh-keygen -A'
ExecStartPre=/usr/sbin/sshd -t
EOF
printf 'LABEL=%s / ext4 defaults,errors=remount-ro 0 1\n' "$LABEL" > "$R/etc/fstab"
echo localhost > "$R/etc/hostname"
echo LANG=C.UTF-8 > "$R/etc/default/locale"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
printf '# no name servers: the network configuration provides them\n' > "$R/etc/resolv.conf"

# 4. Nothing instance-specific, nothing secret: no host keys, no machine-id,
#    no random seed, no package caches, no build settings, no logs.
rm -f "$R"/etc/ssh/ssh_host_* "$R/var/lib/dbus/machine-id" "$R/var/lib/systemd/random-seed" \
    "$R/usr/sbin/policy-rc.d" "$R/etc/apt/apt.conf.d/99dmzctl-build" "$R/etc/dpkg/dpkg.cfg.d/99dmzctl-build"
: > "$R/etc/machine-id"
in_root apt-get clean >&2
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/lib/cloud/* "$R"/tmp/* "$R"/var/tmp/* \
    "$R"/root/.bash_history "$R"/dev/*
mkdir -p "$R/var/lib/apt/lists/partial"
find "$R/var/log" -type f -exec truncate -s 0 {} +
if awk -F: '$2 ~ /^\$/ {found = 1} END {exit !found}' "$R/etc/shadow"; then
    die "the image has a password hash in /etc/shadow"
fi
find "$R/root" "$R/home" -name authorized_keys | grep -q . && die "the image has an authorized_keys file"
[ -z "$(ls "$R"/etc/ssh/ssh_host_* 2>/dev/null)" ] || die "SSH host keys left in the image"

# 5. Kernel and initramfs for direct kernel boot; the package list.
[ -s "$R/boot/vmlinuz-$KREL" ] || die "no /boot/vmlinuz-$KREL in the image"
[ -s "$R/boot/initrd.img-$KREL" ] || die "no /boot/initrd.img-$KREL in the image"
cp "$R/boot/vmlinuz-$KREL" "$O/vmlinuz"
cp "$R/boot/initrd.img-$KREL" "$O/initrd.img"
in_root dpkg-query -W -f='${Package} ${Version}\n' > "$O/packages"

# 6. The root file system without loop mounts, then qcow2 (zeros are not stored).
T1=$(date +%s.%N)
ROOT_USED=$(du -sb "$R" | cut -f1)
truncate -s "$FS_SIZE" "$TMP/root.ext4"
mkfs.ext4 -q -F -L "$LABEL" -d "$R" "$TMP/root.ext4" >&2
qemu-img convert -f raw -O qcow2 "$TMP/root.ext4" "$O/disk.qcow2"
rm -f "$TMP/root.ext4"
IMAGE_S=$(elapsed "$T1")

# --- metadata, permissions, publish ------------------------------------------
echo "$CMDLINE_BASE" > "$O/cmdline-base"
{
    echo "KEY=$KEY"
    echo "SUITE=$SUITE"
    echo "KERNEL_PACKAGE=$KPKG"
    echo "KERNEL_PACKAGE_VERSION=$KPKG_VER"
    echo "KERNEL_RELEASE=$KREL"
    echo "PACKAGES=$(printf '%s ' $VERSIONS | sed 's/ $//')"
    echo "DEBOOTSTRAP_VERSION=$DEBOOTSTRAP_VER"
    echo "FS_SIZE=$FS_SIZE"
    echo "ROOT_BYTES=$ROOT_USED"
    echo "QCOW2_BYTES=$(stat -c %s "$O/disk.qcow2")"
    echo "DEBOOTSTRAP_SECONDS=$DEBOOTSTRAP_S"
    echo "INSTALL_SECONDS=$INSTALL_S"
    echo "IMAGE_SECONDS=$IMAGE_S"
    echo "BUILD_SECONDS=$(elapsed "$T0")"
    echo "BUILD_SCRIPT_SHA256=$SELF_SHA"
} > "$O/build-info"
touch "$O/.complete"
chmod 0755 "$O"
chmod 0644 "$O"/* "$O/.complete"
chmod 0444 "$O/disk.qcow2"

rm -rf "$OUT"   # an incomplete leftover, if any
mv "$O" "$OUT"
# Older builds (~450 MB each) are of no further use: keep only this one.
for old in "$CACHE_ROOT"/????????????????; do
    [ "$old" != "$OUT" ] && [ -d "$old" ] && [[ ${old##*/} =~ ^[0-9a-f]{16}$ ]] || continue
    log "removing the older build $old"
    rm -rf "$old"
done
log "built $OUT in $(elapsed "$T0") s (debootstrap $DEBOOTSTRAP_S s, packages $INSTALL_S s," \
    "image $IMAGE_S s; root $ROOT_USED bytes, qcow2 $(stat -c %s "$OUT/disk.qcow2") bytes)"
printf '%s\n' "$OUT"
