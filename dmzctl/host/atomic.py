"""Files that readers must never see half-written (metrics' textfile, verify's record)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import HostError


def write_atomically(path: Path, content: str, failure: str = "cannot write") -> None:
    """A temporary file in the same directory, then a rename: readers see the old file or the new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                out.write(content)
            os.chmod(scratch, 0o644)
            os.replace(scratch, path)
        finally:
            Path(scratch).unlink(missing_ok=True)
    except OSError as error:
        raise HostError(f"{failure} {path}: {error.strerror or error}") from None
