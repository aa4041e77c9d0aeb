"""`dmzctl diagram` and `dmzctl report`: gather what the pure report package draws and writes.

The only host work here is reading: the host's networks and uplink (facts.py), `check`'s findings
(inspect.py, as root with libvirtd answering: best effort, and said so when not), verify's recorded
results (verify/record.py); and Graphviz's `dot` (host/graphviz.py) turning DOT into a picture.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .. import __version__
from ..config import DMZ
from ..errors import DmzctlError, HostError
from ..host import graphviz
from ..host.facts import host_view, running_as_root, uplink
from ..implicit import HostView, blocks_for
from ..report.diagram import HostInfo, build_graph
from ..report.dot import to_dot
from ..report.html import ConfigDigest, Footer, LiveState, ReportInput, render_report
from ..settings import Settings
from ..verify.record import read_record, record_path

DIAGRAM_FORMATS = {".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png"}


@dataclass(frozen=True)
class HostRead:
    """The host as the diagram sees it: None when not read (offline) or unreadable."""

    view: Optional[HostView]
    info: HostInfo
    note: str = ""


def read_host(live: bool) -> HostRead:
    if not live:
        return HostRead(None, HostInfo())
    try:
        view = host_view()
    except HostError as error:
        return HostRead(None, HostInfo(name=socket.gethostname()), f"the host's networks could not be read: {error}")
    device = uplink()
    nets = tuple(n.subnet for n in view.networks if device is not None and n.interface == device
                 and not n.subnet.is_link_local)
    return HostRead(view, HostInfo(name=socket.gethostname(), uplink=device, uplink_nets=nets))


def diagram_dot(dmzs: list[DMZ], host: HostRead) -> str:
    return to_dot(build_graph(dmzs, host.view, host.info))


def diagram_format(output: Optional[Path]) -> str:
    """dot | svg | png, from the output file's suffix (stdout: dot)."""
    if output is None:
        return "dot"
    fmt = DIAGRAM_FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise HostError(f"{output}: the diagram is written as .svg, .png or .dot; "
                        f"got {output.suffix or 'no suffix'}")
    return fmt


def write_diagram(dmzs: list[DMZ], output: Optional[Path], live: bool) -> str:
    """The diagram, drawn as the output's suffix says; the DOT text when there is no output file."""
    fmt = diagram_format(output)
    dot_text = diagram_dot(dmzs, read_host(live))
    if output is None:
        return dot_text
    content = dot_text.encode() if fmt == "dot" else graphviz.draw(dot_text, fmt)
    _write(output, content)
    return dot_text


def _write(path: Path, content: bytes) -> None:
    try:
        path.write_bytes(content)
    except OSError as error:
        raise HostError(f"cannot write {path}: {error.strerror or error}") from None


def live_states(dmzs: list[DMZ], settings: Settings) -> dict[str, LiveState]:
    """check's findings per DMZ: as root with libvirtd answering; else why not, in one line."""
    if not running_as_root():
        return {dmz.name: LiveState(False, "not on the host (not run as root)") for dmz in dmzs}
    from ..host.virt import Virt
    from .inspect import check_dmz

    states = {}
    try:
        with Virt(settings.uri) as virt:
            for dmz in dmzs:
                try:
                    result = check_dmz(virt, dmz, settings)
                except DmzctlError as error:
                    states[dmz.name] = LiveState(False, f"its state could not be read: {error}")
                    continue
                states[dmz.name] = LiveState(True, "", result.in_sync, tuple(d.line() for d in result.differences))
    except HostError as error:
        return {dmz.name: LiveState(False, f"not on the host ({error})") for dmz in dmzs}
    return states


def gather(dmzs: list[DMZ], settings: Settings, offline: bool = False,
           now: Optional[datetime] = None) -> ReportInput:
    """Everything the report shows; offline: the configs alone (no host read, no live state)."""
    now = now or datetime.now(timezone.utc)
    host = read_host(live=not offline and running_as_root())
    svg = graphviz.draw(diagram_dot(dmzs, host), "svg")
    blocks = {dmz.name: blocks_for(dmz, host.view) for dmz in dmzs} if host.view is not None else {}
    if offline:
        live = {dmz.name: LiveState(False, "not on the host (report made with --offline)") for dmz in dmzs}
    else:
        live = live_states(dmzs, settings)
    if host.note:
        live = {name: LiveState(state.checked, "; ".join(filter(None, (state.note, host.note))), state.in_sync,
                                state.findings) for name, state in live.items()}
    footer = Footer(__version__, socket.gethostname(), now.strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
                    tuple(ConfigDigest(str(dmz.source), dmz.config_hash) for dmz in dmzs))
    return ReportInput(tuple(dmzs), svg, "image/svg+xml", footer, blocks, live,
                       verify={dmz.name: read_record(settings.state_dir, dmz.name) for dmz in dmzs},
                       verify_paths={dmz.name: str(record_path(settings.state_dir, dmz.name)) for dmz in dmzs})


def write_report(dmzs: list[DMZ], output: Path, settings: Settings, offline: bool = False) -> int:
    """Write the HTML report; its size in bytes."""
    content = render_report(gather(dmzs, settings, offline)).encode()
    _write(output, content)
    return len(content)
