"""For the IPv6 tests on a machine shared with other checkouts of dmzctl.

Another checkout's `dmzctl up` refreshes every DMZ's table with its own rendering (up's
refresh_other_tables), which may predate the rule a test needs (the DHCPv6 rule): the
keeper puts this checkout's table back within a fraction of a second and counts how often.
Once every checkout renders the same table it never acts.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from guest import dmzctl


class TableKeeper(threading.Thread):
    def __init__(self, dmz: str, config: Path, needed_comment: str, env: dict | None = None):
        super().__init__(daemon=True)
        self.dmz, self.config, self.needed, self.env = dmz, config, needed_comment, env or {}
        self.stopped, self.restored = threading.Event(), 0

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            listing = subprocess.run(["nft", "list", "chain", "inet", f"dmzctl-{self.dmz}", "to_host"],
                                     capture_output=True, text=True).stdout
            if listing and self.needed not in listing:
                dmzctl("firewall", "up", str(self.config), env=self.env)
                self.restored += 1

    def stop(self) -> int:
        self.stopped.set()
        self.join(timeout=30)
        return self.restored
