"""Locks between dmzctl runs, and the marker of a firewall an admin took down on purpose.

One flock per DMZ (`<run_dir>/<dmz>.lock`), released when the process ends; one more
around the nwfilter all DMZs share. The libvirt hooks and the guard take the same
locks without waiting (the holder may be the very run libvirt is calling them for).
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import LockedError

# Taken around defining and removing the nwfilter all DMZs share (a DMZ name never starts with '.').
SHARED_FILTERS = ".shared-nwfilters"


def lock_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / f"{name}.lock"


@contextmanager
def dmz_lock(run_dir: Path, name: str, timeout: float = 120.0,
             say: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """One dmzctl run per DMZ at a time; waits up to `timeout`, then LockedError."""
    path = lock_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockedError(f"DMZ {name}: another dmzctl run still holds {path} after {timeout:.0f} s") \
                        from None
                if say and not told:
                    say(f"{name}: waiting for another dmzctl run on this DMZ")
                    told = True
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def try_lock(run_dir: Path, name: str) -> Optional[int]:
    """The DMZ's lock as an open fd if free now, else None (never waits). Close the fd to release."""
    path = lock_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def held_down_marker(run_dir: Path, name: str) -> Path:
    """Present while an admin's `firewall down` keeps the table away: `dmzctl guard` leaves it so."""
    return Path(run_dir) / f"{name}.firewall-down"
