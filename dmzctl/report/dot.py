"""A diagram.Graph as Graphviz DOT text: deterministic (same graph, same bytes), every id and label
quoted and escaped. Styles by kind live here, not in the graph."""

from __future__ import annotations

from .diagram import Cluster, Edge, Graph, Node

FONT = "DejaVu Sans"
GREEN, RED, GREY = "#1a7f37", "#cf222e", "#57606a"

GRAPH = {"rankdir": "LR", "fontname": FONT, "fontsize": "11", "nodesep": "0.35", "ranksep": "1.1",
         "newrank": "true", "labelloc": "b", "fontcolor": GREY}
NODE_DEFAULTS = {"shape": "box", "style": "rounded,filled", "fontname": FONT, "fontsize": "10"}
NODE_STYLES = {
    "host": {"fillcolor": "#eaeef2"},
    "uplink": {"fillcolor": "#eaeef2", "shape": "cds", "style": "filled"},
    "internet": {"fillcolor": "#ffffff", "shape": "ellipse", "style": "filled"},
    "bridge": {"fillcolor": "#fff8c5"},
    "vm": {"fillcolor": "#ddf4ff"},
    "protected": {"fillcolor": "#ffebe9", "color": RED},
    "target": {"fillcolor": "#dafbe1", "color": GREEN},
    "class": {"fillcolor": "#f6f8fa", "color": RED},
}
EDGE_STYLES = {
    "allowed": {"color": GREEN, "fontcolor": GREEN, "penwidth": "2"},
    # Drawn head to tail (dir=back) so that the LAN stays on the right with what the DMZ reaches.
    "inbound": {"color": GREEN, "fontcolor": GREEN, "penwidth": "1.5", "dir": "back"},
    "blocked": {"color": RED, "fontcolor": RED, "style": "dashed", "arrowhead": "tee"},
    "member": {"color": GREY, "dir": "none"},
    "plain": {"color": GREY},
}
CLUSTER_DEFAULTS = {"labeljust": "l", "labelloc": "t", "fontcolor": GREY}
CLUSTER_STYLES = {
    "host": {"style": "rounded", "color": GREY},
    "dmz": {"style": "rounded,filled", "color": "#d4a72c", "fillcolor": "#fffdf0"},
    "lan": {"style": "rounded", "color": RED},
    "implicit": {"style": "rounded,dashed", "color": RED},
}


def quote(text: str) -> str:
    """A DOT quoted string: backslashes and quotes escaped, newlines as centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(attrs: dict[str, str]) -> str:
    return "[" + ", ".join(f"{key}={quote(value)}" for key, value in attrs.items()) + "]"


def _node(node: Node, indent: str) -> str:
    attrs = {"label": "\n".join(node.label), **NODE_STYLES[node.kind]}
    return f"{indent}{quote(node.id)} {_attrs(attrs)};"


def _cluster(cluster: Cluster, nodes: dict[str, Node], indent: str) -> list[str]:
    attrs = {"label": "\n".join(cluster.label), **CLUSTER_DEFAULTS, **CLUSTER_STYLES[cluster.kind]}
    lines = [f"{indent}subgraph {quote(cluster.id)} {{", f"{indent}  graph {_attrs(attrs)};"]
    lines += [_node(nodes[node_id], indent + "  ") for node_id in cluster.nodes]
    for child in cluster.children:
        lines += _cluster(child, nodes, indent + "  ")
    lines.append(f"{indent}}}")
    return lines


def _placed(cluster: Cluster) -> set[str]:
    found = set(cluster.nodes)
    for child in cluster.children:
        found |= _placed(child)
    return found


def _edge(edge: Edge) -> str:
    attrs = dict(EDGE_STYLES[edge.kind])
    if edge.label:
        attrs = {"label": edge.label, **attrs}
    tail, head = (edge.head, edge.tail) if attrs.get("dir") == "back" else (edge.tail, edge.head)
    return f"  {quote(tail)} -> {quote(head)} {_attrs(attrs)};"


def to_dot(graph: Graph) -> str:
    nodes = {node.id: node for node in graph.nodes}
    lines = ["digraph \"dmzctl\" {", f"  graph {_attrs(dict(GRAPH, label=graph.caption))};",
             f"  node {_attrs(NODE_DEFAULTS)};", f"  edge {_attrs({'fontname': FONT, 'fontsize': '9'})};"]
    placed: set[str] = set()
    for cluster in graph.clusters:
        lines += _cluster(cluster, nodes, "  ")
        placed |= _placed(cluster)
    lines += [_node(node, "  ") for node in graph.nodes if node.id not in placed]
    lines += [_edge(edge) for edge in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"
