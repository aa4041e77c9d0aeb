"""A DMZ the guard watches: its config file, and the table the kernel would list for it with the
host's networks as they are (re-rendered when the file or the host view changes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import DMZ, load_dmz
from ..errors import DmzctlError
from ..host import nft
from ..implicit import HostView, blocks_for
from ..render.nft import apply_batch, table_name

Say = Callable[[str], None]


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


