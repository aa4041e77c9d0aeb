"""The configured ip6 reaches a real guest by DHCPv6, and only the addresses dmzctl binds are usable.

One real Debian 12 guest (scripts/build-debian-guest.sh) boots for the module. Its cloud-init
network-config says DHCP, IPv4 and IPv6, and nothing else: no address is written into the guest,
so the configured `ip6` can only have come from the DMZ network's DHCPv6 (systemd-networkd asks
because the router advertisements carry the managed flag). Its DUID is systemd's own (made from
the machine-id) and its hostname is no VM name: dnsmasq matches it by the MAC alone.

Checked from the LAN side (a namespace `v6-lan` routed by the host, the DMZ's "protected" LAN):
the configured ip6 and the EUI-64 SLAAC address answer; an address the config does not name (as a
privacy or stable-privacy address would be) does not, because the anti-spoofing filter drops what
the guest sends from it.

Names start with `v6-`; the DMZ is 10.217.0.0/24 and fdd0:217::/64, the LAN 10.218.0.0/24 and
fdd0:218::/64.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from guest import cached_build, dmzctl, serial_log, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ = "v6-deb"
VM = "v6-deb-web"
MAC = "52:54:00:21:70:10"
VM_IP, VM_IP6 = "10.217.0.10", "fdd0:217::10"
SLAAC = "fdd0:217::5054:ff:fe21:7010"      # modified EUI-64 of MAC in fdd0:217::/64
UNNAMED = "fdd0:217::bad:c0de"             # what a privacy address would be: in the prefix, not bound
LAN_NS, LAN_HOST, LAN_NS_IF = "v6-lan", "v6-lan-h", "v6-lan-n"
HOSTNAME = "v6-seeded"
USER = "dmz"
BOOT_TIMEOUT = 600               # a TCG guest on a shared, loaded 2-core machine


def seed_files(instance_id: str, public_key: str) -> dict[str, str]:
    user_data = f"""#cloud-config
users:
  - name: {USER}
    shell: /bin/bash
    lock_passwd: true
    ssh_authorized_keys:
      - {public_key}
ssh_pwauth: false
ssh_genkeytypes: [ed25519]
# An address the config does not name, as a privacy or stable-privacy address would be (the image has no sudo).
runcmd:
  - [ip, -6, addr, add, "{UNNAMED}/64", dev, eth0, nodad]
"""
    # DHCP only: whatever IPv6 address the guest ends up with came from the network.
    network_config = f"""version: 2
ethernets:
  nic0:
    match:
      macaddress: "{MAC}"
    set-name: eth0
    dhcp4: true
    dhcp6: true
    accept-ra: true
"""
    return {"user-data": user_data, "meta-data": f"instance-id: {instance_id}\nlocal-hostname: {HOSTNAME}\n",
            "network-config": network_config}


def make_seed_iso(directory: Path, files: dict[str, str]) -> Path:
    content = directory / "seed"
    content.mkdir()
    for name, text in files.items():
        (content / name).write_text(text)
    iso = directory / "seed.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-output", str(iso), "-volid", "cidata",
                    "-joliet", "-rock", str(content)], check=True, capture_output=True)
    iso.chmod(0o644)
    return iso


def write_config(directory: Path, image: Path, base: Path, seed: Path) -> Path:
    cmdline = (base / "cmdline-base").read_text().strip()
    path = directory / f"{DMZ}.toml"
    path.write_text(f"""
[dmz]
name = "{DMZ}"
bridge = "v6deb0"
gateway = "10.217.0.1/24"
gateway6 = "fdd0:217::1/64"
protected = ["10.218.0.0/24", "fdd0:218::/64"]

