"""vm.disks: each disk a file and its backing chain, every format stated by the config.

The formats are never read from the files: a guest can write a qcow2 header into its raw disk
and name a host file as its backing store (CVE-2010-2237/2238/2239).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .checker import Checker
from .model import Disk, Image, default_format

DISK_FORMATS = ("raw", "qcow2")
IMAGE_KEYS = {"path", "format"}
DISK_KEYS = IMAGE_KEYS | {"backing"}


def parse_disks(check: Checker, table: dict, where: str) -> tuple[Disk, ...]:
    """The valid disks of a [[vm]]; the others are reported and left out."""
    disks = []
    for index, entry in enumerate(check.typed(table, "disks", list, where, default=[]) or []):
        disk = _parse_disk(check, entry, f"{where}.disks[{index + 1}]")
        if disk is not None:
            disks.append(disk)
    return tuple(disks)


def _parse_image(check: Checker, entry: Any, where: str, keys: set) -> Optional[Image]:
    """A path string (format from its extension) or a table { path = ..., format = ... }."""
    if isinstance(entry, str):
        path = check.absolute_path(entry, where)
        return Image(Path(path), default_format(path)) if path is not None else None
    if not isinstance(entry, dict):
        check.problem(where, f"must be an absolute path or a table {{ path = \"/...\", format = \"raw\" }}; "
                             f"got {entry!r}")
        return None
    check.unknown_keys(entry, keys, where)
    path = check.absolute_path(check.typed(entry, "path", str, where, required=True), f"{where}.path")
    chosen = check.choice(entry, "format", DISK_FORMATS, where, default_format(path or ""))
    if path is None or chosen is None:
        return None
    return Image(Path(path), chosen)


def _parse_disk(check: Checker, entry: Any, where: str) -> Optional[Disk]:
    top = _parse_image(check, entry, where, DISK_KEYS)
    raw_backing = entry.get("backing", []) if isinstance(entry, dict) else []
    if not isinstance(raw_backing, list):
        check.problem(f"{where}.backing", f"must be a list of files, outermost first, each a path or "
                                          f"{{ path = ..., format = ... }}; got {raw_backing!r}")
        return None
    layers = [_parse_image(check, layer, f"{where}.backing[{index + 1}]", IMAGE_KEYS)
              for index, layer in enumerate(raw_backing)]
    if top is not None and top.format == "raw" and raw_backing:
        check.problem(f"{where}.backing", "a raw disk has no backing file; set format = \"qcow2\" or "
                                          "remove backing")
        return None
    _check_chain(check, top, layers, where)
    if top is None or None in layers:
        return None
    return Disk(top.path, top.format, tuple(layers))


def _check_chain(check: Checker, top: Optional[Image], layers: list[Optional[Image]], where: str) -> None:
    """Only the last layer may be raw, and no file may come twice (a loop)."""
    seen = {top.path} if top is not None else set()
    for index, layer in enumerate(layers):
        if layer is None:
            continue
        if layer.format == "raw" and index < len(layers) - 1:
            check.problem(f"{where}.backing[{index + 1}]", f"{layer.path} is raw, so it has no backing file: "
                                                           f"a raw layer can only come last")
        if layer.path in seen:
            check.problem(f"{where}.backing[{index + 1}]", f"{layer.path} is already in this disk's chain; "
                                                           f"a chain cannot loop")
        seen.add(layer.path)
