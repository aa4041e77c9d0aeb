#!/usr/bin/env bash
# The main job: set up this machine, bring up the demo DMZ (examples/demo.toml)
# with a tiny VM, and show that it is isolated: from inside the VM, the "LAN"
# and the host are unreachable except for the one DNS hole, while the LAN
# reaches the VM. Everything stays on this machine: the LAN is a network
# namespace this script creates. It ends by writing the demo's one-page report
# (/var/lib/dmzctl/demo-report.html).
#   scripts/demo.sh          bring it up and show it (leaves it running)
#   scripts/demo.sh --down   take it all down again
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=examples/demo.toml
LAN_NS=dmzdemo-lan
DMZCTL=.venv/bin/dmzctl
GUEST_IP=10.213.0.10

lan_down() {
  ip netns pids "$LAN_NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$LAN_NS" 2>/dev/null || true
  ip link del dmzdemo-lan0 2>/dev/null || true
}

if [ "${1:-}" = "--down" ]; then
  "$DMZCTL" destroy "$CONFIG"
  lan_down
  exit 0
fi

scripts/setup.sh
guest="$(scripts/build-test-guest.sh)"
install -d -m 0755 /var/lib/dmzctl /var/lib/dmzctl/demo
install -m 0644 "$guest/kernel" /var/lib/dmzctl/demo/kernel
install -m 0644 "$guest/initrd.img" /var/lib/dmzctl/demo/initrd.img

echo "== the LAN: namespace $LAN_NS, protected 10.214.0.0/24 and fdd0:214::/64"
lan_down
ip netns add "$LAN_NS"
ip link add dmzdemo-lan0 type veth peer name lan0 netns "$LAN_NS"
ip addr add 10.214.0.1/24 dev dmzdemo-lan0
ip -6 addr add fdd0:214::1/64 dev dmzdemo-lan0 nodad
ip link set dmzdemo-lan0 up
ip netns exec "$LAN_NS" sh -c '
  ip link set lo up; ip link set lan0 up
  ip addr add 10.214.0.10/24 dev lan0; ip addr add 10.214.0.53/24 dev lan0
  ip -6 addr add fdd0:214::10/64 dev lan0 nodad
  ip route add default via 10.214.0.1; ip -6 route add default via fdd0:214::1'
# A web server and a "DNS server" (TCP 53) on the LAN, for the VM to try.
ip netns exec "$LAN_NS" busybox httpd -p 80 -h /var/lib/dmzctl/demo </dev/null >/dev/null 2>&1 &
ip netns exec "$LAN_NS" busybox nc -ll -p 53 -e /bin/echo dns-answer </dev/null >/dev/null 2>&1 &
sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1

echo "== dmzctl up $CONFIG"
"$DMZCTL" up "$CONFIG"

echo "== waiting for the VM to boot"
for _ in $(seq 1 120); do
  grep -q "DMZGUEST READY" /var/log/libvirt/qemu/demo-web-serial.log 2>/dev/null && break
  sleep 0.5
done
grep "DMZGUEST" /var/log/libvirt/qemu/demo-web-serial.log

in_vm() {  # run a command inside the VM through its test command server
  .venv/bin/python - "$GUEST_IP" "$1" <<'PY'
import socket, sys
with socket.create_connection((sys.argv[1], 7777), timeout=30) as s:
    s.sendall(sys.argv[2].encode() + b"\n")
    out = b""
    while chunk := s.recv(4096):
        out += chunk
print(out.decode().strip().splitlines()[-1])
PY
}
probe() {  # probe DESCRIPTION EXPECT COMMAND
  result=$(in_vm "$3")
  if [ "$result" = "EXIT 0" ]; then got=reached; else got=blocked; fi
  if [ "$got" = "$2" ]; then mark=ok; else mark=UNEXPECTED; fail=1; fi
  printf '  %-48s expected %-8s got %-8s %s\n' "$1" "$2" "$got" "$mark"
}
fail=0
echo "== from inside the DMZ VM"
probe "LAN web server 10.214.0.10:80 (tcp)"   blocked "nc -w 2 10.214.0.10 80 </dev/null"
probe "LAN host 10.214.0.10 (ping)"           blocked "ping -c 1 -W 2 10.214.0.10"
probe "LAN host fdd0:214::10 (ping6)"         blocked "ping6 -c 1 -W 2 fdd0:214::10"
probe "LAN DNS server 10.214.0.53:80 (tcp)"   blocked "nc -w 2 10.214.0.53 80 </dev/null"
probe "LAN DNS server 10.214.0.53:53 (hole)"  reached "nc -w 2 10.214.0.53 53 </dev/null | grep -q dns-answer"
probe "host's LAN address 10.214.0.1 (ping)"  blocked "ping -c 1 -W 2 10.214.0.1"
probe "host's DMZ gateway 10.213.0.1:22 (tcp)" blocked "nc -w 2 10.213.0.1 22 </dev/null"
echo "== from the LAN"
if ip netns exec "$LAN_NS" busybox wget -q -O - "http://$GUEST_IP:8080/" >/dev/null 2>&1; then
  echo "  LAN -> VM web server $GUEST_IP:8080                 reached (expected)"
else
  echo "  LAN -> VM web server $GUEST_IP:8080                 blocked: UNEXPECTED"; fail=1
fi
echo "== dmzctl status"
"$DMZCTL" status "$CONFIG" || fail=1
if "$DMZCTL" --help | grep -q verify; then
  echo "== dmzctl verify"
  "$DMZCTL" verify "$CONFIG" --skip 192.0.2.0/24 --skip fd00::/64 || fail=1
fi
echo "== dmzctl report"
REPORT=/var/lib/dmzctl/demo-report.html
"$DMZCTL" report "$CONFIG" -o "$REPORT" || fail=1
echo
echo "The demo DMZ is up: 'virsh list', '$DMZCTL console demo-web', '$DMZCTL firewall show $CONFIG'."
echo "Its report (diagram, policy in order, live state, the verify run above): $REPORT"
echo "Take it down with: scripts/demo.sh --down"
exit "$fail"
