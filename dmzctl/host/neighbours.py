"""The host's neighbour table (ARP and NDP cache) on one bridge, as `ip -j neigh` gives it."""

from __future__ import annotations

import json
import subprocess


def bridge_neighbours(bridge: str) -> list[dict]:
    """Entries of `ip -j neigh show dev <bridge>` (dst, lladdr, state); none when it cannot be read:
    what `status` shows of them is a courtesy, never a decision."""
    try:
        result = subprocess.run(["ip", "-j", "neigh", "show", "dev", bridge], capture_output=True, text=True,
                                timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    try:
        entries = json.loads(result.stdout or "[]")
    except ValueError:
        return []
    return [entry for entry in entries if isinstance(entry, dict)]
