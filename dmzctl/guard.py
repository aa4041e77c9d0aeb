"""`dmzctl guard`: put a DMZ's firewall table back the moment something removes or alters it.

Event-driven, three sources:
  - `nft monitor` (a child process; the Python binding has no monitor): every
    committed change, batch by batch, each ending with "# new generation N by
    process PID (name)". A batch touching a watched table triggers a check of
    that DMZ; batches committed by the guard itself (its own restores) are ignored.
    The text form is used, not `-j`: nft 1.0.6's JSON monitor leaves out the
    generation lines, so it cannot tell who made a change.
  - libvirt events: a DMZ network started, a DMZ VM started or resumed; any
    network defined, started, stopped or removed (the host's networks changed).
  - `ip monitor address` (a child process): an address added to or removed from
    any interface. The table blocks every host subnet and every other DMZ
    (dmzctl/implicit.py), so a change to those makes every table stale: the host
    view is read again and the tables that differ are re-applied.
  - a slow periodic re-check of every DMZ (a safety net, `--interval`).
A check compares the live table with the config's (the form the kernel lists,
computed once per config version) and re-applies the whole table in one
transaction when they differ. A DMZ counts only while it is up (its bridge exists)
and not held down by `dmzctl firewall down`; the guard waits for a dmzctl run that
holds the DMZ's lock and checks after it.
"""

from __future__ import annotations

import fcntl
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import events
from .config import DMZ, default_config_paths, load_dmz
from .errors import DmzctlError, HostError
from .host import facts, nft
from .implicit import HostView, blocks_for
from .render.nft import FAMILY, apply_batch, table_name

Say = Callable[[str], None]
GENERATION_RE = re.compile(r"^# new generation (\d+) by process (\d+) \((.*)\)")
VERBS = {"add", "delete", "replace", "update", "insert", "flush", "reset", "destroy", "create"}
FAMILIES = {"ip", "ip6", "inet", "arp", "bridge", "netdev"}
RETRY_LOCKED = 0.2  # seconds between attempts while a dmzctl run holds the DMZ
BATCH_TIMEOUT = 0.1  # act on events whose generation line did not follow within this


