"""Network namespaces on a DMZ bridge, and the `ip`/`bridge` reads verify needs.

The one place with these side effects: a namespace attached to a bridge by a veth
pair (ProbeNamespace, removed whatever happens), a program run inside it with JSON
in and out, and the host's addresses, routes, neighbours and br_netfilter setting.
Standard library only (and dmzctl.errors): `python -m dmzctl.verify.agent` imports
its package, which imports this module, and must start fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

from ..errors import HostError


def _run(*argv: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    """A tool (ip, bridge) run to completion; with check, a failure is a one-line HostError."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise HostError(f"`{' '.join(argv)}` failed: {error}") from None
    if check and result.returncode != 0:
        raise HostError(f"`{' '.join(argv)}` failed: {'; '.join(result.stderr.strip().splitlines())}")
    return result


def _ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return _run("ip", *args, check=check, timeout=timeout)


def _addr_info(*args: str) -> list[dict]:
    """The addr_info entries `ip -j ... addr show ...` lists (none when it fails)."""
    result = _ip(*args, check=False)
    return [info for link in json.loads(result.stdout or "[]") for info in link.get("addr_info", [])]


# --- reads ------------------------------------------------------------------------

def route_of(address) -> Optional[dict]:
    """How the host routes an address (`ip -j route get`); None when it has no route."""
    result = _ip("-j", "route", "get", str(address), check=False, timeout=10)
    if result.returncode != 0:
        return None
    routes = json.loads(result.stdout or "[]")
    return routes[0] if routes else None


def host_addresses_from_ip_json(data: list, skip: Iterable = ()) -> list:
    """Global addresses from `ip -j addr`, minus loopback, link-local and the --skip prefixes."""
    skip_nets = [ipaddress.ip_network(s, strict=False) for s in skip]
    found = []
    for link in data:
        for info in link.get("addr_info", []):
            try:
                address = ipaddress.ip_address(info.get("local", ""))
            except ValueError:
                continue
            if address.is_loopback or address.is_link_local or info.get("scope") == "host":
                continue
            if any(address.version == n.version and address in n for n in skip_nets):
                continue
            if address not in found:
                found.append(address)
    return found


def read_host_addresses(skip: Iterable = ()) -> list:
    """The host's global addresses (`ip -j addr`), minus the --skip prefixes."""
    result = _ip("-j", "addr", "show", timeout=10)
    return host_addresses_from_ip_json(json.loads(result.stdout or "[]"), skip)


def read_bridge_netfilter() -> Optional[bool]:
    """Whether br_netfilter hands bridged IPv4 frames to the IP hooks (None: cannot tell)."""
    path = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not path.exists():
        return False if Path("/proc/sys/net").exists() else None
    try:
        return path.read_text().strip() == "1"
    except OSError:
        return None


def bridge_exists(bridge: str) -> bool:
    return Path(f"/sys/class/net/{bridge}/bridge").exists()


def addresses_in_use(bridge: str) -> set:
    """Addresses seen on the bridge: the host's neighbour table and libvirt's DHCP leases."""
    used: set = set()
    result = _ip("-j", "neigh", "show", "dev", bridge, check=False)
    if result.returncode == 0 and result.stdout.strip():
        for entry in json.loads(result.stdout):
            if "FAILED" in entry.get("state", []):
                continue
            try:
                used.add(ipaddress.ip_address(entry["dst"]))
            except (KeyError, ValueError):
                pass
    status = Path(f"/var/lib/libvirt/dnsmasq/{bridge}.status")
    try:
        for lease in json.loads(status.read_text() or "[]"):
            try:
                used.add(ipaddress.ip_address(lease.get("ip-address", "")))
            except ValueError:
                pass
    except (OSError, ValueError):
        pass
    return used


