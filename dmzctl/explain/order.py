"""The kinds of rule in each chain, in the order render/nft.py emits them: explain walks them in
this order, and tests/test_explain.py checks it against every rendered table."""

from __future__ import annotations

from ..implicit import SET_NAMES

# The kinds of rule in each chain, in the order render/nft.py emits them; explain walks them in this
# order, and tests/test_explain.py checks it against every rendered table.
ORDER = {
    "forward": ("established", "from-dmz", "to-dmz"),
    "input": ("established", "host-multicast", "from-dmz"),
    "from_dmz": ("caps", "within-dmz", "vm-to-vm", "spoofed", "hole", "protected", "other-dmz", "host-net",
                 "private", "dns-elsewhere", "egress-allow", "egress-name", "egress"),
    "to_dmz": ("lan-inbound", "published", "published-from", "inbound"),
    "dstnat": ("dnat",),
    "to_host": ("caps", "spoofed", "hole", "dhcp", "dns", "dns6", "dhcp6", "nd", "host"),
    "caps": ("own-caps", "new-flows", "flows"),
}


def rule_kind(comment: str) -> str:
    """The kind of a rendered rule, from its comment (what `nft list table` shows)."""
    fixed = {
        "replies to allowed flows": "established", "from the DMZ": "from-dmz",
        "IPv4 source outside the DMZ subnet": "spoofed", "IPv6 source outside the DMZ subnet": "spoofed",
        "the DMZ has no IPv6": "spoofed", "VM to VM (isolate_vms)": "vm-to-vm",
        "VM to VM within the DMZ": "within-dmz", "DNS to the gateway (IPv6)": "dns6",
        "DHCPv6 to the gateway": "dhcp6",
        "to protected IPv4": "protected", "to protected IPv6": "protected", "egress none": "egress",
        "DHCP to the gateway": "dhcp", "DNS to the gateway": "dns", "IPv6 neighbour discovery": "nd",
        "everything else to the host": "host", "the host's own multicast, looped back": "host-multicast",
        "new flows: per-VM caps": "caps", "VMs with caps of their own": "own-caps",
    }
    if comment.startswith("hole "):
        return "hole"
    edges = _edge_kind(comment)
    if edges is not None:
        return edges
    for kind in SET_NAMES:
        if comment in (f"to {kind} IPv4", f"to {kind} IPv6"):
            return kind
    if comment.startswith("new flows over ") and comment.endswith("max_new_flows"):
        return "new-flows"
    if comment.startswith("flows over ") and comment.endswith("max_flows"):
        return "flows"
    return fixed.get(comment, f"unknown: {comment}")


def _edge_kind(comment: str):
    """The kinds of render/nft_edges.py's rules."""
    prefixes = (("into the DMZ", "to-dmz"), ("from protected IPv", "lan-inbound"), ("published IPv", "published"),
                ("not published", "inbound"), ("DNS to anywhere but the gateway", "dns-elsewhere"),
                ("egress allowlist IPv", "egress-allow"), ("egress to ", "egress-name"),
                ("egress allowlist: anything else", "egress"))
    for prefix, kind in prefixes:
        if comment.startswith(prefix):
            return kind
    if comment.startswith("publish["):
        return "dnat" if " from " in comment else "published-from"
    return None
