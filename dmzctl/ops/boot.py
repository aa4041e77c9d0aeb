"""What the boot unit runs: `up` for every DMZ at boot, `down` at shutdown, each on its own.

One broken config or DMZ does not keep the others down (each runs alone and the
failures are reported together, exit 1). libvirtd may still be starting when the
unit runs: the connection is retried for a while.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from .. import events
from ..config import DMZ, default_config_paths, load_all
from ..errors import ConfigError, DmzctlError, HostError
from ..host.lock import dmz_lock
from ..settings import Settings
from .common import summary_lines

Say = Callable[[str], None]


def load_each(paths: list[Path], say: Say) -> tuple[list[DMZ], list[str]]:
    """All DMZs that load; the files that do not are reported and left out."""
    try:
        return load_all(paths), []
    except ConfigError as error:
        for problem in error.problems:
            say(f"boot: {problem}")
    dmzs, failed = [], []
    for path in paths:
        try:
            dmzs += load_all([path])
        except ConfigError:
            failed.append(str(path))
    return dmzs, failed


def connect(uri: str, wait: float, say: Say):
    from ..host.virt import Virt

    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            return Virt(uri)
        except HostError as error:
            if time.monotonic() >= deadline:
                raise
            if not told:
                say(f"boot: waiting for libvirt ({error})")
                told = True
            time.sleep(1)


def boot(paths: Optional[list[Path]], settings: Settings, stop: bool, say: Say, wait: float = 120.0) -> int:
    from . import lifecycle

    paths = list(paths) if paths else default_config_paths()
    if not paths:
        say("boot: no DMZ configured (no /etc/dmzctl/*.toml): nothing to do")
        return 0
    dmzs, failed = load_each(paths, say)
    verb = "down" if stop else "up"
    events.record(settings.event_log, f"boot: {verb} for {len(dmzs)} DMZ(s): "
                                      f"{', '.join(d.name for d in dmzs) or 'none'}")
    with connect(settings.uri, wait, say) as virt:
        for dmz in dmzs:
            try:
                with dmz_lock(settings.run_dir, dmz.name, say=say):
                    if stop:
                        outcome = lifecycle.down(virt, dmz, settings, say=say)
                    else:
                        outcome = lifecycle.up(virt, dmz, settings, say=say)
                for line in summary_lines(outcome, verb):
                    say(line)
            except DmzctlError as error:
                say(f"boot: {dmz.name}: {verb} failed: {error}")
                events.record(settings.event_log, f"boot: dmz={dmz.name} {verb} failed: {error}")
                failed.append(dmz.name)
    if failed:
        say(f"boot: {verb} failed for {len(failed)}: {', '.join(failed)}")
        return 1
    return 0
