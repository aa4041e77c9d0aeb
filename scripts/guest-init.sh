#!/bin/sh
# guest-init.sh - /init (PID 1) of the dmzctl test guest; busybox sh.
# Built into the initramfs by build-test-guest.sh; see README-test-guest.md.
#
# Kernel command line parameters:
#   dmz.name=NAME          hostname (default: dmzguest)
#   dmz.ip=A.B.C.D/NN      static IPv4 on eth0 (without it: DHCP via udhcpc)
#   dmz.gw=A.B.C.D         IPv4 default gateway (static mode)
#   dmz.ip6=ADDR/NN        static IPv6 on eth0 (DAD is off; SLAAC stays on)
#   dmz.gw6=ADDR           IPv6 default gateway
#   dmz.dns=A.B.C.D[,...]  nameservers for /etc/resolv.conf (static mode)
#   dmz.acpi=ignore        ignore the ACPI power button (default: poweroff)
#   dmz.udp=1              start the UDP echo on 8081 (needs perl in the image;
#                          off by default: perl's start-up costs ~1 s of boot)
#   dmz.debug=1            trace this script on the console
#
# Serial console (ttyS0) lines:
#   DMZGUEST BOOT
#   DMZGUEST NET ip=<IPv4|none> ip6=<IPv6|none>   (again if a DHCP lease changes it)
#   DMZGUEST READY                               acpid + all listeners are up
#   DMZGUEST POWEROFF                            power button -> poweroff -f
#   DMZGUEST ACPI-IGNORED                        power button with dmz.acpi=ignore
#
# Services: TCP 8080 httpd (/ = "name=... ip=... ip6=..."), UDP 8081 echo (with
# dmz.udp=1), TCP 7777 command server: send one line, get its output
# (stdout+stderr) followed by "EXIT <rc>", then the connection closes.

PATH=/bin
export PATH
IFACE=eth0
ST=/run/dmz

say() { echo "DMZGUEST $*" > /dev/ttyS0; }
log() { echo "dmz-init: $*" > /dev/console; }

cur_ip4() { cat $ST/ip4 2>/dev/null || echo none; }
cur_ip6() {
    [ -s $ST/ip6 ] && { cat $ST/ip6; return; }   # the static one, if any
    a=$(ip -6 addr show dev $IFACE scope global 2>/dev/null |
        awk '$1 == "inet6" && !/tentative/ {sub("/.*", "", $2); print $2; exit}')
    echo "${a:-none}"
}

# Gratuitous ARP: the host's neighbour entry (maybe left INCOMPLETE by a
# test probing before the guest was up) and the bridge learn the guest at once.
garp() { arping -U -c 1 -w 1 -I $IFACE "$1" > /dev/null 2>&1 & }

# write the web page and print the NET line
net_announce() {
    ip4=$(cur_ip4); ip6=$(cur_ip6)
    echo "name=$(hostname) ip=$ip4 ip6=$ip6" > /www/index.html.new
    mv /www/index.html.new /www/index.html
    say "NET ip=$ip4 ip6=$ip6"
}

# --- helpers run as separate processes (wrappers exec "/init <cmd>") ---------
[ $$ = 1 ] || case "$1" in
cmd)  # command server connection: stdin/stdout are the TCP socket
    exec 2>&1
    IFS= read -r line || [ -n "$line" ] || exit 0
    line=${line%$(printf '\r')}
    cd /root
    sh -c "$line" < /dev/null
    echo "EXIT $?"
    exit 0
    ;;
dhcp)  # udhcpc event script: $2 = deconfig|bound|renew|leasefail|nak
    case "$2" in
    deconfig)
        ip -f inet addr flush dev "$interface"
        rm -f $ST/ip4
        ip link set "$interface" up
        ;;
    bound|renew)
        old=$(cur_ip4)
        [ "$old" != "$ip" ] && ip -f inet addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast $broadcast} dev "$interface" 2>/dev/null
        for r in $router; do
            ip route replace default via "$r" dev "$interface" && break
        done
        if [ -n "$dns" ]; then
            for d in $dns; do echo "nameserver $d"; done > /etc/resolv.conf
        fi
        echo "$ip" > $ST/ip4
        [ "$old" != "$ip" ] && garp "$ip"
        # after the boot-time NET line, report changes with a new NET line
        [ "$old" != "$ip" ] && [ -e $ST/net-announced ] && net_announce
        ;;
    esac
    exit 0
    ;;
acpi-power)  # run by acpid on the power button
    if [ "$(cat $ST/acpi)" = ignore ]; then
        say ACPI-IGNORED
        exit 0
    fi
    say POWEROFF
    sync
    poweroff -f
    exit 0
    ;;
*)
    echo "usage: /init cmd|dhcp EVENT|acpi-power (as PID 1: boot the guest)" >&2
    exit 2
    ;;
esac

# --- PID 1 ---------------------------------------------------------------------
mount -t devtmpfs devtmpfs /dev
exec < /dev/console > /dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p $ST
say BOOT

NAME=dmzguest IP= GW= IP6= GW6= DNS= ACPI=poweroff UDP=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    dmz.name=*) NAME=${arg#*=} ;;
    dmz.ip=*)   IP=${arg#*=} ;;
    dmz.gw=*)   GW=${arg#*=} ;;
    dmz.ip6=*)  IP6=${arg#*=} ;;
    dmz.gw6=*)  GW6=${arg#*=} ;;
    dmz.dns=*)  DNS=${arg#*=} ;;
    dmz.acpi=*) ACPI=${arg#*=} ;;
    dmz.udp=1)  UDP=1 ;;
    dmz.debug=1) set -x ;;
    esac
