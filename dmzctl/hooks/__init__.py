"""dmzctl's libvirt hooks: the scripts `dmzctl install --hooks` copies, and the network hook's work.

`qemu` and `network` in this directory are the hook scripts. libvirt >= 6.5 runs
every executable in /etc/libvirt/hooks/<driver>.d/ (after the single legacy
/etc/libvirt/hooks/<driver> script), so dmzctl's hooks live there as `dmzctl`
beside whatever hooks the admin has. libvirtd decides which drivers have hooks
when it starts (and on SIGHUP): a driver without any hook then runs none until the
next restart or SIGHUP, whatever is installed meanwhile (measured on libvirt 9.0).
A driver that has hooks re-reads its .d directory at every call, so removing
dmzctl's hooks takes effect at once.

Hooks must be fast and must never call libvirt: libvirtd waits for them.
"""

from __future__ import annotations

import os
import re
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

NS = "http://dmzctl.org/xmlns/dmzctl/1.0"
DMZ_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")
HOOK_DIR = Path(__file__).resolve().parent
MARKER = "# dmzctl libvirt hook"  # the second line of each script: how install/uninstall know ours


def network_start(network: str, data: bytes) -> int:
    """`start begin` of a network: apply its DMZ's table from the config its metadata names.

    Exit status for libvirt: 0 lets the network start. A dmzctl run holding the DMZ's
    lock is itself starting the network and applies the table next (`up`), so the hook
    leaves it to that run. When nftables refuses the table the network does not start (1).
    When the config cannot be used (moved, invalid) the network starts and the event log
    says why there was no table: the qemu hook still keeps the DMZ's VMs from starting
    without one, and `up` with the config's new place applies it.
    """
    began = time.monotonic()
    try:
        net = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        return _refuse(network, f"its XML does not parse ({error})")
    owned = net.find(f"network/metadata/{{{NS}}}network")
    if owned is None:
        owned = net.find(f"metadata/{{{NS}}}network")
    if owned is None:
        return 0
    dmz_name, config = owned.get("dmz"), owned.get("config")
    if not dmz_name or not DMZ_NAME.match(dmz_name):
        return _warn(network, "its dmzctl metadata names no valid DMZ")
    if not config:
        return _warn(network, f"its dmzctl metadata names no config file; run 'dmzctl up' with DMZ {dmz_name}'s "
                              f"config")
    from ..host.lock import try_lock
    from ..settings import Settings

    settings = Settings.from_environment()
    lock = try_lock(settings.run_dir, dmz_name)
    if lock is None:
        return 0  # `dmzctl up` (or another run) holds the DMZ: it applies the table itself
    try:
        from .. import events
        from ..config import load_dmz
        from ..errors import DmzctlError
        from ..host import facts, nft
        from ..implicit import blocks_for
        from ..render.nft import apply_batch, table_name

        try:
            dmz = load_dmz(Path(config))
        except DmzctlError as error:
            return _warn(network, f"its config cannot be used: {str(error).splitlines()[0]}")
        except OSError as error:
            return _warn(network, f"its config {config} cannot be read ({error.strerror})")
        if dmz.name != dmz_name:
            return _warn(network, f"its config {config} now describes DMZ {dmz.name!r}, not {dmz_name!r}")
        try:
            nft.apply(apply_batch(dmz, blocks_for(dmz, facts.host_view())))
        except DmzctlError as error:
            return _refuse(network, str(error))
        ms = (time.monotonic() - began) * 1000
        events.record(settings.event_log, f"dmz={dmz_name} firewall table {table_name(dmz)} applied by the "
                                          f"libvirt network hook (network {network} starting; {ms:.0f} ms)")
        return 0
    finally:
        os.close(lock)


def _warn(network: str, why: str) -> int:
    return _tell(f"dmzctl: network {network} started without its firewall table from the hook: {why}", 0)


def _refuse(network: str, why: str) -> int:
    return _tell(f"dmzctl: network {network} not started: {why}", 1)


def _tell(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    try:
        from .. import events
        from ..settings import Settings

        events.record(Settings.from_environment().event_log, message)
    except Exception:  # the message on stderr reaches libvirt's log anyway
        pass
    return code


def script(kind: str) -> Path:
    return HOOK_DIR / kind
