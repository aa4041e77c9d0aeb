#!/bin/bash
# build-test-guest.sh - build a tiny libvirt test guest (kernel + initramfs)
# from Debian packages only: the Debian cloud kernel, busybox-static and,
# for the UDP echo service, the host's perl from perl-base (Essential).
#
# Output: ${DMZCTL_GUEST_CACHE:-/var/cache/dmzctl/test-guest}/<key>/
#   kernel       uncompressed vmlinux (PVH ELF) or, as fallback, the bzImage
#   initrd.img   gzip'ed cpio (newc) with busybox, modules, /init
#   cmdline-base recommended base kernel command line
#   build-info   KEY=VALUE facts about the build (kernel type, versions, ...)
# The last line on stdout is the absolute output directory; logs go to stderr.
# A complete build for the same key is reused without doing anything.
#
# Environment:
#   DMZCTL_GUEST_CACHE    cache root (default /var/cache/dmzctl/test-guest)
#   DMZCTL_GUEST_KERNEL   vmlinux (default) or vmlinuz
#   DMZCTL_GUEST_UDP_ECHO perl (default when /usr/bin/perl exists) or none
#
# Runs as root on Debian 12; needs apt, dpkg-deb, gzip; lz4 is used from the
# host or, if absent, from a downloaded lz4 package.
set -euo pipefail
umask 022
export LC_ALL=C

