"""`dmzctl blocked`: the drops the DMZ tables logged, read from the kernel log and grouped (dmzctl/blocked.py)."""

from __future__ import annotations

import time
from typing import Optional

from ..blocked import Group, attempts, group, parse_since
from ..config import DMZ
from ..host.kernlog import read_kernel_log


def blocked(dmzs: list[DMZ], since: Optional[str] = None, now: Optional[float] = None) -> tuple[list[Group], str]:
    """The groups, newest first, and a few words on what was read."""
    now = time.time() if now is None else now
    start = parse_since(since, now)
    where, lines = read_kernel_log(start)
    scope = f"from {where}" + (f", since {since}" if since else "")
    return group(attempts(lines, dmzs, start)), scope