def _wait_settled(address, limit: float, failed: str, late: str, *where: str) -> None:
    """Wait until `address` (listed by `ip -j -6 addr show <where>`) has finished duplicate address
    detection; HostError(failed) when it failed, HostError(late) when it takes longer than limit."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        infos = [i for i in _addr_info(*where) if i.get("local") == str(address)]
        if infos and infos[0].get("dadfailed"):
            raise HostError(failed)
        if infos and not infos[0].get("tentative"):
            return
        time.sleep(0.1)
    raise HostError(late)


# --- a program in a namespace -------------------------------------------------------

def run_json(netns: str, argv: list[str], request: dict, limit: float, what: str, owner=None) -> dict:
    """Run argv in the namespace with `request` as JSON on stdin; its JSON answer from stdout.
    owner (a ProbeNamespace) holds the process meanwhile, so that removing the namespace ends it."""
    process = subprocess.Popen(["ip", "netns", "exec", netns, *argv],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if owner is not None:
        owner.child = process
    try:
        out, err = process.communicate(json.dumps(request), timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise HostError(f"{what} in namespace {netns} did not finish within {limit:.0f} s") from None
    except BaseException:  # interrupted: the program must not outlive us (nor keep its namespace alive)
        process.kill()
        process.wait()
        raise
    finally:
        if owner is not None:
            owner.child = None
    if process.returncode != 0:
        raise HostError(f"{what} in namespace {netns} failed: {err.strip()[-500:]}")
    return json.loads(out)


# --- the namespace ---------------------------------------------------------------

# A VM-like interface that takes no addresses or routes from router advertisements or redirects.
VM_LIKE_SYSCTLS = (("net.ipv6.conf.eth0.accept_ra", "0"), ("net.ipv6.conf.eth0.autoconf", "0"),
                   ("net.ipv6.conf.eth0.accept_redirects", "0"), ("net.ipv4.conf.eth0.accept_redirects", "0"))


class ProbeNamespace:
    """A namespace on the DMZ bridge standing where a VM stands; removed on exit, whatever happens."""

    def __init__(self, bridge: str, src4, prefix4: int, gateway4, src6=None, prefix6: int = 64, gateway6=None,
                 isolated: bool = False, name: Optional[str] = None):
        tag = f"{os.getpid()}"[-7:]
        self.name = name or f"dmzv-{tag}"
        self.veth = f"dmzv{tag}h"
        self.bridge = bridge
        self.src4, self.prefix4, self.gateway4 = src4, prefix4, gateway4
        self.src6, self.prefix6, self.gateway6 = src6, prefix6, gateway6
        self.isolated = isolated
        self.child: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ProbeNamespace":
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()

    def _create(self) -> None:
        if not bridge_exists(self.bridge):
            raise HostError(f"bridge {self.bridge} does not exist: is the DMZ up (dmzctl up)?")
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        _ip("link", "set", self.veth, "master", self.bridge)
        if self.isolated:  # as libvirt isolates the DMZ's VMs' ports (isolate_vms)
            _run("bridge", "link", "set", "dev", self.veth, "isolated", "on", timeout=10)
        _ip("link", "set", self.veth, "up")
        for key, value in VM_LIKE_SYSCTLS:
            self.run(["sysctl", "-q", "-w", f"{key}={value}"], check=False)
        ns = ("-n", self.name)
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "addr", "add", f"{self.src4}/{self.prefix4}", "dev", "eth0")
        if self.src6 is not None:
            _ip(*ns, "addr", "add", f"{self.src6}/{self.prefix6}", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")
        _ip(*ns, "route", "add", "default", "via", str(self.gateway4))
        if self.src6 is not None and self.gateway6 is not None:
            _wait_settled(self.src6, 10.0, f"{self.src6} is already in use in the DMZ; give another with --address6",
                          f"duplicate address detection for {self.src6} did not finish",
                          "-n", self.name, "-j", "-6", "addr", "show", "dev", "eth0")
            _ip(*ns, "-6", "route", "add", "default", "via", str(self.gateway6))

    def wait_forwarding(self, limit: Optional[float] = None) -> None:
        """The first packets through a fresh bridge port are lost while STP walks it to forwarding."""
        if limit is None:
            try:
                delay = int(Path(f"/sys/class/net/{self.bridge}/bridge/forward_delay").read_text()) / 100
            except (OSError, ValueError):
                delay = 15.0
            limit = 2 * max(delay, 2.0) + 5
        state_file = Path(f"/sys/class/net/{self.veth}/brport/state")
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                if state_file.read_text().strip() == "3":  # BR_STATE_FORWARDING
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise HostError(f"bridge port {self.veth} did not reach the forwarding state within {limit:.0f} s")

    def wait_gateway6(self, gateway6, limit: float = 10.0) -> None:
        """A bridge that had no port has no carrier: its IPv6 gateway address only now runs duplicate
        address detection, and answers no neighbour solicitation until that is done (~2 s)."""
        bridge = self.bridge
        _wait_settled(gateway6, limit, f"the DMZ gateway {gateway6} failed duplicate address detection on {bridge}",
                      f"the DMZ gateway {gateway6} is still tentative on {bridge} after {limit:.0f} s",
                      "-j", "-6", "addr", "show", "dev", bridge)

    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                                **kwargs)
        if check and result.returncode != 0:
            raise HostError(f"in namespace {self.name}: {' '.join(argv)} failed: {result.stderr.strip()}")
        return result

    def remove(self) -> None:
        # A second signal must not cut the clean-up short: hold them until it is done.
        signals = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
        held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            if self.child is not None and self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=15)
            if Path(f"/sys/class/net/{self.veth}").exists():
                subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=15)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


class OutsideNamespace(ProbeNamespace):
    """A namespace standing outside every DMZ (where the internet or the LAN stands), joined to the host
    by a veth pair and routed by it: `verify --from-outside`. No subnet is added to the host (its end
    has only the link-local 169.254.253.1/32 and fe80::1), so no DMZ's implicit blocks change; the host
    routes the namespace's one address per family to the veth. Removed on exit, whatever happens."""

    HOST4, HOST6 = "169.254.253.1", "fe80::1"

    def __init__(self, src4, src6=None, name: Optional[str] = None):
        tag = f"{os.getpid()}"[-7:]
        super().__init__("", src4, 32, self.HOST4, src6, 128, self.HOST6, name=name or f"dmzo-{tag}")
        self.veth = f"dmzo{tag}h"

    def _create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        _ip("addr", "add", f"{self.HOST4}/32", "dev", self.veth)
        _ip("-6", "addr", "add", f"{self.HOST6}/64", "dev", self.veth, "nodad")
        _ip("link", "set", self.veth, "up")
        for key, value in VM_LIKE_SYSCTLS:
            self.run(["sysctl", "-q", "-w", f"{key}={value}"], check=False)
        ns = ("-n", self.name)
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "addr", "add", f"{self.src4}/32", "dev", "eth0")
        if self.src6 is not None:
            _ip(*ns, "-6", "addr", "add", f"{self.src6}/128", "dev", "eth0", "nodad")
        _ip(*ns, "link", "set", "eth0", "up")
        _ip(*ns, "route", "add", "default", "via", self.HOST4, "dev", "eth0", "onlink")
        _ip("route", "replace", f"{self.src4}/32", "dev", self.veth)
        if self.src6 is not None:
            _ip(*ns, "-6", "route", "add", "default", "via", self.HOST6, "dev", "eth0")
            _ip("-6", "route", "replace", f"{self.src6}/128", "dev", self.veth)

    def wait_forwarding(self, limit: Optional[float] = None) -> None:
        """No bridge: the veth forwards as soon as it is up."""