log() { printf 'build-test-guest: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

SELF=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SELF")
INIT_SRC="$SCRIPT_DIR/guest-init.sh"
[ -r "$INIT_SRC" ] || die "missing $INIT_SRC"

CACHE_ROOT=${DMZCTL_GUEST_CACHE:-/var/cache/dmzctl/test-guest}
case "$CACHE_ROOT" in /*) ;; *) CACHE_ROOT="$PWD/$CACHE_ROOT" ;; esac
KERNEL_WANT=${DMZCTL_GUEST_KERNEL:-vmlinux}
case "$KERNEL_WANT" in vmlinux|vmlinuz) ;; *) die "DMZCTL_GUEST_KERNEL must be vmlinux or vmlinuz" ;; esac
if [ -n "${DMZCTL_GUEST_UDP_ECHO:-}" ]; then
    UDP_ECHO=$DMZCTL_GUEST_UDP_ECHO
elif [ -x /usr/bin/perl ]; then
    UDP_ECHO=perl
else
    UDP_ECHO=none
fi
case "$UDP_ECHO" in perl|none) ;; *) die "DMZCTL_GUEST_UDP_ECHO must be perl or none" ;; esac

# Modules the guest loads (dependencies are added from modinfo depends=).
MODULES="virtio_pci virtio_net virtio_blk button evdev"
CMDLINE_BASE="console=ttyS0 quiet cryptomgr.notests"

# apt-get update only when resolving or downloading fails; then start over
# once (re-exec), as the candidate versions and so the cache key may change.
apt_update_and_retry() {
    [ -z "${DMZCTL_GUEST_APT_UPDATED:-}" ] || die "$1 (even after apt-get update)"
    log "$1; running apt-get update and starting over"
    apt-get update -q >&2 || log "apt-get update failed"
    [ -n "${TMP:-}" ] && rm -rf "$TMP"
    DMZCTL_GUEST_APT_UPDATED=1 exec "$SELF"
}

candidate() {  # print the candidate version of package $1 (empty if none)
    apt-cache policy "$1" 2>/dev/null | awk '/^  Candidate:/ {print $2; exit}' | sed 's/^(none)$//'
}

# Candidate versions: the kernel package the metapackage linux-image-cloud-amd64
# depends on, and busybox-static. One apt-cache call (~1 s without pkgcache.bin).
resolve_versions() {
    local info dep re='(linux-image-[0-9][^ ,]*-cloud-amd64)( \(= ([^)]*)\))?'
    info=$(apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static 2>/dev/null) || return 1
    dep=$(printf '%s\n' "$info" | awk '/^Package:/ {p = $2} p == "linux-image-cloud-amd64" && /^Depends:/ {print; exit}')
    [[ $dep =~ $re ]] || return 1
    KPKG=${BASH_REMATCH[1]}
    KPKG_VER=${BASH_REMATCH[3]}
    [ -n "$KPKG_VER" ] || KPKG_VER=$(candidate "$KPKG")
    BB_VER=$(printf '%s\n' "$info" | awk '/^Package:/ {p = $2} p == "busybox-static" && /^Version:/ {print $2; exit}')
    [ -n "$KPKG_VER" ] && [ -n "$BB_VER" ]
}

# Memo of the resolution, valid while apt's lists and configuration are unchanged:
# keeps the cached path fast (no apt-cache call).
apt_fingerprint() {
    { stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* /etc/apt/sources.list \
        /etc/apt/sources.list.d/* /etc/apt/preferences /etc/apt/preferences.d/* 2>/dev/null || true; } |
        sha256sum | cut -c1-16
}
MEMO="$CACHE_ROOT/.resolved-$(apt_fingerprint)"
if [ -z "${DMZCTL_GUEST_APT_UPDATED:-}" ] && [ -r "$MEMO" ] && . "$MEMO" && [ -n "${KPKG:-}" ] && [ -n "${KPKG_VER:-}" ] && [ -n "${BB_VER:-}" ]; then
    :
else
    resolve_versions ||
        apt_update_and_retry "cannot resolve linux-image-cloud-amd64 / busybox-static versions via apt-cache"
    mkdir -p "$CACHE_ROOT"
    chmod 0755 "$CACHE_ROOT"
    rm -f "$CACHE_ROOT"/.resolved-*
    printf 'KPKG=%q\nKPKG_VER=%q\nBB_VER=%q\n' "$KPKG" "$KPKG_VER" "$BB_VER" > "$MEMO"
fi
KREL=${KPKG#linux-image-}   # e.g. 6.1.0-56-cloud-amd64

UDP_DESC=none
if [ "$UDP_ECHO" = perl ]; then
    [ -x /usr/bin/perl ] || die "DMZCTL_GUEST_UDP_ECHO=perl but /usr/bin/perl is missing"
    UDP_DESC="perl-base=$(dpkg-query -W -f='${Version}' perl-base 2>/dev/null || echo unknown)"
fi

INIT_SHA=$(sha256sum "$INIT_SRC" | cut -d' ' -f1)
SELF_SHA=$(sha256sum "$SELF" | cut -d' ' -f1)
MANIFEST="kernel-package=$KPKG
kernel-package-version=$KPKG_VER
busybox-static=$BB_VER
kernel-format=$KERNEL_WANT
udp-echo=$UDP_DESC
guest-init-sha256=$INIT_SHA
build-script-sha256=$SELF_SHA"
KEY=$(printf '%s\n' "$MANIFEST" | sha256sum | cut -c1-16)
OUT="$CACHE_ROOT/$KEY"

is_complete() {
    [ -f "$1/.complete" ] && [ -s "$1/kernel" ] && [ -s "$1/initrd.img" ] && [ -s "$1/cmdline-base" ]
}

check_traversable() {  # QEMU (user libvirt-qemu) must reach the files
    local d=$1
    while [ "$d" != / ] && [ -n "$d" ]; do
        if [ -d "$d" ] && [ "$(( 0$(stat -c %a "$d") & 1 ))" = 0 ]; then
            log "WARNING: $d is not world-searchable; QEMU (libvirt-qemu) will not be able to open the kernel"
        fi
        d=$(dirname "$d")
    done
}

if is_complete "$OUT"; then
    log "cached build $OUT"
    check_traversable "$OUT"
    printf '%s\n' "$OUT"
    exit 0
fi

# --- build -----------------------------------------------------------------
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

T0=$(date +%s.%N)
TMP=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")  # same file system as $OUT: atomic mv
trap 'rm -rf "$TMP"' EXIT
log "building $KEY: $KPKG=$KPKG_VER busybox-static=$BB_VER kernel=$KERNEL_WANT udp-echo=$UDP_DESC"

DL="$TMP/debs"; X="$TMP/x"; R="$TMP/root"; O="$TMP/out"
mkdir -p "$DL" "$X" "$R" "$O"

download() {  # download packages "$@" (name=version) into $DL
    (cd "$DL" && apt-get download -q -o APT::Sandbox::User=root "$@" >&2)
}
PKGS=("$KPKG=$KPKG_VER" "busybox-static=$BB_VER")
LZ4=$(command -v lz4 || true)
if [ "$KERNEL_WANT" = vmlinux ] && [ -z "$LZ4" ]; then
    LZ4_VER=$(candidate lz4)
    [ -n "$LZ4_VER" ] && PKGS+=("lz4=$LZ4_VER")
fi
download "${PKGS[@]}" || apt_update_and_retry "apt-get download ${PKGS[*]} failed"

for deb in "$DL"/*.deb; do
    dpkg-deb -x "$deb" "$X"
done
[ -z "$LZ4" ] && [ -x "$X/usr/bin/lz4" ] && LZ4="$X/usr/bin/lz4"

BB="$X/bin/busybox"
[ -x "$BB" ] || die "busybox-static did not provide /bin/busybox"
VMLINUZ="$X/boot/vmlinuz-$KREL"
[ -s "$VMLINUZ" ] || die "kernel package did not provide boot/vmlinuz-$KREL"
MODDIR="$X/lib/modules/$KREL"
[ -d "$MODDIR" ] || die "kernel package did not provide lib/modules/$KREL"

# --- kernel: extract the vmlinux (PVH entry) from the bzImage payload --------
extract_vmlinux() {  # $1 bzImage, $2 output
    local bz=$1 out=$2 setup_sects poff plen off magic size
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    [ "$setup_sects" = 0 ] && setup_sects=4
    read -r poff plen < <(od -An -tu4 -j $((0x248)) -N8 "$bz")
    off=$(( (setup_sects + 1) * 512 + poff ))
    magic=$(od -An -tx1 -j "$off" -N4 "$bz" | tr -d ' ')
    payload() { tail -c +$((off + 1)) "$bz" | head -c "$plen"; }
    case "$magic" in
        02214c18) [ -n "$LZ4" ] || { log "no lz4 decompressor"; return 1; }
                  payload | "$LZ4" -dc > "$out" 2>/dev/null || true ;;  # trailing size word -> rc 1
        1f8b*)    payload | gzip -dc > "$out" 2>/dev/null || true ;;
        fd377a58) payload | xz -dc > "$out" 2>/dev/null || true ;;
        28b52ffd) payload | zstd -dcq > "$out" 2>/dev/null || true ;;
        *) log "unknown kernel payload compression (magic $magic)"; return 1 ;;
    esac
    # the payload ends with the uncompressed size (little-endian u32)
    size=$(payload | tail -c 4 | od -An -tu4 | tr -d ' ')
    [ "$(stat -c %s "$out")" = "$size" ] || { log "vmlinux size mismatch"; return 1; }
    [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { log "vmlinux is not ELF"; return 1; }
    # XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) = PVH entry point, what QEMU needs
    if command -v readelf >/dev/null; then
        readelf -n "$out" 2>/dev/null | grep -q 'Unknown note type: (0x00000012)' ||
            { log "vmlinux has no PVH entry note"; return 1; }
    fi
}

KTYPE=vmlinuz
if [ "$KERNEL_WANT" = vmlinux ]; then
    if extract_vmlinux "$VMLINUZ" "$O/kernel"; then
        KTYPE=vmlinux
    else
        log "WARNING: could not extract vmlinux, using the bzImage (boots ~0.5 s slower)"
        rm -f "$O/kernel"
    fi
fi
[ "$KTYPE" = vmlinuz ] && cp "$VMLINUZ" "$O/kernel"

# --- initramfs -------------------------------------------------------------
mkdir -p "$R"/{bin,dev,etc,lib,proc,sys,run,tmp,root,www,usr} "$R/lib/modules/$KREL"
chmod 1777 "$R/tmp"
ln -s ../bin "$R/sbin"; ln -s ../bin "$R/usr/bin"; ln -s ../bin "$R/usr/sbin"
cp "$BB" "$R/bin/busybox"
for applet in $("$BB" --list); do
    case "$applet" in busybox|linuxrc) continue ;; esac
    ln -sf busybox "$R/bin/$applet"
done

# modules: map module name -> file (names treat - and _ alike)
declare -A MODFILE=() MODDONE=()
while IFS= read -r f; do
    n=${f##*/}; n=${n%.ko}; MODFILE[${n//-/_}]=$f
done < <(find "$MODDIR" -name '*.ko')
ORDER=()
add_module() {
    local m=${1//-/_} dep deps f
    [ -n "${MODDONE[$m]:-}" ] && return 0
    f=${MODFILE[$m]:-}
    [ -n "$f" ] || die "module $m not found in $KPKG (built-in modules need not be listed)"
    MODDONE[$m]=1
    deps=$(tr '\0' '\n' < "$f" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do add_module "$dep"; done
    ORDER+=("$m")
}
for m in $MODULES; do add_module "$m"; done
: > "$R/lib/modules/load-order"
for m in "${ORDER[@]}"; do
    rel=${MODFILE[$m]#"$MODDIR"/}
    mkdir -p "$R/lib/modules/$KREL/$(dirname "$rel")"
    cp "${MODFILE[$m]}" "$R/lib/modules/$KREL/$rel"
    echo "/lib/modules/$KREL/$rel" >> "$R/lib/modules/load-order"
done
log "modules: ${ORDER[*]}"

# UDP echo: host perl (perl-base) and its shared libraries, builtins only
copy_with_libs() {  # copy host binary $1 to $R/$2 plus its ldd libraries
    local bin=$1 dst=$2 lib
    cp -L "$bin" "$R/$dst"
    for lib in $(ldd "$bin" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}'); do
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done
}
if [ "$UDP_ECHO" = perl ]; then
    copy_with_libs /usr/bin/perl bin/perl
fi

cp "$INIT_SRC" "$R/init"
chmod 0755 "$R/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\n' > "$R/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$R/etc/hosts"

(cd "$R" && find . -mindepth 1 | sort | "$BB" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -6 -n > "$O/initrd.img"

# --- metadata, permissions, publish ------------------------------------------
echo "$CMDLINE_BASE" > "$O/cmdline-base"
{
    echo "KEY=$KEY"
    echo "KERNEL_PACKAGE=$KPKG"
    echo "KERNEL_PACKAGE_VERSION=$KPKG_VER"
    echo "KERNEL_RELEASE=$KREL"
    echo "KERNEL_TYPE=$KTYPE"
    echo "BUSYBOX_VERSION=$BB_VER"
    echo "UDP_ECHO=$UDP_DESC"
    echo "MODULES=${ORDER[*]}"
    echo "GUEST_INIT_SHA256=$INIT_SHA"
    echo "BUILD_SCRIPT_SHA256=$SELF_SHA"
} > "$O/build-info"
touch "$O/.complete"
chmod 0755 "$O"
chmod 0644 "$O"/* "$O/.complete"

rm -rf "$OUT"   # an incomplete leftover, if any
mv "$O" "$OUT"
log "built $OUT in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s" \
    "(kernel=$KTYPE $(stat -c %s "$OUT/kernel") bytes, initrd $(stat -c %s "$OUT/initrd.img") bytes)"
printf '%s\n' "$OUT"
