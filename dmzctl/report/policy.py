"""A DMZ's policy in decision order, as its nft table applies it: read off the very rules
render/nft.py renders for `up` (never a second description of them), named by explain's rule kinds
(explain/order.py), with set references shown with their elements and each jump to a log-and-drop
chain shown as the drop it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..config import DMZ
from ..explain.order import ORDER, rule_kind
from ..implicit import Blocked
from ..render.nft import render_table

# The chains in the order a packet from the DMZ meets them: routed through the host, then to the host.
CHAINS = ("forward", "from_dmz", "input", "to_host", "caps")
CHAIN_TITLES = {
    "forward": "routed through the host (forward hook)",
    "from_dmz": "from the DMZ, routed (from_dmz)",
    "input": "to the host itself (input hook)",
    "to_host": "from the DMZ to the host (to_host)",
    "caps": "per-VM caps on new flows (caps)",
}
MAX_ELEMENTS = 8


@dataclass(frozen=True)
class PolicyRow:
    step: int  # 1.. within its chain
    chain: str
    kind: str  # explain's rule kind (explain/order.py)
    what: str  # the rule's comment, as `nft list table` shows it
    match: str  # its matches, nft-like
    verdict: str  # accept | drop, logged … | continue to … | …


@dataclass(frozen=True)
class Rendered:
    """What the rendered commands hold: each chain's rules, each set's elements."""

    rules: dict[str, list[dict]]
    sets: dict[str, list]


def _collect(commands: list[dict]) -> Rendered:
    rules: dict[str, list[dict]] = {}
    sets: dict[str, list] = {}
    for command in commands:
        add = command.get("add", {})
        if "chain" in add:
            rules.setdefault(add["chain"]["name"], [])
        elif "rule" in add:
            rules.setdefault(add["rule"]["chain"], []).append(add["rule"])
        elif "set" in add:
            sets.setdefault(add["set"]["name"], [])
        elif "element" in add:
            sets.setdefault(add["element"]["name"], []).extend(add["element"]["elem"])
    return Rendered(rules, sets)


def _value(value: Any, rendered: Rendered) -> str:
    if isinstance(value, dict):
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "range" in value:
            return f"{value['range'][0]}-{value['range'][1]}"
        if "set" in value:
            return "{" + ", ".join(_value(item, rendered) for item in value["set"]) + "}"
        return _expression(value, rendered)
    if isinstance(value, list):
        if len(value) == 2 and isinstance(value[1], dict):  # a vmap element: [key, verdict]
            return f"{_value(value[0], rendered)}: {_verdict_word(value[1])}"
        return "{" + ", ".join(_value(item, rendered) for item in value) + "}"
    if isinstance(value, str) and value.startswith("@"):
        elements = [_value(item, rendered) for item in rendered.sets.get(value[1:], [])]
        if len(elements) > MAX_ELEMENTS:
            elements = elements[:MAX_ELEMENTS - 1] + [f"… {len(elements) - MAX_ELEMENTS + 1} more"]
        return f"{value} {{{', '.join(elements)}}}" if elements else f"{value} (empty)"
    return str(value)


def _expression(expr: dict, rendered: Rendered) -> str:
    if "payload" in expr:
        return f"{expr['payload']['protocol']} {expr['payload']['field']}"
    if "meta" in expr:
        return f"meta {expr['meta']['key']}"
    if "ct" in expr:
        return f"ct {expr['ct']['key']}"
    if "fib" in expr:
        return f"fib {' '.join(expr['fib']['flags'])} {expr['fib']['result']}"
    if "limit" in expr:
        limit = expr["limit"]
        over = "over " if limit.get("inv") else ""
        return f"limit rate {over}{limit['rate']}/{limit['per']} burst {limit['burst']} {limit['burst_unit']}"
    if "ct count" in expr:
        return f"ct count {'over ' if expr['ct count'].get('inv') else ''}{expr['ct count']['val']}"
    if "set" in expr and "op" in expr["set"]:
        inner = " ".join(_expression(stmt, rendered) for stmt in expr["set"]["stmt"])
        return f"{expr['set']['op']} {expr['set']['set']} {{ {_expression(expr['set']['elem'], rendered)} {inner} }}"
    if "vmap" in expr:
        return f"{_expression(expr['vmap']['key'], rendered)} vmap {_value(expr['vmap']['data'], rendered)}"
    if "match" in expr:
        match = expr["match"]
        op = "" if match["op"] in ("==", "in") else f"{match['op']} "
        return f"{_expression(match['left'], rendered)} {op}{_value(match['right'], rendered)}"
    return next(iter(expr), "?")


VERDICTS = ("accept", "drop", "jump", "goto", "return")


def _verdict_word(expr: dict) -> str:
    for name in VERDICTS:
        if name in expr:
            target = expr[name]["target"] if isinstance(expr[name], dict) else None
            return f"{name} {target}" if target else name
    return "?"


def _log_drop(rendered: Rendered, chain: str) -> Optional[str]:
    """'drop, logged "<prefix>" (rate-limited)' when `chain` is a log-and-drop chain."""
    prefix, drops = None, False
    for rule in rendered.rules.get(chain, []):
        for expr in rule["expr"]:
            if "log" in expr:
                prefix = expr["log"]["prefix"]
            drops = drops or "drop" in expr
    if not drops:
        return None
    return f'drop, logged "{prefix.strip()}" (rate-limited)' if prefix else "drop"


def _verdict(rule: dict, rendered: Rendered) -> str:
    verdicts = [expr for expr in rule["expr"] if any(name in expr for name in VERDICTS)]
    if not verdicts:
        vmap = next((e for e in rule["expr"] if "vmap" in e), None)
        return "each listed VM to its own caps chain" if vmap else "continue"
    word = _verdict_word(verdicts[-1])
    if word.startswith(("jump ", "goto ")):
        target = word.split(" ", 1)[1]
        return _log_drop(rendered, target) or f"on to chain {target}"
    return word


def policy_rows(dmz: DMZ, blocks: Optional[tuple[Blocked, ...]] = None) -> list[PolicyRow]:
    """Every rule of the chains a DMZ packet meets, in the order the table evaluates them."""
    rendered = _collect(render_table(dmz, blocks))
    rows = []
    own_caps = tuple(sorted(chain for chain in rendered.rules if chain.startswith("caps_")))  # caps of their own
    for chain in CHAINS + own_caps:
        assert chain.split("_")[0] in ORDER or chain in ORDER, chain
        for step, rule in enumerate(rendered.rules.get(chain, []), 1):
            matches = [_expression(e, rendered) for e in rule["expr"]
                       if not any(name in e for name in VERDICTS) and "counter" not in e and "vmap" not in e]
            matches += [_expression(e, rendered) for e in rule["expr"] if "vmap" in e]
            rows.append(PolicyRow(step, chain, rule_kind(rule["comment"]), rule["comment"],
                                  " ".join(matches) or "every packet", _verdict(rule, rendered)))
    return rows