done
case "$ACPI" in
poweroff|ignore) ;;
*) log "unknown dmz.acpi=$ACPI, using poweroff"; ACPI=poweroff ;;
esac
echo "$ACPI" > $ST/acpi
hostname "$NAME"
echo "$NAME" > /etc/hostname

# retry "$@" every 0.05 s, at most $1 times
wait_for() {
    n=$1; shift
    until "$@"; do
        n=$((n - 1))
        [ $n -gt 0 ] || return 1
        usleep 50000
    done
}

# --- listeners ---------------------------------------------------------------------
# Started before the network: they bind to the wildcard address, and the UDP
# echo's perl start-up (~1 s of CPU under TCG) overlaps the rest of the boot.
# listening(proto hexport state): look for a listening socket in /proc/net
listening() {
    grep -qiE "^ *[0-9]+: [0-9a-f]+:$2 [0-9a-f]+:[0-9a-f]+ $3 " /proc/net/$1 /proc/net/${1}6
}
httpd -f -p 8080 -h /www &
printf '#!/bin/sh\nexec /init cmd\n' > /bin/dmz-cmd
chmod 0755 /bin/dmz-cmd
nc -ll -p 7777 -e /bin/dmz-cmd &
if [ -n "$UDP" ] && [ ! -x /bin/perl ]; then
    log "dmz.udp=1 but this image has no perl (built with DMZCTL_GUEST_UDP_ECHO=none)"
    UDP=
fi
if [ -n "$UDP" ]; then
    # UDP echo on [::]:8081 (dual stack); perl builtins only, no modules
    perl -e '
        socket(S, 10, 2, 0) or die "socket: $!";        # AF_INET6, SOCK_DGRAM
        setsockopt(S, 41, 26, pack("i", 0));            # IPV6_V6ONLY off
        bind(S, pack("S n N a16 N", 10, 8081, 0, "\0" x 16, 0)) or die "bind: $!";
        while (1) {
            my $peer = recv(S, my $buf, 65535, 0);
            send(S, $buf, 0, $peer) if defined $peer;
        }' &
fi

while read -r mod; do
    insmod "$mod" || log "insmod $mod failed"
done < /lib/modules/load-order

# --- network ---------------------------------------------------------------------
ip link set lo up
wait_for 100 test -e /sys/class/net/$IFACE || log "no $IFACE"
# no duplicate address detection: static and SLAAC addresses are usable at once
echo 0 > /proc/sys/net/ipv6/conf/$IFACE/accept_dad
ip link set $IFACE up
if [ -n "$IP" ]; then
    case "$IP" in */*) ;; *) IP=$IP/24 ;; esac
    ip addr add "$IP" dev $IFACE
    [ -n "$GW" ] && ip route replace default via "$GW" dev $IFACE
    echo "${IP%/*}" > $ST/ip4
    garp "${IP%/*}"
    if [ -n "$DNS" ]; then
        for d in $(echo "$DNS" | tr , ' '); do echo "nameserver $d"; done > /etc/resolv.conf
    fi
else
    printf '#!/bin/sh\nexec /init dhcp "$@"\n' > /bin/dmz-dhcp
    chmod 0755 /bin/dmz-dhcp
    # returns once a lease is bound (udhcpc stays in the background to renew)
    # or, after 30 unanswered discovers, goes to the background to keep trying
    udhcpc -i $IFACE -s /bin/dmz-dhcp -b -t 30 -T 1 -p /run/udhcpc.pid \
        -x "hostname:$NAME" > /dev/null 2>&1
fi
if [ -n "$IP6" ]; then
    ip -6 addr add "$IP6" dev $IFACE
    echo "${IP6%/*}" > $ST/ip6
    [ -n "$GW6" ] && ip -6 route replace default via "$GW6" dev $IFACE
fi
net_announce
touch $ST/net-announced

# --- ACPI power button -------------------------------------------------------------
# The power button is an input device (button + evdev modules); acpid reads
# /dev/input/event*, which must exist before acpid starts.
pwrbtn_ready() {
    for d in /sys/class/input/event*; do
        [ -e "$d" ] || continue
        [ -e "/dev/input/${d##*/}" ] || return 1
        grep -q "Power Button" "$d/device/name" 2>/dev/null && found=1
    done
    [ -n "$found" ]
}
found=
wait_for 60 pwrbtn_ready || log "no ACPI power button input device"
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\nexec /init acpi-power\n' > /etc/acpi/PWRF/00000080
chmod 0755 /etc/acpi/PWRF/00000080
acpid -f -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid &
ACPID=$!
acpid_ready() { ls -l /proc/$ACPID/fd 2>/dev/null | grep -q /dev/input/event; }

wait_for 100 acpid_ready || log "acpid has no input device open"
wait_for 100 listening tcp 1F90 0A || log "nothing listens on TCP 8080"
wait_for 100 listening tcp 1E61 0A || log "nothing listens on TCP 7777"
[ -n "$UDP" ] && { wait_for 100 listening udp 1F91 07 || log "nothing listens on UDP 8081"; }
say READY

# PID 1 stays here and reaps every child (also orphans) as it exits
while :; do
    sleep 3600 &
    wait
done
