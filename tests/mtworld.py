"""A DMZ with a namespace standing in for its VM, for the metrics and blocked-log tests.

Everything is named `mt-` and lives on this machine only:
  mt-m      the DMZ: bridge mt-m0, 10.225.0.0/24 + fdd0:225::/64 (host .1), network, nwfilters and
            table brought up as `up` does, the VM never started (netns.dmz_up_without_vms)
  mt-web    the VM's stand-in: a namespace on mt-m0 with the VM's configured MAC and addresses (the
            anti-spoof nwfilter binds libvirt's tap devices only, not this veth)
  mt-lan    the protected LAN: 10.240.0.10 and .53 (+ fdd0:240::10), the host's side 10.240.0.1 /
            fdd0:240::1, so that whatever the table accepts towards it stays on this machine
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import netns
from dmzctl.config import load_dmz
from netns import Node, ip

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "mt-"
VM_MAC = "52:54:00:22:50:10"
VM_IP, VM_IP6 = "10.225.0.10", "fdd0:225::10"
LAN_IP, LAN_DNS, LAN_IP6 = "10.240.0.10", "10.240.0.53", "fdd0:240::10"
GATEWAY = "10.225.0.1"
FORGED = "10.99.0.5"  # a source outside the DMZ subnet, added to the VM's namespace to send from

CONFIG = f"""
[dmz]
name = "mt-m"
bridge = "mt-m0"
gateway = "{GATEWAY}/24"
gateway6 = "fdd0:225::1/64"
protected = ["10.240.0.0/24", "fdd0:240::/64"]
log_rate = "100/second"
log_burst = 100

[[dmz.allow]]
to = "{LAN_DNS}"
proto = "udp"
port = 53

[[vm]]
name = "mt-web"
kernel = "/nonexistent/dmzctl-test/never-started"
memory = 128
ip = "{VM_IP}"
ip6 = "{VM_IP6}"
mac = "{VM_MAC}"
graphics = "none"
autostart = false
"""


def dmzctl(*args: str, env=None, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dmzctl.cli", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"dmzctl {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def _node(name: str, addresses: list[str], gateways: list[str]) -> Node:
    node = Node(name, addresses, gateways, f"{PREFIX}{name}-h")
    node.netns = PREFIX + name
    return node


def _network_defined(name: str) -> bool:
    return netns.run(["virsh", "-q", "-c", "qemu:///system", "net-info", name], check=False).returncode == 0


def cleanup_stale() -> None:
    for name in netns.netns_list():
        if name.startswith(PREFIX):
            ip("netns", "del", name, check=False)
    for path in Path("/sys/class/net").iterdir():
        if path.name.startswith(PREFIX) and path.name.endswith("-h"):
            ip("link", "del", path.name, check=False)


def leftovers() -> list[str]:
    found = [f"netns {n}" for n in netns.netns_list() if n.startswith(PREFIX)]
    return found + [f"link {p.name}" for p in Path("/sys/class/net").iterdir() if p.name.startswith(PREFIX)]


class Site:
    def __init__(self, workdir: Path):
        self.config = workdir / "mt-m.toml"
        self.config.write_text(CONFIG)
        self.dmz = load_dmz(self.config)
        self.nodes: list[Node] = []

    def __enter__(self) -> "Site":
        cleanup_stale()
        netns.dmz_down(self.dmz)
        try:
            self.lan = _node("lan", [f"{LAN_IP}/24", f"{LAN_DNS}/24", f"{LAN_IP6}/64"], ["10.240.0.1", "fdd0:240::1"])
            self.nodes.append(self.lan)
            self.lan.create(host_addresses=["10.240.0.1/24", "fdd0:240::1/64"])
            netns.dmz_up_without_vms(self.dmz)
            self.vm = _node("web", [f"{VM_IP}/24", f"{VM_IP6}/64"], [GATEWAY, "fdd0:225::1"])
            self.nodes.append(self.vm)
            self.vm.create(bridge=self.dmz.bridge)
            ip("-n", self.vm.netns, "link", "set", "eth0", "address", VM_MAC)
            self.vm.add_address(f"{FORGED}/32")
            assert netns.wait_until(lambda: self.vm.port_state() in ("3", None), 20), "the bridge port never forwarded"
            self.warm_up()
        except BaseException:
            self.close()
            raise
        return self

    def warm_up(self) -> None:
        """The hole answers (port unreachable from the LAN) once the path forwards."""
        spec = {"id": "warm", "proto": "udp", "dst": LAN_DNS, "port": 53, "timeout": 0.5, "src": VM_IP}
        assert netns.wait_until(lambda: self.probe([spec])[0]["observed"] != "timeout", 20, 0.2), \
            "the DMZ never reached its hole"
        # IPv6: the gateway's address is tentative (DAD) until shortly after the first port comes up,
        # and nothing on the way answers a probe: wait until the VM's namespace knows its gateway.
        spec6 = {"id": "warm6", "proto": "udp", "dst": "fdd0:225::1", "port": 9, "timeout": 0.3}

        def gateway6_known() -> bool:
            self.probe([spec6])
            out = ip("-n", self.vm.netns, "-6", "neigh", "show", "fdd0:225::1", check=False).stdout
            return any(state in out for state in ("REACHABLE", "STALE", "DELAY", "PROBE"))

        assert netns.wait_until(gateway6_known, 20, 0.2), "the DMZ's IPv6 gateway never answered"

    def probe(self, specs: list[dict]) -> list[dict]:
        self.probe_results = netns.probe(self.vm, specs)
        return self.probe_results

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            # destroy also refreshes the other DMZs on this machine (their tables and filters): a
            # failure there (another session's DMZ) is not this test's, once this DMZ is gone.
            netns.dmz_down(self.dmz)
        except Exception:
            if netns.dmz_exists(self.dmz) or _network_defined(self.dmz.name):
                raise
        finally:
            for node in self.nodes:
                node.destroy()
            self.nodes = []
