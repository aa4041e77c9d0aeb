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
from pathlib import Path
from typing import Callable, Iterator, Optional

from lxml import etree

from ..errors import HostError
from .objects import DomainInfo, NetworkInfo, describe, digest_of, owner_of, state_name
from .storage import StorageMixin
from .uri import refuse_remote

try:
    import libvirt
except ImportError:  # reported when a connection is needed, not at import
    libvirt = None

_event_loop_started = False
_event_loop_lock = threading.Lock()


def silence_libvirt() -> None:
    """Before anything else talks to libvirt: it prints every error to stderr by default."""
    if libvirt is not None:
        _silence_libvirt()


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


class Virt(StorageMixin):
    """A connection plus the calls dmzctl makes, by object name; every libvirtError becomes a
    HostError, and no libvirt object leaves this class (pools and volumes: host/storage.py)."""

    def __init__(self, uri: str):
        if libvirt is None:
            raise HostError("the libvirt Python binding is missing: apt-get install python3-libvirt "
                            "(and use a venv made with --system-site-packages)")
        refuse_remote(uri)
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

    def _network(self, name: str):
        try:
            return self.conn.networkLookupByName(name)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return None
            raise HostError(f"looking up network {name}: {describe(error)}") from None

    def _must_network(self, name: str):
        net = self._network(name)
        if net is None:
            raise HostError(f"network {name} is gone")
        return net

    def network_info(self, name: str) -> Optional[NetworkInfo]:
        net = self._network(name)
        if net is None:
            return None
        with self._call(f"reading network {name}"):
            definition = net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
            active = bool(net.isActive())
            live = net.XMLDesc(0) if active else None
            autostart = bool(net.autostart()) if net.isPersistent() else False
            bridge = net.bridgeName() if active else None
        return NetworkInfo(name=name, owner=owner_of(definition), active=active, autostart=autostart,
                           digest=digest_of(definition), live_digest=digest_of(live) if live else None,
                           definition=definition, bridge=bridge, live=live)

    def define_network(self, xml: str) -> None:
        with self._call("defining the DMZ network"):
            self.conn.networkDefineXML(xml)

    def start_network(self, name: str) -> None:
        """Start it (if not active) and mark it autostart."""
        net = self._must_network(name)
        with self._call(f"starting network {name}"):
            if not net.isActive():
                net.create()
            net.setAutostart(1)

    def stop_network(self, name: str) -> None:
        net = self._network(name)
        if net is None:
            return
        with self._call(f"stopping network {name}"):
            if net.isActive():
                net.destroy()

    def remove_network(self, name: str) -> None:
        net = self._network(name)
        if net is None:
            return
        with self._call(f"removing network {name}"):
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()

    def update_dhcp_hosts(self, name: str, removed: list[tuple[int, str]], added: list[tuple[int, str]]) -> None:
        """Take out and put in <host> entries, each (index of its <ip>, XML), of the running network's DHCP
        sections (its definition is defined whole beforehand): a VM added to or removed from a DMZ needs no
        network restart. libvirt rewrites dnsmasq's hostsfile and sends it SIGHUP, for IPv6 hosts too."""
        net = self._must_network(name)
        flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
        with self._call(f"updating the DHCP hosts of network {name}"):
            for command, hosts in ((libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, removed),
                                   (libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, added)):
                for index, host in hosts:
                    net.update(command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, index, host, flags)

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

    def dhcp_leases(self, name: str) -> list[dict]:
        net = self._network(name)
        try:
            return net.DHCPLeases() if net is not None and net.isActive() else []
        except libvirt.libvirtError:
            return []  # leases are a courtesy in status, never a decision

    def agent_addresses(self, name: str) -> list[tuple[str, str]]:
        """(MAC, address) pairs from the QEMU guest agent of a running domain; none without a connected
        agent channel (org.qemu.guest_agent.0) or on any error: a courtesy in status."""
        dom = self._domain(name)
        try:
            live = etree.fromstring(dom.XMLDesc(0).encode()) if dom is not None and dom.isActive() else None
            if live is None or not live.xpath("devices/channel/target[@name='org.qemu.guest_agent.0'"
                                              " and @state='connected']"):
                return []
            found = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
        except libvirt.libvirtError:
            return []
        return [(nic.get("hwaddr") or "", a["addr"]) for nic in found.values() for a in nic.get("addrs") or ()]

    # --- nwfilters --------------------------------------------------------

    def nwfilter_exists(self, name: str) -> bool:
        return self.nwfilter_xml(name) is not None

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

    def _domain(self, name: str):
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HostError(f"looking up domain {name}: {describe(error)}") from None

    def domain_info(self, name: str) -> Optional[DomainInfo]:
        dom = self._domain(name)
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
                          started_at=self._started_at(name) if running else None, definition=xml)

    def live_domain_owner(self, name: str) -> Optional[str]:
        """The DMZ the running (or defined) domain's XML names; None when absent or not dmzctl's."""
        dom = self._domain(name)
        if dom is None:
            return None
        with self._call(f"reading domain {name}"):
            return owner_of(dom.XMLDesc(0))

    @staticmethod
    def _started_at(name: str) -> Optional[float]:
        # libvirt writes the QEMU pid file when it starts the domain.
        try:
            return os.stat(f"/run/libvirt/qemu/{name}.pid").st_mtime
        except OSError:
            return None

    def define_domain(self, xml: str) -> None:
        name = etree.fromstring(xml.encode()).findtext("name")
        with self._call(f"defining domain {name}"):
            self.conn.defineXML(xml)

    def set_autostart(self, name: str, enabled: bool) -> None:
        dom = self._must_domain(name)
        with self._call(f"setting autostart of {name}"):
            dom.setAutostart(1 if enabled else 0)

    def _must_domain(self, name: str):
        dom = self._domain(name)
        if dom is None:
            raise HostError(f"domain {name} is gone")
        return dom

    def is_running(self, name: str) -> bool:
        dom = self._must_domain(name)
        with self._call(f"reading domain {name}"):
            return bool(dom.isActive())

    def start_domain(self, name: str, timeout: float = 120.0) -> None:
        """Start and return once libvirt reports it running."""
        dom = self._must_domain(name)
        with self._call(f"starting domain {name}"):
            dom.create()
        if not self.wait_for(lambda: self._state(dom) == libvirt.VIR_DOMAIN_RUNNING, timeout):
            raise HostError(f"domain {name} did not reach 'running' within {timeout:.0f} s")

    def shutdown_domain(self, name: str) -> None:
        """Ask the guest to power off (ACPI power button)."""
        dom = self._domain(name)
        if dom is None:
            return
        try:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return  # already off
            raise HostError(f"shutting down {name}: {describe(error)}") from None

    def destroy_domain(self, name: str) -> None:
        dom = self._domain(name)
        if dom is None:
            return
        try:
            dom.destroy()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running
                raise HostError(f"destroying {name}: {describe(error)}") from None

    def undefine_domain(self, name: str) -> None:
        dom = self._domain(name)
        if dom is None:
            return
        with self._call(f"undefining {name}"):
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

    def is_off(self, name: str) -> bool:
        dom = self._domain(name)
        return dom is None or self._state(dom) in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)

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

    def domains_of(self, dmz_name: str) -> list[str]:
        """Every domain on the host whose metadata says it belongs to this DMZ."""
        names = []
        with self._call("listing domains"):
            domains = self.conn.listAllDomains()
        for dom in domains:
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError:
                continue  # gone meanwhile
            if owner_of(xml) == dmz_name:
                names.append(dom.name())
        return sorted(names)


