"""verify's rows for an egress allowlist by DNS name: from the probe namespace (where a VM stands), each
name is looked up through the gateway's dnsmasq (which fills the table's sets with the answer), then each
address answered is probed on the entry's first port, expected allowed as learned from that name (explain
--resolved). Nothing is sent but to the gateway and to the addresses the gateway answered."""

from __future__ import annotations

import ipaddress
from typing import Callable

from .probes import Probe


def resolve_specs(dmz, want6: bool, timeout: float) -> list[dict]:
    specs = []
    for name in dmz.egress_names:
        for qtype in ((1, 28) if want6 else (1,)):
            specs.append({"id": f"r{len(specs) + 1}", "proto": "resolve", "name": name, "qtype": qtype,
                          "dst": str(dmz.gateway.ip), "timeout": timeout})
    return specs


def name_probes(dmz, answers: list[dict], specs: list[dict], add: Callable) -> list[str]:
    """Plan a probe per answered address through `add(kind, dst, proto, port, learned, note)`; notes back."""
    from ..render.nft_edges import name_groups

    notes = []
    for spec, answer in zip(specs, answers):
        if answer.get("observed") != "reply":
            notes.append(f"{spec['name']}: the gateway did not answer ({answer.get('detail', 'no result')})")
            continue
        groups = [(key, names) for key, names in name_groups(dmz) if spec["name"] in names]
        for address in answer.get("addresses", []):
            for (proto, ports, _source), _names in groups:
                port = ports[0][0] if ports else 443
                add("name", ipaddress.ip_address(address), proto, port, (spec["name"],),
                    f"{spec['name']} (answered by the gateway)")
    return notes
