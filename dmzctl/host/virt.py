"""libvirt through libvirt-python: the only module that calls it.

Errors are classified by libvirt's error code and turned into one HostError line.
Waiting is event-driven: a lifecycle callback wakes the waiter the moment a
domain changes state; the periodic re-check only guards against a missed event.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from lxml import etree

from ..errors import HostError, OwnershipError
from ..render.base import NS

try:
    import libvirt
except ImportError:  # reported when a connection is needed, not at import
    libvirt = None

_event_loop_started = False
_event_loop_lock = threading.Lock()


def _silence_libvirt() -> None:
    # libvirt prints every error to stderr by default; dmzctl reports them itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread; must run before open()."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def describe(error: "libvirt.libvirtError") -> str:
    code = error.get_error_code()
    message = error.get_error_message() or str(error)
    # One line: libvirt passes on what a helper (tc, QEMU) printed, newlines and all.
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR) and "socket" in message:
        return f"libvirtd is not reachable ({message}); start it (libvirtd -d) or check --connect"
    if code == libvirt.VIR_ERR_AUTH_FAILED or code == libvirt.VIR_ERR_AUTH_UNAVAILABLE:
        return f"libvirt refused access ({message}); run as root or check polkit"
    return message


STATE_NAMES = {}


def state_name(state: int) -> str:
    if not STATE_NAMES and libvirt is not None:
        STATE_NAMES.update({
            libvirt.VIR_DOMAIN_NOSTATE: "no state", libvirt.VIR_DOMAIN_RUNNING: "running",
            libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
            libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
            libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
        })
    return STATE_NAMES.get(state, f"state {state}")


def owner_of(xml: str) -> Optional[str]:
    """The DMZ named in a document's dmzctl metadata, or None when dmzctl does not own it."""
    root = etree.fromstring(xml.encode())
    owned = root.find(f"metadata/{{{NS}}}*")
    return owned.get("dmz") if owned is not None else None


def digest_of(xml: str) -> Optional[str]:
    root = etree.fromstring(xml.encode())
    owned = root.find(f"metadata/{{{NS}}}*")
    return owned.get("digest") if owned is not None else None


@dataclass
class DomainInfo:
    name: str
    state: str
    running: bool
    owner: Optional[str]
    digest: Optional[str]  # of the definition (what the next start runs)
    live_digest: Optional[str]  # of what runs now; None when not running
    autostart: bool
    started_at: Optional[float]


