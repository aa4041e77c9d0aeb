"""Text for `dmzctl render`: the documents `up` would apply, in order."""

from __future__ import annotations

import json
from typing import Optional

from .config import DMZ
from .desired import build
from .errors import ConfigError
from .implicit import HostView
from .render.base import to_string
from .render.domain import HostFacts
from .render.nft import apply_batch

WHAT = ("all", "network", "nwfilter", "nft", "domain:NAME")


def render_text(dmzs: list[DMZ], what: str, virt_type: Optional[str] = None, view: HostView = HostView()) -> str:
    if virt_type not in (None, "kvm", "qemu"):
        raise ConfigError([f"--virt-type: must be kvm or qemu; got {virt_type!r}"])
    if what not in ("all", "network", "nwfilter", "nft") and not what.startswith("domain:"):
        raise ConfigError([f"--what: must be one of {', '.join(WHAT)}; got {what!r}"])
    facts = HostFacts(virt_type_override=virt_type)
    parts: list[str] = []
    found_domain = False
    for dmz in dmzs:
        desired = build(dmz, facts, view)
        if what in ("all", "network"):
            parts.append(to_string(desired.network))
        if what in ("all", "nwfilter"):
            parts.extend(to_string(element) for element in desired.nwfilters.values())
        if what in ("all", "nft"):
            parts.append(json.dumps(apply_batch(dmz, desired.blocks), indent=2) + "\n")
        for name, element in desired.domains.items():
            if what == "all" or what == f"domain:{name}":
                parts.append(to_string(element))
                found_domain = True
    if what.startswith("domain:") and not found_domain:
        names = ", ".join(vm.name for dmz in dmzs for vm in dmz.vms) or "none"
        raise ConfigError([f"--what: no VM named {what[7:]!r}; VMs: {names}"])
    return "".join(parts)