@dataclass
class Target:
    """One watched DMZ: its config and the table the kernel would list for it."""

    path: Path
    stamp: tuple = ()
    dmz: Optional[DMZ] = None
    batch: Optional[dict] = None
    want: Any = None
    error: Optional[str] = None
    view: Optional[HostView] = None  # the host view `batch` was rendered with
    loaded_stamp: tuple = ()  # the file version `dmz` was read from

    @property
    def table(self) -> Optional[str]:
        return table_name(self.dmz) if self.dmz else None

    def refresh(self, say: Say, view: HostView = HostView()) -> bool:
        """Re-read the config when the file changed, re-render when the host view did.
        Keeps the last good one on error. True if it changed."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError as error:
            if self.error != str(error):
                self.error = str(error)
                say(f"guard: {self.path}: {error.strerror}; keeping the last good version")
            return False
        if stamp == self.stamp and view == self.view:
            return False
        self.stamp = stamp
        try:
            dmz = load_dmz(self.path) if self.dmz is None or stamp != self.loaded_stamp else self.dmz
            batch = apply_batch(dmz, blocks_for(dmz, view))
            want = nft.kernel_form(batch, table_name(dmz))
        except DmzctlError as error:
            self.error = str(error).splitlines()[0]
            say(f"guard: {self.path}: {self.error}; keeping the last good version")
            return False
        self.dmz, self.batch, self.want, self.error, self.view = dmz, batch, want, None, view
        self.loaded_stamp = stamp
        return True


@dataclass
class Pending:
    """Events of one batch, until its generation line says who committed it."""

    first: dict[str, str] = field(default_factory=dict)  # DMZ name -> its first event line
    since: float = 0.0


class Guard:
    def __init__(self, paths: Optional[list[Path]], uri: Optional[str], say: Say, interval: float = 60.0,
                 use_libvirt: bool = True):
        self.explicit = list(paths) if paths else None
        self.uri = uri
        self.say = say
        self.interval = interval
        self.use_libvirt = use_libvirt
        self.targets: dict[str, Target] = {}  # DMZ name -> target
        self.by_path: dict[Path, Target] = {}
        self.events: queue.Queue = queue.Queue()
        self.stopping = False
        self.reload_requested = False
        self.monitor: Optional[subprocess.Popen] = None
        self.monitor_ready = threading.Event()
        self.ready_table = f"dmzctl_guard_ready_{os.getpid()}"
        self.pending = Pending()
        self.due: dict[str, tuple[float, str]] = {}  # DMZ name -> (when, why)
        self.virt = None
        self.virt_callbacks: list[tuple[str, int]] = []
        self.next_connect = 0.0
        self.restores = 0
        self.view = HostView()
        self.addresses: Optional[subprocess.Popen] = None
        self.view_due: Optional[float] = None  # when to read the host view again

    # --- configs ----------------------------------------------------------

    def load_targets(self) -> None:
        paths = self.explicit if self.explicit is not None else default_config_paths()
        seen = set()
        for path in paths:
            path = Path(path).resolve()
            seen.add(path)
            target = self.by_path.setdefault(path, Target(path))
            target.refresh(self.say, self.view)
        for path in list(self.by_path):
            if path not in seen:
                del self.by_path[path]
        self.targets = {t.dmz.name: t for t in self.by_path.values() if t.dmz is not None}

    def by_table(self, table: str) -> Optional[str]:
        for name, target in self.targets.items():
            if target.table == table:
                return name
        return None

    # --- nft monitor ------------------------------------------------------

    def start_monitor(self) -> None:
        binary = shutil.which("nft")
        if binary is None:
            raise HostError("nft (nftables) is needed for the guard's monitor")
        self.monitor_ready.clear()
        self.monitor = subprocess.Popen([binary, "monitor"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1)
        process = self.monitor

        def read():
            for line in process.stdout:
                self.events.put(("nft", line.rstrip("\n")))
            self.events.put(("nft-exit", process.wait()))

        threading.Thread(target=read, name="nft-monitor", daemon=True).start()
        # Prove the monitor listens before relying on it: one transaction that adds and
        # deletes a scratch table (nothing stays) shows up once the monitor is subscribed.
        deadline = time.monotonic() + 5
        while not self.monitor_ready.is_set() and time.monotonic() < deadline:
            spec = {"table": {"family": FAMILY, "name": self.ready_table}}
            nft.apply({"nftables": [{"add": spec}, {"delete": spec}]})
            self.drain(until=time.monotonic() + 0.1, wait_ready=True)
        if not self.monitor_ready.is_set():
            raise HostError("nft monitor did not report changes within 5 s")

    def stop_monitor(self) -> None:
        process, self.monitor = self.monitor, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=3)

    def on_nft_line(self, line: str) -> None:
        match = GENERATION_RE.match(line)
        if match:
            pid, process = int(match.group(2)), match.group(3)
            pending, self.pending = self.pending, Pending()
            if pid == os.getpid():
                return  # our own restore (or readiness probe): never a reason to act
            self.schedule_tables(pending, f"{process}[{pid}]")
            return
        tokens = line.split()
        if len(tokens) < 4 or tokens[0] not in VERBS:
            return
        family_at = next((i for i, t in enumerate(tokens[1:4], 1) if t in FAMILIES), None)
        if family_at is None or family_at + 1 >= len(tokens):
            return
        table = tokens[family_at + 1]
        if table == self.ready_table:
            self.monitor_ready.set()
        if tokens[family_at] != FAMILY:
            return
        name = self.by_table(table)
        if name is None:
            return
        if not self.pending.first:
            self.pending.since = time.monotonic()
        # Name the change by its biggest event: a deleted table lists its rules first.
        known = self.pending.first.get(name)
        if known is None or _weight(line) > _weight(known):
            self.pending.first[name] = line

    def schedule_tables(self, pending: Pending, who: str) -> None:
        for name, line in sorted(pending.first.items()):
            self.schedule(name, f"'{_short(line)}' by {who}")

    # --- the host's networks --------------------------------------------

    def read_view(self, why: str) -> None:
        """Read the host view; when it changed, every DMZ's table is checked against it."""
        try:
            view = facts.host_view()
        except DmzctlError as error:
            self.say(f"guard: cannot read the host's networks ({error}); keeping the last view")
            return
        if view != self.view:
            self.view = view
            self.check_all(f"host networks changed ({why})")

    def start_address_monitor(self) -> None:
        binary = shutil.which("ip")
        if binary is None:
            raise HostError("ip (iproute2) is needed for the guard's address monitor")
        self.addresses = subprocess.Popen([binary, "-o", "monitor", "address"], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                                          bufsize=1)
        process = self.addresses

        def read():
            for line in process.stdout:
                self.events.put(("address", line.strip()))

        threading.Thread(target=read, name="ip-monitor", daemon=True).start()

    def stop_address_monitor(self) -> None:
        process, self.addresses = self.addresses, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=3)

    def view_changed_soon(self, why: str) -> None:
        # Addresses come in bursts (an interface up brings several): read once, shortly after.
        if self.view_due is None:
            self.view_due = time.monotonic() + 0.2
            self.view_why = why

    # --- libvirt ----------------------------------------------------------

    def connect_libvirt(self) -> None:
        if not self.use_libvirt or self.virt is not None or time.monotonic() < self.next_connect:
            return
        self.next_connect = time.monotonic() + 5
        try:
            from .host.virt import Virt, libvirt

            class EventVirt(Virt):
                # libvirt tracks one domain lifecycle callback per connection: Virt's own
                # (which wakes its waiters) is extended rather than a second registered.
                def _on_lifecycle(inner, conn, dom, event, detail, opaque):
                    super()._on_lifecycle(conn, dom, event, detail, opaque)
                    self.events.put(("domain", dom.name(), event))

            virt = EventVirt(self.uri)
        except DmzctlError as error:
            self.say(f"guard: libvirt events unavailable for now ({error}); retrying every 5 s")
            return
        conn = virt.conn
        try:
            self.virt_callbacks = [
                ("network", conn.networkEventRegisterAny(
                    None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE,
                    lambda _c, net, event, _d, _o: self.events.put(("network", net.name(), event)), None)),
            ]
            conn.registerCloseCallback(lambda _c, reason, _o: self.events.put(("libvirt-closed", reason)), None)
        except libvirt.libvirtError as error:
            self.say(f"guard: libvirt events unavailable for now ({error}); retrying every 5 s")
            self.virt = virt
            self.drop_libvirt()
            return
        self.virt = virt
        self.say(f"guard: listening to libvirt events ({virt.uri})")

    def drop_libvirt(self) -> None:
        virt, self.virt = self.virt, None
        if virt is None:
            return
        try:
            from .host.virt import libvirt

            for kind, callback in self.virt_callbacks:
                try:
                    if kind == "network":
                        virt.conn.networkEventDeregisterAny(callback)
                    else:
                        virt.conn.domainEventDeregisterAny(callback)
                except libvirt.libvirtError:
                    pass  # the connection is gone already
            try:
                virt.conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
        finally:
            self.virt_callbacks = []
            virt.close()

    def on_network(self, name: str, event: int) -> None:
        from .host.virt import libvirt

        if event == libvirt.VIR_NETWORK_EVENT_STARTED and name in self.targets:
            self.schedule(name, f"network {name} started")
        self.view_changed_soon(f"libvirt network {name}")

    def on_domain(self, name: str, event: int) -> None:
        from .host.virt import libvirt, owner_of

        if event not in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED) or self.virt is None:
            return
        try:
            dom = self.virt.domain(name)
            owner = owner_of(self.virt.domain_xml(dom, inactive=False)) if dom is not None else None
        except DmzctlError:
            return
        if owner in self.targets:
            self.schedule(owner, f"VM {name} started")

    # --- checks -----------------------------------------------------------

    def schedule(self, name: str, why: str, at: Optional[float] = None) -> None:
        when = time.monotonic() if at is None else at
        if name in self.due and self.due[name][0] <= when:
            return
        self.due[name] = (when, why)

    def check(self, name: str, why: str) -> bool:
        """False when a dmzctl run holds the DMZ: check again after it."""
        from .lifecycle import LOCK_DIR, held_down_marker

        target = self.targets.get(name)
        if target is None:
            return True
        target.refresh(self.say, self.view)
        dmz = target.dmz
        if not Path(f"/sys/class/net/{dmz.bridge}").exists():
            return True  # the DMZ is not up: nothing to guard
        if held_down_marker(name).exists():
            return True  # `dmzctl firewall down` took it away on purpose
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_DIR / f"{name}.lock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            began = time.monotonic()
            live = nft.canonical(nft.list_table(target.table))
            if live == target.want:
                return True
            state = "missing" if live is None else "altered"
            try:
                nft.apply(target.batch)
            except DmzctlError as error:
                message = f"dmz={name} guard could not restore firewall table {target.table} ({state}; {why}): {error}"
                self.say(f"guard: {message}")
                events.record(message)
                return True
            ms = (time.monotonic() - began) * 1000
            self.restores += 1
            message = f"dmz={name} guard restored firewall table {target.table} ({state}; {why}) in {ms:.0f} ms"
            self.say(f"guard: {message}")
            events.record(message)
            return True
        finally:
            os.close(fd)

    def run_due(self) -> None:
        now = time.monotonic()
        if self.view_due is not None and self.view_due <= now:
            self.view_due = None
            self.read_view(self.view_why)
        for name, (when, why) in sorted(self.due.items(), key=lambda item: item[1][0]):
            if when > now:
                continue
            del self.due[name]
            if not self.check(name, why):
                self.schedule(name, why, at=now + RETRY_LOCKED)

    # --- the loop ---------------------------------------------------------

    def stop(self, signum=None, _frame=None) -> None:
        # Only a flag: the loop wakes at least every 0.25 s to see it.
        self.stopping = True

    def hangup(self, _signum=None, _frame=None) -> None:
        self.reload_requested = True

    def drain(self, until: float, wait_ready: bool = False) -> None:
        """Handle queued events until `until` (or until the monitor proves ready)."""
        while not self.stopping:
            timeout = until - time.monotonic()
            if self.due:
                timeout = min(timeout, min(when for when, _ in self.due.values()) - time.monotonic())
            if self.view_due is not None:
                timeout = min(timeout, self.view_due - time.monotonic())
            if self.pending.first:
                timeout = min(timeout, self.pending.since + BATCH_TIMEOUT - time.monotonic())
            try:
                item = self.events.get(timeout=max(0.0, min(timeout, 0.25)))
            except queue.Empty:
                item = None
            if item is not None:
                self.handle(item)
            if wait_ready and self.monitor_ready.is_set():
                return
            if self.pending.first and time.monotonic() - self.pending.since >= BATCH_TIMEOUT:
                pending, self.pending = self.pending, Pending()
                self.schedule_tables(pending, "an unknown process")
            if not wait_ready:
                self.run_due()
            if time.monotonic() >= until:
                return

    def handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "nft":
            self.on_nft_line(item[1])
        elif kind == "nft-exit":
            if not self.stopping:
                self.say(f"guard: nft monitor exited ({item[1]}); restarting it and checking every DMZ")
                self.monitor = None
                time.sleep(1)
                self.start_monitor()
                self.check_all("nft monitor restarted")
        elif kind == "network":
            self.on_network(item[1], item[2])
        elif kind == "address":
            self.view_changed_soon(f"address change: {_short(item[1])}")
        elif kind == "domain":
            self.on_domain(item[1], item[2])
        elif kind == "libvirt-closed":
            self.say("guard: the libvirt connection closed (libvirtd restarting?); reconnecting")
            self.drop_libvirt()
            self.next_connect = time.monotonic() + 1

    def check_all(self, why: str) -> None:
        for name in self.targets:
            self.schedule(name, why)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.hangup)
        try:
            self.view = facts.host_view()
            self.load_targets()
            if not self.targets:
                self.say("guard: no DMZ configured yet; watching for configs at each re-check (or SIGHUP)")
            self.start_monitor()
            self.start_address_monitor()
            self.connect_libvirt()
            self.check_all("guard started")
            self.run_due()
            names = ", ".join(sorted(self.targets)) or "none"
            self.say(f"guard: watching {len(self.targets)} DMZ(s) ({names}): nft monitor, "
                     f"{'libvirt events, ' if self.virt is not None else ''}re-check every {self.interval:.0f} s")
            events.record(f"guard started (pid {os.getpid()}), watching {names}")
            next_sweep = time.monotonic() + self.interval
            while not self.stopping:
                self.drain(until=min(next_sweep, time.monotonic() + 1.0))
                if self.reload_requested or time.monotonic() >= next_sweep:
                    self.reload_requested = False
                    self.read_view("periodic re-check")
                    self.load_targets()
                    self.check_all("periodic re-check")
                    next_sweep = time.monotonic() + self.interval
                if self.virt is None:
                    self.connect_libvirt()
                    if self.virt is not None:
                        self.check_all("libvirt reconnected")
            self.say(f"guard: stopping ({self.restores} restore(s))")
            events.record(f"guard stopped (pid {os.getpid()}), {self.restores} restore(s)")
            return 0
        finally:
            self.stop_monitor()
            self.stop_address_monitor()
            self.drop_libvirt()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _weight(line: str) -> int:
    words = line.split()
    return {"table": 3, "chain": 2, "set": 1}.get(words[1] if len(words) > 1 else "", 0)


def _short(line: str) -> str:
    words = line.split()
    return " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
