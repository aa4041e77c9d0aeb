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

import os
import queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .. import events
from ..config import default_config_paths
from ..errors import DmzctlError
from ..host import facts, monitor, nft
from ..host.lock import held_down_marker, try_lock
from ..implicit import HostView
from ..render.nft import FAMILY
from ..render.nft_backstop import main_table_of
from ..settings import Settings
from ..state import TableState, table_drift
from . import metrics as guard_metrics
from .targets import Target

Say = Callable[[str], None]
RETRY_LOCKED = 0.2  # seconds between attempts while a dmzctl run holds the DMZ
BATCH_TIMEOUT = 0.1  # act on events whose generation line did not follow within this


@dataclass
class Pending:
    """Events of one batch, until its generation line says who committed it."""

    first: dict[str, str] = field(default_factory=dict)  # DMZ name -> its first event line
    since: float = 0.0


class Guard:
    def __init__(self, paths: Optional[list[Path]], settings: Settings, say: Say, interval: float = 60.0,
                 use_libvirt: bool = True, metrics: Optional[tuple[str, int]] = None):
        self.explicit = list(paths) if paths else None
        self.settings = settings
        self.uri = settings.uri
        self.say = say
        self.interval = interval
        self.use_libvirt = use_libvirt
        self.targets: dict[str, Target] = {}  # DMZ name -> target
        self.by_path: dict[Path, Target] = {}
        self.events: queue.Queue = queue.Queue()
        self.stopping = False
        self.reload_requested = False
        self.monitor: Optional[monitor.LineStream] = None
        self.monitor_ready = False
        self.ready_table = f"dmzctl_guard_ready_{os.getpid()}"
        self.pending = Pending()
        self.due: dict[str, tuple[float, str]] = {}  # DMZ name -> (when, why)
        self.urgent: set[str] = set()  # due because its own tables changed: checked before the others
        self.libvirt: Optional[monitor.LibvirtEvents] = None
        self.next_connect = 0.0
        self.restores = 0
        self.restored: dict[str, int] = {}  # DMZ name -> restores (the metrics' guard_restores_total)
        self.metrics = metrics  # (address, port) to serve the metrics on, or None
        self.view = HostView()
        self.addresses: Optional[monitor.LineStream] = None
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
        """The DMZ whose table, or backstop, this is."""
        table = main_table_of(table)
        for name, target in self.targets.items():
            if target.table == table:
                return name
        return None

    # --- nft monitor ------------------------------------------------------

    def start_monitor(self) -> None:
        self.monitor_ready = False
        self.monitor = monitor.nft_monitor(self.events)
        # Prove the monitor listens before relying on it: one transaction that adds and
        # deletes a scratch table (nothing stays) shows up once the monitor is subscribed.
        deadline = time.monotonic() + 5
        while not self.monitor_ready and time.monotonic() < deadline:
            spec = {"table": {"family": FAMILY, "name": self.ready_table}}
            nft.apply({"nftables": [{"add": spec}, {"delete": spec}]})
            self.drain(until=time.monotonic() + 0.1, wait_ready=True)
        if not self.monitor_ready:
            raise DmzctlError("nft monitor did not report changes within 5 s")

    def stop_monitor(self) -> None:
        stream, self.monitor = self.monitor, None
        if stream is not None:
            stream.stop()

    def on_nft_line(self, line: str) -> None:
        generation = monitor.generation_of(line)
        if generation is not None:
            pid, process = generation
            pending, self.pending = self.pending, Pending()
            if pid == os.getpid():
                return  # our own restore (or readiness probe): never a reason to act
            self.schedule_tables(pending, f"{process}[{pid}]")
            return
        changed = monitor.table_of(line)
        if changed is None:
            return
        family, table = changed
        if table == self.ready_table:
            self.monitor_ready = True
        if family != FAMILY:
            return
        name = self.by_table(table)
        if name is None:
            return
        if not self.pending.first:
            self.pending.since = time.monotonic()
        # Name the change by its biggest event: a deleted table lists its rules first.
        known = self.pending.first.get(name)
        if known is None or monitor.weight(line) > monitor.weight(known):
            self.pending.first[name] = line

    def schedule_tables(self, pending: Pending, who: str) -> None:
        for name, line in sorted(pending.first.items()):
            self.urgent.add(name)
            self.schedule(name, f"'{monitor.short(line)}' by {who}")

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
        self.addresses = monitor.address_monitor(self.events)

    def stop_address_monitor(self) -> None:
        stream, self.addresses = self.addresses, None
        if stream is not None:
            stream.stop()

    def view_changed_soon(self, why: str) -> None:
        # Addresses come in bursts (an interface up brings several): read once, shortly after.
        if self.view_due is None:
            self.view_due = time.monotonic() + 0.2
            self.view_why = why

    # --- libvirt ----------------------------------------------------------

    def connect_libvirt(self) -> None:
        if not self.use_libvirt or self.libvirt is not None or time.monotonic() < self.next_connect:
            return
        self.next_connect = time.monotonic() + 5
        try:
            self.libvirt = monitor.LibvirtEvents(self.uri, self.events)
        except DmzctlError as error:
            self.say(f"guard: libvirt events unavailable for now ({error}); retrying every 5 s")
            return
        self.say(f"guard: listening to libvirt events ({self.libvirt.uri})")

    def drop_libvirt(self) -> None:
        stream, self.libvirt = self.libvirt, None
        if stream is not None:
            stream.close()

    def on_network(self, name: str, event: str) -> None:
        if event == "started" and name in self.targets:
            self.schedule(name, f"network {name} started")
        self.view_changed_soon(f"libvirt network {name}")

    def on_domain(self, name: str, event: str) -> None:
        if event not in ("started", "resumed") or self.libvirt is None:
            return
        owner = self.libvirt.owner_of_running(name)
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
        target = self.targets.get(name)
        if target is None:
            return True
        target.refresh(self.say, self.view)
        dmz = target.dmz
        if not Path(f"/sys/class/net/{dmz.bridge}").exists():
            return True  # the DMZ is not up: nothing to guard
        if held_down_marker(self.settings.run_dir, name).exists():
            return True  # `dmzctl firewall down` took it away on purpose
        fd = try_lock(self.settings.run_dir, name)
        if fd is None:
            return False
        try:
            self.restore_if_drifted(target, why)
            return True
        finally:
            os.close(fd)

    def restore_if_drifted(self, target: Target, why: str) -> None:
        """Acts on the table's differences (state.py), as check --fix would: the whole table again."""
        began = time.monotonic()
        table = TableState(nft.canonical(nft.list_firewall(target.table)), target.want)
        if table.in_sync:
            return
        state = "missing" if not table.exists else \
            f"altered: {table_drift(table.live, table.want)[0][2].removeprefix('firewall ')}"
        try:
            nft.apply(target.batch)
        except DmzctlError as error:
            message = (f"dmz={target.dmz.name} guard could not restore firewall table {target.table} "
                       f"({state}; {why}): {error}")
            self.say(f"guard: {message}")
            events.record(self.settings.event_log, message)
            return
        ms = (time.monotonic() - began) * 1000
        self.restores += 1
        self.restored[target.dmz.name] = self.restored.get(target.dmz.name, 0) + 1
        guard_metrics.record_guard(self.settings.run_dir, dict(self.restored))
        message = f"dmz={target.dmz.name} guard restored firewall table {target.table} ({state}; {why}) in {ms:.0f} ms"
        self.say(f"guard: {message}")
        events.record(self.settings.event_log, message)

    def run_due(self) -> None:
        now = time.monotonic()
        if self.view_due is not None and self.view_due <= now:
            self.view_due = None
            self.read_view(self.view_why)
        # One DMZ per call, back to the events in between: with many DMZs, a host-network change
        # makes every table stale at once, and a table deleted meanwhile must not wait behind them.
        ready = [(name not in self.urgent, when, name) for name, (when, _why) in self.due.items() if when <= now]
        if not ready:
            return
        _later, _when, name = min(ready)
        _when, why = self.due.pop(name)
        self.urgent.discard(name)
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
            if wait_ready and self.monitor_ready:
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
        elif kind == "address-exit":
            if not self.stopping:
                self.say("guard: ip monitor exited; the periodic re-check still reads the host's networks")
        elif kind == "address":
            self.view_changed_soon(f"address change: {monitor.short(item[1])}")
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
        stop_serving = None
        try:
            self.view = facts.host_view()
            self.load_targets()
            guard_metrics.record_guard(self.settings.run_dir, {})
            stop_serving = guard_metrics.serve_guard(self) if self.metrics is not None else None
            if not self.targets:
                self.say("guard: no DMZ configured yet; watching for configs at each re-check (or SIGHUP)")
            self.start_monitor()
            self.start_address_monitor()
            self.connect_libvirt()
            self.check_all("guard started")
            for _ in range(len(self.due)):  # every DMZ once before saying it watches
                self.run_due()
            names = ", ".join(sorted(self.targets)) or "none"
            self.say(f"guard: watching {len(self.targets)} DMZ(s) ({names}): nft monitor, "
                     f"{'libvirt events, ' if self.libvirt is not None else ''}re-check every {self.interval:.0f} s")
            events.record(self.settings.event_log, f"guard started (pid {os.getpid()}), watching {names}")
            next_sweep = time.monotonic() + self.interval
            while not self.stopping:
                self.drain(until=min(next_sweep, time.monotonic() + 1.0))
                if self.reload_requested or time.monotonic() >= next_sweep:
                    self.reload_requested = False
                    self.read_view("periodic re-check")
                    self.load_targets()
                    self.check_all("periodic re-check")
                    next_sweep = time.monotonic() + self.interval
                if self.libvirt is None:
                    self.connect_libvirt()
                    if self.libvirt is not None:
                        self.check_all("libvirt reconnected")
            self.say(f"guard: stopping ({self.restores} restore(s))")
            events.record(self.settings.event_log, f"guard stopped (pid {os.getpid()}), {self.restores} restore(s)")
            return 0
        finally:
            if stop_serving is not None:
                stop_serving()
            self.stop_monitor()
            self.stop_address_monitor()
            self.drop_libvirt()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