[[vm]]
name = "{VM}"
memory = "768MiB"
disks = [{{ path = "{image}", format = "qcow2", backing = [{{ path = "{base / 'disk.qcow2'}", format = "qcow2" }}] }}]
cdrom = "{seed}"
boot = "kernel"
kernel = "{base / 'vmlinuz'}"
initrd = "{base / 'initrd.img'}"
cmdline = "{cmdline}"
ip = "{VM_IP}"
ip6 = "{VM_IP6}"
mac = "{MAC}"
graphics = "none"
shutdown_timeout = 0
autostart = false
""")
    return path


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


def remove_lan() -> None:
    sh("ip", "netns", "del", LAN_NS, check=False)
    sh("ip", "link", "del", LAN_HOST, check=False)


def make_lan() -> None:
    """The LAN: a namespace behind a veth, routed by the host (its end holds the LAN's gateway)."""
    remove_lan()
    sh("ip", "netns", "add", LAN_NS)
    sh("ip", "link", "add", LAN_HOST, "type", "veth", "peer", "name", LAN_NS_IF, "netns", LAN_NS)
    sh("ip", "addr", "add", "10.218.0.1/24", "dev", LAN_HOST)
    sh("ip", "-6", "addr", "add", "fdd0:218::1/64", "dev", LAN_HOST, "nodad")
    sh("ip", "link", "set", LAN_HOST, "up")
    for args in (("addr", "add", "10.218.0.10/24", "dev", LAN_NS_IF),
                 ("-6", "addr", "add", "fdd0:218::10/64", "dev", LAN_NS_IF, "nodad"),
                 ("link", "set", "lo", "up"), ("link", "set", LAN_NS_IF, "up"),
                 ("route", "add", "default", "via", "10.218.0.1"),
                 ("-6", "route", "add", "default", "via", "fdd0:218::1")):
        sh("ip", "-n", LAN_NS, *args)


def from_lan(address: str, port: int, timeout: float = 3) -> bytes:
    """What the LAN side reads from a TCP connection to address:port (b"" when none is made)."""
    code = (f"import socket\ntry:\n s = socket.create_connection(({address!r}, {port}), timeout={timeout})\n"
            f" s.sendall(b'HEAD / HTTP/1.0\\r\\n\\r\\n') if {port} == 80 else None\n"
            f" print(s.recv(64).decode(errors='replace'))\nexcept OSError:\n pass\n")
    result = sh("ip", "netns", "exec", LAN_NS, "/usr/bin/python3", "-c", code, check=False)
    return result.stdout.encode()


def ssh_banner(address: str) -> bytes:
    try:
        with socket.create_connection((address, 22), timeout=3) as conn:
            return conn.recv(64)
    except OSError:
        return b""


class Guest:
    def __init__(self, directory: Path, config: Path):
        self.directory, self.config = directory, config
        self.key = directory / "id_ed25519"

    def ssh(self, command: str) -> str:
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10", "-o", "ControlMaster=auto", "-o", f"ControlPath={self.directory}/c-%C",
                "-o", "ControlPersist=300", f"{USER}@{VM_IP}", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, f"ssh {command!r}: {result.returncode}\n{result.stdout}{result.stderr}"
        return result.stdout

    def global_ip6(self) -> set[str]:
        listing = json.loads(self.ssh("ip -j -6 addr show dev eth0 scope global"))
        return {a["local"] for link in listing for a in link.get("addr_info", []) if "local" in a}


@pytest.fixture(scope="module")
def guest():
    base = cached_build("DMZCTL_DEBIAN_GUEST", "build-debian-guest.sh", "the Debian guest")
    directory = Path(tempfile.mkdtemp(prefix="v6-deb-", dir="/var/tmp"))
    directory.chmod(0o755)
    env = {"DMZCTL_EVENT_LOG": str(directory / "events.log")}
    wipe(DMZ, [VM])
    try:
        make_lan()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "v6-test", "-f",
                        str(directory / "id_ed25519")], check=True, capture_output=True)
        image = directory / f"{VM}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base / "disk.qcow2"),
                        str(image)], check=True, capture_output=True)
        image.chmod(0o644)
        key = (directory / "id_ed25519.pub").read_text().strip()
        seed = make_seed_iso(directory, seed_files(f"v6-{os.getpid()}-{int(time.time())}", key))
        config = write_config(directory, image, base, seed)
        dmzctl("up", str(config), check=True, env=env)
        started = time.monotonic()
        while not ssh_banner(VM_IP).startswith(b"SSH-"):
            if time.monotonic() - started > BOOT_TIMEOUT:
                log = serial_log(VM).read_text(errors="replace") if serial_log(VM).exists() else ""
                pytest.fail(f"no sshd on {VM_IP} within {BOOT_TIMEOUT} s; serial log tail:\n{log[-4000:]}")
            time.sleep(1)
        print(f"\n[ipv6 guest] VM started to sshd banner: {time.monotonic() - started:.1f} s")
        yield Guest(directory, config)
    finally:
        dmzctl("destroy", str(directory / f"{DMZ}.toml"), "--timeout", "0", env=env)
        wipe(DMZ, [VM])
        remove_lan()
        shutil.rmtree(directory, ignore_errors=True)
        os.chown(base / "disk.qcow2", 0, 0)  # libvirt gave the shared backing file to libvirt-qemu


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(1)


