"""The one-file HTML report, pure: from the configs and facts gathered beforehand (the drawn diagram,
the live check, the recorded verify runs) to HTML text. Jinja2 with autoescaping: every value is
escaped; the picture is inline (a data: URI); nothing is fetched when the page is opened."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ..config import DMZ, Hole
from ..implicit import Blocked
from .policy import CHAIN_TITLES, PolicyRow, policy_rows
from .vms import vm_facts

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class LiveState:
    """`check`'s findings for one DMZ, or why there are none."""

    checked: bool  # False: not on the host (or its state could not be read)
    note: str = ""
    in_sync: Optional[bool] = None
    findings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigDigest:
    path: str
    sha256: str


@dataclass(frozen=True)
class Footer:
    version: str
    hostname: str
    generated_at: str
    configs: tuple[ConfigDigest, ...] = ()


@dataclass(frozen=True)
class ReportInput:
    dmzs: tuple[DMZ, ...]
    diagram: bytes  # the topology as SVG (or PNG)
    diagram_type: str  # image/svg+xml | image/png
    footer: Footer
    blocks: dict[str, tuple[Blocked, ...]] = field(default_factory=dict)  # as applied; absent: offline
    live: dict[str, LiveState] = field(default_factory=dict)
    verify: dict[str, Optional[dict]] = field(default_factory=dict)  # the recorded run, by DMZ
    verify_paths: dict[str, str] = field(default_factory=dict)


def hole_text(hole: Hole) -> str:
    ports = "" if hole.ports is None else (f" port {hole.ports[0]}" if hole.ports[0] == hole.ports[1]
                                           else f" ports {hole.ports[0]}-{hole.ports[1]}")
    source = f" from {hole.source_vm}" if hole.source_vm else f" from {hole.source_net}" if hole.source_net else ""
    return f"{hole.origin}: {hole.proto}{ports} to {hole.to}{source}"


def _row_view(row: PolicyRow) -> dict:
    css = "accept" if row.verdict == "accept" else "drop" if row.verdict.startswith("drop") else ""
    return {"step": row.step, "kind": row.kind, "what": row.what, "match": row.match, "verdict": row.verdict,
            "css": css}


def _chains(rows: list[PolicyRow]) -> list[dict]:
    chains: dict[str, list[dict]] = {}
    for row in rows:
        chains.setdefault(row.chain, []).append(_row_view(row))
    return [{"title": CHAIN_TITLES.get(name, f"caps of their own ({name})"), "rows": views}
            for name, views in chains.items()]


def _verify_view(record: Optional[dict]) -> Optional[dict]:
    if record is None:
        return None
    counts = record.get("counts", {})
    summary = (f"{counts.get('probes', 0)} probes: {counts.get('blocked_as_expected', 0)} blocked and "
               f"{counts.get('allowed_as_expected', 0)} allowed as expected")
    bad = [f"{counts[k]} {k}" for k in ("MISMATCH", "unconfirmed", "error") if counts.get(k)]
    probes = [{"status": p.get("status", "?"), "expected": p.get("expected", "?"),
               "observed": p.get("observed") or "-", "label": _probe_label(p), "rule": p.get("rule", "")}
              for p in record.get("probes", [])]
    return {"ok": bool(record.get("ok")), "finished_at": record.get("finished_at", "unknown time"),
            "summary": summary + (f"; {', '.join(bad)}" if bad else ""), "probes": probes,
            "notes": list(record.get("notes", [])), "problems": list(record.get("problems", []))}


def _probe_label(probe: dict) -> str:
    dst, port = str(probe.get("dst", "?")), probe.get("port")
    target = (f"[{dst}]" if ":" in dst else dst) + (f":{port}" if port else "")
    kind = f"{probe.get('proto', '?')}" + (f" type {probe['icmp_type']}" if probe.get("icmp_type") is not None else "")
    return f"{kind} {target}"


def _section(dmz: DMZ, data: ReportInput) -> dict:
    return {
        "name": dmz.name, "dmz": dmz,
        "protected": ", ".join(str(net) for net in dmz.protected),
        "holes": [hole_text(hole) for hole in dmz.holes],
        "chains": _chains(policy_rows(dmz, data.blocks.get(dmz.name))),
        "live": data.live.get(dmz.name, LiveState(False, "no live state was gathered")),
        "verify": _verify_view(data.verify.get(dmz.name)),
        "verify_path": data.verify_paths.get(dmz.name, "(no state directory)"),
        "vms": vm_facts(dmz),
    }


def data_uri(content: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(content).decode()}"


def render_report(data: ReportInput) -> str:
    environment = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = environment.get_template("report.html.j2")
    names = ", ".join(dmz.name for dmz in data.dmzs)
    alt = "; ".join(f"DMZ {dmz.name} reaches " + (", ".join(hole_text(h) for h in dmz.holes) or "no hole")
                    + " and nothing else of its protected subnets" for dmz in data.dmzs)
    return template.render(
        title=names, sections=[_section(dmz, data) for dmz in data.dmzs], footer=data.footer,
        css=(TEMPLATES / "report.css").read_text(), live_view=bool(data.blocks),
        diagram_uri=data_uri(data.diagram, data.diagram_type), diagram_alt=alt,
        diagram_note="" if data.blocks else "Drawn without reading the host: its own subnets are listed "
                                            "when the table is applied.",
    )