class Virt:
    """A connection plus the calls dmzctl makes; every libvirtError becomes a HostError."""

    def __init__(self, uri: str):
        if libvirt is None:
            raise HostError("the libvirt Python binding is missing: apt-get install python3-libvirt "
                            "(and use a venv made with --system-site-packages)")
        _silence_libvirt()
        _start_event_loop()
        self.uri = uri
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as error:
            raise HostError(f"cannot connect to {uri}: {describe(error)}") from None
        self._callbacks: list[int] = []
        self._state_changed = threading.Condition()
        self._callbacks.append(self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None))

    def close(self) -> None:
        try:
            for callback in self._callbacks:
                self.conn.domainEventDeregisterAny(callback)
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _on_lifecycle(self, _conn, _dom, _event, _detail, _opaque) -> None:
        with self._state_changed:
            self._state_changed.notify_all()

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as error:
            raise HostError(f"{what}: {describe(error)}") from None

    # --- host facts -------------------------------------------------------

    def kvm_usable(self) -> bool:
        """kvm only when libvirt offers it AND the CPU can (vmx/svm) AND /dev/kvm exists."""
        with self._call("reading host capabilities"):
            caps = etree.fromstring(self.conn.getCapabilities().encode())
        offered = bool(caps.xpath("//guest/arch[@name='x86_64']/domain[@type='kvm']"))
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        cpu_can = " vmx" in flags or " svm" in flags
        return offered and cpu_can and os.path.exists("/dev/kvm")

    # --- networks ---------------------------------------------------------

    def network(self, name: str):
        try:
            return self.conn.networkLookupByName(name)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return None
            raise HostError(f"looking up network {name}: {describe(error)}") from None

    def network_xml(self, net, inactive: bool = True) -> str:
        flags = libvirt.VIR_NETWORK_XML_INACTIVE if inactive else 0
        with self._call(f"reading network {net.name()}"):
            return net.XMLDesc(flags)

    def define_network(self, xml: str):
        with self._call("defining the DMZ network"):
            return self.conn.networkDefineXML(xml)

    def start_network(self, net) -> None:
        with self._call(f"starting network {net.name()}"):
            if not net.isActive():
                net.create()
            net.setAutostart(1)

    def network_active(self, net) -> bool:
        with self._call(f"reading network {net.name()}"):
            return bool(net.isActive())

    def network_autostart(self, net) -> bool:
        with self._call(f"reading network {net.name()}"):
            return bool(net.autostart())

    def stop_network(self, net) -> None:
        with self._call(f"stopping network {net.name()}"):
            if net.isActive():
                net.destroy()

    def remove_network(self, net) -> None:
        with self._call(f"removing network {net.name()}"):
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()

    def network_of_bridge(self, bridge: str) -> Optional[str]:
        """The name of the libvirt network whose bridge is `bridge`, if any."""
        with self._call("listing networks"):
            networks = self.conn.listAllNetworks()
        for net in networks:
            try:
                if net.bridgeName() == bridge:
                    return net.name()
            except libvirt.libvirtError:
                continue
        return None

    def dhcp_leases(self, net) -> list[dict]:
        try:
            return net.DHCPLeases()
        except libvirt.libvirtError:
            return []

    # --- nwfilters --------------------------------------------------------

    def nwfilter_exists(self, name: str) -> bool:
        try:
            self.conn.nwfilterLookupByName(name)
            return True
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_NWFILTER:
                return False
            raise HostError(f"looking up nwfilter {name}: {describe(error)}") from None

    def nwfilter_xml(self, name: str) -> Optional[str]:
        try:
            return self.conn.nwfilterLookupByName(name).XMLDesc(0)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_NWFILTER:
                return None
            raise HostError(f"reading nwfilter {name}: {describe(error)}") from None

    def define_nwfilter(self, xml: str) -> None:
        name = etree.fromstring(xml.encode()).get("name")
        with self._call(f"defining nwfilter {name}"):
            self.conn.nwfilterDefineXML(xml)

    def undefine_nwfilter(self, name: str) -> None:
        try:
            self.conn.nwfilterLookupByName(name).undefine()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_NWFILTER:
                raise HostError(f"removing nwfilter {name}: {describe(error)}") from None

    def nwfilter_names(self) -> list[str]:
        with self._call("listing nwfilters"):
            return sorted(self.conn.listNWFilters())

    # --- domains ----------------------------------------------------------

    def domain(self, name: str):
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HostError(f"looking up domain {name}: {describe(error)}") from None

    def domain_xml(self, dom, inactive: bool = True) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        with self._call(f"reading domain {dom.name()}"):
            return dom.XMLDesc(flags)

    def domain_info(self, name: str) -> Optional[DomainInfo]:
        dom = self.domain(name)
        if dom is None:
            return None
        with self._call(f"reading domain {name}"):
            state, _reason = dom.state()
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else dom.XMLDesc(0)
            autostart = bool(dom.autostart()) if dom.isPersistent() else False
            running = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED,
                                libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_SHUTDOWN)
            live_digest = digest_of(dom.XMLDesc(0)) if running else None
        return DomainInfo(name=name, state=state_name(state), running=running, owner=owner_of(xml),
                          digest=digest_of(xml), live_digest=live_digest, autostart=autostart,
                          started_at=self._started_at(name) if running else None)

    @staticmethod
    def _started_at(name: str) -> Optional[float]:
        # libvirt writes the QEMU pid file when it starts the domain.
        try:
            return os.stat(f"/run/libvirt/qemu/{name}.pid").st_mtime
        except OSError:
            return None

    def define_domain(self, xml: str):
        name = etree.fromstring(xml.encode()).findtext("name")
        with self._call(f"defining domain {name}"):
            return self.conn.defineXML(xml)

    def domain_autostart(self, dom) -> bool:
        with self._call(f"reading domain {dom.name()}"):
            return bool(dom.autostart())

    def set_autostart(self, dom, enabled: bool) -> None:
        with self._call(f"setting autostart of {dom.name()}"):
            dom.setAutostart(1 if enabled else 0)

    def is_running(self, dom) -> bool:
        with self._call(f"reading domain {dom.name()}"):
            return bool(dom.isActive())

    def start_domain(self, dom, timeout: float = 120.0) -> None:
        """Start and return once libvirt reports it running."""
        with self._call(f"starting domain {dom.name()}"):
            dom.create()
        if not self.wait_for(lambda: self._state(dom) == libvirt.VIR_DOMAIN_RUNNING, timeout):
            raise HostError(f"domain {dom.name()} did not reach 'running' within {timeout:.0f} s")

    def shutdown_domain(self, dom) -> None:
        """Ask the guest to power off (ACPI power button)."""
        try:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return  # already off
            raise HostError(f"shutting down {dom.name()}: {describe(error)}") from None

    def destroy_domain(self, dom) -> None:
        try:
            dom.destroy()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running
                raise HostError(f"destroying {dom.name()}: {describe(error)}") from None

    def undefine_domain(self, dom) -> None:
        with self._call(f"undefining {dom.name()}"):
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if hasattr(libvirt, "VIR_DOMAIN_UNDEFINE_NVRAM") else 0)

    def _state(self, dom) -> int:
        """The domain's state as libvirt reports it. Only "no such domain" (a transient domain
        gone after its destroy) counts as off: any other error is no answer, never a state."""
        try:
            return dom.state()[0]
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return libvirt.VIR_DOMAIN_SHUTOFF
            raise HostError(f"reading the state of domain {dom.name()}: {describe(error)}") from None

    def is_off(self, dom) -> bool:
        return self._state(dom) in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)

    def wait_for(self, predicate: Callable[[], bool], timeout: float,
                 tick: Optional[Callable[[float], None]] = None) -> bool:
        """Wait until predicate() holds; woken by lifecycle events, re-checked at least every 0.5 s."""
        deadline = time.monotonic() + timeout
        with self._state_changed:
            while True:
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if tick is not None:
                    tick(remaining)
                self._state_changed.wait(min(remaining, 0.5))


def domains_of(virt: Virt, dmz_name: str) -> list[str]:
    """Every domain on the host whose metadata says it belongs to this DMZ."""
    names = []
    with virt._call("listing domains"):
        domains = virt.conn.listAllDomains()
    for dom in domains:
        try:
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError:
            continue
        if owner_of(xml) == dmz_name:
            names.append(dom.name())
    return sorted(names)


def check_owned(kind: str, name: str, owner: Optional[str], dmz_name: str) -> None:
    if owner is None:
        raise OwnershipError(f"{kind} {name!r} already exists and is not dmzctl's; dmzctl will not touch "
                             f"it: rename the DMZ or VM in the config, or remove that {kind} yourself")
    if owner != dmz_name:
        raise OwnershipError(f"{kind} {name!r} belongs to dmzctl DMZ {owner!r}, not {dmz_name!r}; "
                             f"pick another name")