def test_the_guest_got_the_configured_ip6_by_dhcpv6_and_its_slaac_address(guest):
    try:
        addresses = wait_for(lambda: {VM_IP6, SLAAC} <= guest.global_ip6() and guest.global_ip6(), 120, "")
    except AssertionError:
        pytest.fail("the guest never had both the DHCPv6 and the SLAAC address:\n"
                    + guest.ssh("ip -6 addr show dev eth0; networkctl status eth0 --no-pager -n 30; "
                                "cat /etc/systemd/network/*.network"))
    assert addresses - {UNNAMED} == {VM_IP6, SLAAC}, addresses  # no privacy address: networkd's default
    # A lease (finite lifetime: `dynamic`), from networkd's DHCPv6 client with its own DUID (DUID-EN, made
    # from the machine-id: nothing dnsmasq could have known beforehand).
    assert VM_IP6 in guest.ssh("ip -6 -o addr show dev eth0 scope global dynamic")
    assert "DHCP6 Client DUID: DUID-EN" in guest.ssh("networkctl status eth0 --no-pager")
    conf = Path(f"/var/lib/libvirt/dnsmasq/{DMZ}.conf").read_text()
    assert "dhcp-range=fdd0:217::1,static,64" in conf and "dhcp-range=fdd0:217::1,ra-only,64" in conf, conf
    assert f"{MAC},[{VM_IP6}]" in Path(f"/var/lib/libvirt/dnsmasq/{DMZ}.hostsfile").read_text()


@pytest.mark.parametrize("address", [VM_IP6, SLAAC, VM_IP])
def test_the_lan_reaches_the_vm_at_the_addresses_dmzctl_binds(guest, address):
    wait_for(lambda: address in guest.global_ip6() or address == VM_IP, 120, f"{address} never on eth0")
    banner = wait_for(lambda: from_lan(address, 22), 30, f"the LAN never reached {address}:22")
    assert banner.startswith(b"SSH-"), banner
    assert b"nginx" in from_lan(address, 80).lower() or b"HTTP/1.1 200" in from_lan(address, 80)


def test_an_address_the_config_does_not_name_is_dropped(guest):
    """A privacy or stable-privacy address is such an address: the guest holds it (added by user-data's
    runcmd), the LAN's SYN reaches it, but the guest's answer from it never leaves its NIC (spoof6)."""
    wait_for(lambda: UNNAMED in guest.global_ip6(), 300, f"cloud-init's runcmd never added {UNNAMED}")
    assert from_lan(VM_IP6, 22).startswith(b"SSH-")  # the path itself works
    assert from_lan(UNNAMED, 22) == b""
    assert from_lan(UNNAMED, 80) == b""


def test_libvirt_lists_the_dhcpv6_lease(guest):
    listing = sh("virsh", "-q", "net-dhcp-leases", DMZ).stdout
    assert VM_IP6 in listing and VM_IP in listing, listing
