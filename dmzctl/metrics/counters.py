"""The counters of a DMZ's nft table, read off its libnftables JSON listing. Pure.

Rules are found by a stable marker, never by a list of chains or reasons, so that a rule
added to the table later (a new drop reason, a publish entry) is counted without a change here:

- a **drop**: a rule holding a `counter` statement and a `drop` verdict. Its reason is the rule's
  comment `drop <reason>` (render/nft.py's `_log_drop_chain` writes it for every log-and-drop
  chain); failing that, the reason in the log prefix `dmzctl <dmz> <reason>: ` of a log statement in
  the same chain; failing that, the chain's name;
- an **accept** that is counted: a rule holding a `counter` and an `accept` verdict, named by its
  comment: `hole <name>` (the holes: `dns`, `allow[N]`) or `publish...` (publish entries). A hole
  has two rules per family (forward and input): their counts are summed.

A rule with a counter and neither verdict (the caps' jumps to `flood`) is not a drop itself: the
`flood` chain's drop counts those packets once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

LOG_PREFIX = re.compile(r"^dmzctl (?P<dmz>\S+) (?P<reason>[A-Za-z0-9_-]+): $")


@dataclass
class Count:
    packets: int = 0
    bytes: int = 0

    def add(self, counter: dict) -> None:
        self.packets += int(counter.get("packets", 0))
        self.bytes += int(counter.get("bytes", 0))


@dataclass
class TableCounters:
    drops: dict[str, Count] = field(default_factory=dict)  # reason -> count
    holes: dict[str, Count] = field(default_factory=dict)  # hole name -> count
    published: dict[str, Count] = field(default_factory=dict)  # publish entry -> count


def _rules(listing: dict) -> list[dict]:
    return [item["rule"] for item in listing.get("nftables", []) if isinstance(item, dict) and "rule" in item]


def _counter_of(rule: dict) -> Optional[dict]:
    for expr in rule.get("expr", []):
        if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
            return expr["counter"]
    return None


def _verdicts(rule: dict) -> set[str]:
    return {key for expr in rule.get("expr", []) if isinstance(expr, dict)
            for key in expr if key in ("drop", "accept")}


def log_reasons(listing: dict) -> dict[str, str]:
    """chain -> the reason its log statement names (`dmzctl <dmz> <reason>: `)."""
    found = {}
    for rule in _rules(listing):
        for expr in rule.get("expr", []):
            log = expr.get("log") if isinstance(expr, dict) else None
            match = LOG_PREFIX.match(log.get("prefix", "")) if isinstance(log, dict) else None
            if match:
                found.setdefault(rule.get("chain", ""), match["reason"])
    return found


def _drop_reason(rule: dict, by_chain: dict[str, str]) -> str:
    comment = rule.get("comment") or ""
    if comment.startswith("drop ") and comment[5:].strip():
        return comment[5:].strip()
    return by_chain.get(rule.get("chain", ""), rule.get("chain", "unknown"))


def read_counters(listing: Optional[dict]) -> Optional[TableCounters]:
    """The table's drop and accept counters; None when the table is absent."""
    if listing is None:
        return None
    by_chain = log_reasons(listing)
    result = TableCounters()
    for rule in _rules(listing):
        counter = _counter_of(rule)
        if counter is None:
            continue
        verdicts = _verdicts(rule)
        comment = (rule.get("comment") or "").strip()
        if "drop" in verdicts:
            result.drops.setdefault(_drop_reason(rule, by_chain), Count()).add(counter)
        elif "accept" in verdicts and comment.startswith("hole "):
            result.holes.setdefault(comment[5:], Count()).add(counter)
        elif "accept" in verdicts and comment.startswith("publish"):
            result.published.setdefault(comment, Count()).add(counter)
    return result
