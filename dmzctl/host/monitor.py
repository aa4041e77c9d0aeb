"""Event streams for the guard, each feeding one queue with plain tuples:

  ("nft", line), ("nft-exit", code)        `nft monitor` (text: JSON lacks the generation lines
                                            that say which process committed a change)
  ("address", line)                         `ip -o monitor address`: the host's addresses changed
  ("domain", name, "started"|"resumed"|"other")
  ("network", name, "started"|"other")     libvirt's lifecycle events
  ("libvirt-closed", reason)                the connection dropped (libvirtd restarting)

No libvirt object leaves this module; the guard sees names and words.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
from typing import Optional

from ..errors import DmzctlError, HostError
from .virt import Virt, libvirt


class LineStream:
    """A child process whose stdout lines are queued as (kind, line), and (kind-exit, code) at its end."""

    def __init__(self, argv: list[str], kind: str, events: queue.Queue):
        binary = shutil.which(argv[0])
        if binary is None:
            raise HostError(f"{argv[0]} is needed for the guard's {kind} monitor")
        self.process = subprocess.Popen([binary, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1)
        process = self.process

        def read():
            for line in process.stdout:
                events.put((kind, line.rstrip("\n")))
            events.put((f"{kind}-exit", process.wait()))

        threading.Thread(target=read, name=f"{kind}-monitor", daemon=True).start()

    def stop(self) -> None:
        process = self.process
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=3)


def nft_monitor(events: queue.Queue) -> LineStream:
    return LineStream(["nft", "monitor"], "nft", events)


def address_monitor(events: queue.Queue) -> LineStream:
    return LineStream(["ip", "-o", "monitor", "address"], "address", events)


class LibvirtEvents:
    """A libvirt connection that queues domain and network lifecycle events by name."""

    def __init__(self, uri: str, events: queue.Queue):
        queue_ = events

        class EventVirt(Virt):
            # libvirt tracks one domain lifecycle callback per connection: Virt's own
            # (which wakes its waiters) is extended rather than a second registered.
            def _on_lifecycle(self, conn, dom, event, detail, opaque):
                super()._on_lifecycle(conn, dom, event, detail, opaque)
                word = {libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
                        libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed"}.get(event, "other")
                queue_.put(("domain", dom.name(), word))

        self.virt = EventVirt(uri)
        self.callback: Optional[int] = None
        try:
            self.callback = self.virt.conn.networkEventRegisterAny(
                None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE,
                lambda _c, net, event, _d, _o: queue_.put(
                    ("network", net.name(), "started" if event == libvirt.VIR_NETWORK_EVENT_STARTED else "other")),
                None)
            self.virt.conn.registerCloseCallback(lambda _c, reason, _o: queue_.put(("libvirt-closed", reason)), None)
        except libvirt.libvirtError as error:
            self.close()
            raise HostError(f"libvirt events: {error}") from None

    @property
    def uri(self) -> str:
        return self.virt.uri

    def owner_of_running(self, name: str) -> Optional[str]:
        try:
            return self.virt.live_domain_owner(name)
        except DmzctlError:
            return None

    def close(self) -> None:
        conn = self.virt.conn
        for undo in ((lambda: conn.networkEventDeregisterAny(self.callback)) if self.callback is not None else None,
                     conn.unregisterCloseCallback):
            if undo is None:
                continue
            try:
                undo()
            except libvirt.libvirtError:
                pass  # the connection is gone already
        self.virt.close()


# --- reading `nft monitor`'s text -----------------------------------------------

GENERATION_RE = re.compile(r"^# new generation (\d+) by process (\d+) \((.*)\)")
VERBS = {"add", "delete", "replace", "update", "insert", "flush", "reset", "destroy", "create"}
FAMILIES = {"ip", "ip6", "inet", "arp", "bridge", "netdev"}


def generation_of(line: str) -> Optional[tuple[int, str]]:
    """(pid, process name) of a batch's closing line ("# new generation N by process PID (name)")."""
    match = GENERATION_RE.match(line)
    return (int(match.group(2)), match.group(3)) if match else None


def table_of(line: str) -> Optional[tuple[str, str]]:
    """(family, table) a change line is about, None for anything else."""
    tokens = line.split()
    if len(tokens) < 4 or tokens[0] not in VERBS:
        return None
    family_at = next((i for i, t in enumerate(tokens[1:4], 1) if t in FAMILIES), None)
    if family_at is None or family_at + 1 >= len(tokens):
        return None
    return tokens[family_at], tokens[family_at + 1]


def weight(line: str) -> int:
    """How big a change a line shows: a deleted table lists its rules first, the table last."""
    words = line.split()
    return {"table": 3, "chain": 2, "set": 1}.get(words[1] if len(words) > 1 else "", 0)


def short(line: str) -> str:
    words = line.split()
    return " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
