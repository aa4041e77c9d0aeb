"""The topology as a graph, pure: what can reach what, from the configs and a view of the host.

The graph is data (nodes, clusters, edges); dmzctl/report/dot.py writes it as DOT text and
Graphviz draws it. Each kind of arrow has its own builder with one signature,
`(dmz, blocks) -> list[Edge]`, listed in EDGE_BUILDERS: a new kind of flow (published services,
egress allowlists) is one more builder there. An edge's endpoint named `target:<prefix>` needs no
node of its own: target_nodes() makes one, inside the LAN it belongs to when it is protected.

What the picture says, for each DMZ:
  - the host holds the DMZ bridges (subnets, VMs with their addresses) and its uplink;
  - holes (`dns`, [[dmz.allow]]) are green arrows labelled proto/port, from the VM they are
    restricted to, else from the bridge (any VM of the DMZ);
  - the protected subnets, the host itself and the implicit classes (implicit.py: other DMZs,
    host subnets, private ranges) get red dashed "blocked" arrows;
  - the LAN reaching into the DMZ, and egress through the uplink, are drawn as the policy says.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import DMZ, Hole
from ..implicit import CLASSES, HOST_NET, OTHER_DMZ, PRIVATE, Blocked, HostNetwork, HostView, blocks_for

MAX_LINES = 6  # prefixes listed in one node before "… and N more"


@dataclass(frozen=True)
class Node:
    id: str
    label: tuple[str, ...]  # lines
    kind: str  # host | uplink | internet | bridge | vm | protected | target | class


@dataclass(frozen=True)
class Edge:
    tail: str
    head: str
    label: str
    kind: str  # allowed | blocked | inbound | member | plain


@dataclass(frozen=True)
class Cluster:
    id: str
    label: tuple[str, ...]
    kind: str  # host | dmz | lan | implicit
    nodes: tuple[str, ...]
    children: tuple["Cluster", ...] = ()


@dataclass(frozen=True)
class HostInfo:
    """What --live knows of the host: its name and the uplink (the default route's interface)."""

    name: Optional[str] = None
    uplink: Optional[str] = None
    uplink_nets: tuple = ()


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    clusters: tuple[Cluster, ...]
    edges: tuple[Edge, ...]
    caption: str


# --- node names ---------------------------------------------------------------------

def bridge_id(dmz: DMZ) -> str:
    return f"bridge:{dmz.name}"


def vm_id(dmz: DMZ, vm_name: str) -> str:
    return f"vm:{dmz.name}/{vm_name}"


def lan_key(dmz: DMZ) -> str:
    return ",".join(str(net) for net in dmz.protected)


def protected_id(dmz: DMZ) -> str:
    return f"protected:{lan_key(dmz)}"


def target_id(net) -> str:
    return f"target:{net}"


def class_id(kind: str) -> str:
    return f"class:{kind}"


# --- edges, one builder per kind of flow -----------------------------------------------

def member_edges(dmz: DMZ, blocks: tuple[Blocked, ...]) -> list[Edge]:
    """Each VM on its DMZ's bridge."""
    return [Edge(vm_id(dmz, vm.name), bridge_id(dmz), "", "member") for vm in dmz.vms]


def _ports_text(hole: Hole) -> str:
    if hole.ports is None:
        return hole.proto if hole.proto in ("icmp", "icmpv6") else f"{hole.proto}/any port"
    low, high = hole.ports
    return f"{hole.proto}/{low}" if low == high else f"{hole.proto}/{low}-{high}"


def hole_edges(dmz: DMZ, blocks: tuple[Blocked, ...]) -> list[Edge]:
    """The holes: one green arrow per (source, target), labelled with every proto/port it allows."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for hole in dmz.holes:
        if hole.source_vm is not None:
            tail = vm_id(dmz, hole.source_vm)
        else:
            tail = bridge_id(dmz)  # any VM of the DMZ (or from a DMZ address: said in the label)
        origin = "DNS" if hole.origin == "dns" else hole.origin
        source = f" from {hole.source_net}" if hole.source_net is not None else ""
        labels = grouped.setdefault((tail, target_id(hole.to)), [])
        text = f"{origin}{source}: {_ports_text(hole)}"
        if text not in labels:
            labels.append(text)
    return [Edge(tail, head, _join_same_origin(labels), "allowed") for (tail, head), labels in grouped.items()]


def _join_same_origin(labels: list[str]) -> str:
    """["DNS: udp/53", "DNS: tcp/53"] -> "DNS: udp/53, tcp/53" (one line per origin)."""
    lines: dict[str, list[str]] = {}
    for label in labels:
        origin, _, ports = label.partition(": ")
        lines.setdefault(origin, []).append(ports)
    return "\n".join(f"{origin}: {', '.join(ports)}" for origin, ports in lines.items())


def host_edges(dmz: DMZ, blocks: tuple[Blocked, ...]) -> list[Edge]:
    """The host itself: everything dropped, but DHCP and DNS to the gateway (dhcp on)."""
    but = "\nbut DHCP, DNS to the gateway" if dmz.dhcp else ""
    return [Edge(bridge_id(dmz), "host", f"blocked{but}", "blocked")]


def blocked_edges(dmz: DMZ, blocks: tuple[Blocked, ...]) -> list[Edge]:
    """The protected subnets and each implicit class: dropped, every protocol, logged."""
    edges = [Edge(bridge_id(dmz), protected_id(dmz), "blocked\nevery protocol", "blocked")]
    for kind in CLASSES:
        if kind == PRIVATE and not dmz.block_private_ranges:
            continue
        edges.append(Edge(bridge_id(dmz), class_id(kind), "blocked", "blocked"))
    return edges


def lan_edges(dmz: DMZ, blocks: tuple[Blocked, ...]) -> list[Edge]:
    """The LAN opens flows into the DMZ (the DMZ's replies are established flows), unless
    inbound = "published" with lan_inbound = false closes it like any other source."""
    if dmz.inbound == "published" and not dmz.lan_inbound:
        return [Edge(protected_id(dmz), bridge_id(dmz), "LAN → DMZ: published only\n(lan_inbound = false)",
                     "inbound")]
    return [Edge(protected_id(dmz), bridge_id(dmz), "LAN → DMZ\nallowed", "inbound")]


def _publish_label(publish) -> str:
    low, high = publish.ports
    text = f"{publish.proto}/{low if low == high else f'{low}-{high}'}"
    if publish.listen is not None:
        where = "every host address" if publish.listen == "host" else str(publish.listen)
        first, last = publish.listen_ports
        text += f" via {where}:{first if first == last else f'{first}-{last}'}"
    if publish.sources:
        text += " from " + ", ".join(str(net) for net in publish.sources[:MAX_LINES])
    return text


def publish_edges(dmz: DMZ, blocks: tuple[Blocked, ...]) -> list[Edge]:
    """From beyond the host to each published VM; with inbound = "published", the rest is blocked."""
    grouped: dict[str, list[str]] = {}
    for publish in dmz.publish:
        grouped.setdefault(vm_id(dmz, publish.to), []).append(_publish_label(publish))
    edges = [Edge("internet", head, "published:\n" + "\n".join(labels), "allowed") for head, labels in grouped.items()]
    if dmz.inbound == "published":
        edges.append(Edge("internet", bridge_id(dmz), "blocked\nevery other port (inbound)", "blocked"))
    return edges


def _egress_ports(entry) -> str:
    if entry.ports is None:
        return f"{entry.proto}/any"
    low, high = entry.ports
    return f"{entry.proto}/{low if low == high else f'{low}-{high}'}"


def egress_edges(dmz: DMZ, blocks: tuple[Blocked, ...]) -> list[Edge]:
    """Beyond the host, what nothing above blocks: open with egress = "any", dropped with "none", and
    with "allowlist" only the listed destinations (per VM where `from` says so), the rest dropped."""
    if dmz.egress == "none":
        return [Edge(bridge_id(dmz), "uplink", "blocked\negress none", "blocked")]
    if dmz.egress != "allowlist":
        return [Edge(bridge_id(dmz), "uplink", "egress: any address\nnot private, not listed", "allowed")]
    grouped: dict[str, dict[str, list[str]]] = {}  # tail -> destination -> its proto/ports
    for entry in dmz.egress_allow:
        tail = vm_id(dmz, entry.source_vm) if entry.source_vm else bridge_id(dmz)
        ports = grouped.setdefault(tail, {}).setdefault(str(entry.to_name or entry.to_net), [])
        ports.append(_egress_ports(entry))
    edges = [Edge(tail, "uplink", "allowlist:\n" + "\n".join(f"{to}: {', '.join(ports)}" for to, ports in to.items()),
                  "allowed") for tail, to in grouped.items()]
    edges.append(Edge(bridge_id(dmz), "uplink", "blocked\negress not in the allowlist", "blocked"))
    return edges


EdgeBuilder = Callable[[DMZ, tuple[Blocked, ...]], list[Edge]]
EDGE_BUILDERS: tuple[EdgeBuilder, ...] = (member_edges, hole_edges, host_edges, blocked_edges, lan_edges,
                                          publish_edges, egress_edges)


# --- nodes and clusters --------------------------------------------------------------

def _listed(nets, limit: int = MAX_LINES) -> tuple[str, ...]:
    names = [str(net) for net in dict.fromkeys(nets)]
    if len(names) > limit:
        return tuple(names[:limit - 1]) + (f"… and {len(names) - limit + 1} more",)
    return tuple(names)


def _dmz_cluster(dmz: DMZ) -> tuple[Cluster, list[Node]]:
    subnets = [str(net) for net in (dmz.subnet, dmz.subnet6) if net is not None]
    nodes = [Node(bridge_id(dmz), (f"bridge {dmz.bridge}", *subnets, f"gateway {dmz.gateway.ip}",
                                   f"mode {dmz.mode}"), "bridge")]
    for vm in dmz.vms:
        addresses = [str(a) for a in (vm.ip, vm.ip6) if a is not None] or ["address by DHCP"]
        nodes.append(Node(vm_id(dmz, vm.name), (f"VM {vm.name}", *addresses), "vm"))
    between = "VMs isolated from each other" if dmz.isolate_vms else "VM to VM allowed"
    label = (f"DMZ {dmz.name}", between)
    return Cluster(f"cluster_dmz:{dmz.name}", label, "dmz", tuple(n.id for n in nodes)), nodes


def _class_node(kind: str, blocks: list[Blocked], live: bool) -> Node:
    nets = [b.net for b in blocks if b.kind == kind]
    if kind == OTHER_DMZ:
        head, empty = "other dmzctl DMZs", "(each one's subnets, as they come up)"
    elif kind == HOST_NET:
        head, empty = "host subnets", "(interfaces, libvirt networks: read live)" if not live else "(none)"
    else:
        head, empty = "private and special ranges", "(none)"
    body = _listed(nets, MAX_LINES if kind != PRIVATE else 8) or (empty,)
    return Node(class_id(kind), (head, *body), "class")


def target_nodes(dmzs: list[DMZ], edges: list[Edge]) -> tuple[list[Node], dict[str, list[str]]]:
    """A node for every `target:` endpoint (head or tail); those inside a DMZ's protected subnets go
    in its LAN."""
    nodes, in_lan = [], {}
    for edge in edges:
        for end in (edge.head, edge.tail):
            if not end.startswith("target:") or any(n.id == end for n in nodes):
                continue
            net = ipaddress.ip_network(end.removeprefix("target:"))
            what = "DNS server" if edge.label.startswith("DNS") else "hole" if edge.kind == "allowed" else "address"
            name = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
            nodes.append(Node(end, (name, what), "target"))
            owner = next((d for d in dmzs if any(net.subnet_of(p) for p in d.protected
                                                  if p.version == net.version)), None)
            if owner is not None:
                in_lan.setdefault(lan_key(owner), []).append(end)
    return nodes, in_lan


def _lan_clusters(dmzs: list[DMZ], in_lan: dict[str, list[str]]) -> tuple[list[Cluster], list[Node]]:
    clusters, nodes = [], []
    for dmz in dmzs:
        key = lan_key(dmz)
        if any(c.id == f"cluster_lan:{key}" for c in clusters):
            continue
        rest = Node(protected_id(dmz), ("protected", *_listed(dmz.protected),
                                        "everything else" if in_lan.get(key) else "every address"), "protected")
        nodes.append(rest)
        clusters.append(Cluster(f"cluster_lan:{key}", ("protected LAN",), "lan",
                                tuple(in_lan.get(key, [])) + (rest.id,)))
    return clusters, nodes


def build_graph(dmzs: list[DMZ], view: Optional[HostView] = None, host: HostInfo = HostInfo()) -> Graph:
    """The whole picture. view=None: offline, the other DMZs known from `dmzs` themselves."""
    live = view is not None
    if view is None:
        view = offline_view(dmzs)
    blocks = {dmz.name: blocks_for(dmz, view) for dmz in dmzs}
    edges = [edge for dmz in dmzs for build in EDGE_BUILDERS for edge in build(dmz, blocks[dmz.name])]
    targets, in_lan = target_nodes(dmzs, edges)
    dmz_clusters, nodes = [], []
    for dmz in dmzs:
        cluster, members = _dmz_cluster(dmz)
        dmz_clusters.append(cluster)
        nodes += members
    uplink = ("uplink", host.uplink, *_listed(host.uplink_nets)) if host.uplink else ("uplink",)
    nodes += [Node("host", ("the host itself", "every address of it"), "host"), Node("uplink", uplink, "uplink"),
              Node("internet", ("beyond the host",), "internet")]
    host_cluster = Cluster("cluster_host", (f"host {host.name}" if host.name else "host",), "host",
                           ("host", "uplink"), tuple(dmz_clusters))
    lan_clusters, lan_nodes = _lan_clusters(dmzs, in_lan)
    every_block = [b for dmz in dmzs for b in blocks[dmz.name]]
    used = {e.head for e in edges}
    classes = [_class_node(kind, every_block, live) for kind in CLASSES if class_id(kind) in used]
    implicit = Cluster("cluster_implicit", ("not listed: blocked by default",), "implicit",
                       tuple(n.id for n in classes))
    edges.append(Edge("uplink", "internet", "", "plain"))
    caption = "green: allowed · red dashed: blocked (dropped and logged)"
    return Graph(tuple(nodes + lan_nodes + targets + classes), (host_cluster, *lan_clusters, implicit),
                 tuple(dict.fromkeys(edges)), caption)


def offline_view(dmzs: list[DMZ]) -> HostView:
    """Without the host: the DMZs given are each other's "other DMZs", as their tables will say."""
    return HostView(networks=tuple(HostNetwork(net, interface=dmz.bridge, libvirt_network=dmz.name, dmz=dmz.name)
                                   for dmz in dmzs for net in (dmz.subnet, dmz.subnet6) if net is not None))
