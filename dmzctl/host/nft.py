"""nftables through libnftables' JSON API: one batch per change, atomic, and reading back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any, Optional

from ..errors import FirewallError, HostError
from ..render.nft import FAMILY
from ..render.nft_backstop import backstop_name
from ..render.nft_edges import is_name_set


def _binding():
    try:
        import nftables
    except ImportError:
        raise HostError("the nftables Python binding is missing: apt-get install python3-nftables "
                        "(and use a venv made with --system-site-packages)") from None
    return nftables


def binding_available() -> None:
    """Raises the one-line HostError when the nftables binding is missing: checked before any change."""
    _binding()


def _client(dry_run: bool = False):
    # A fresh object each time: after a dry run, the same object can refuse a
    # real apply with "conflicting intervals" (HOST-NOTES).
    nft = _binding().Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
    if dry_run:
        nft.set_dry_run(True)
    return nft


def apply(batch: dict, dry_run: bool = False) -> None:
    """Send one batch; nothing of it is committed unless all of it is."""
    rc, _out, err = _client(dry_run).json_cmd(batch)
    if rc != 0:
        first = next((line for line in err.splitlines() if line.strip()), "unknown error")
        raise FirewallError(f"nftables refused the firewall batch, nothing was changed: {first}", batch)


def list_table(name: str) -> Optional[dict]:
    """The table as libnftables lists it (without handles), or None if absent."""
    rc, out, _err = _client().cmd(f"list table {FAMILY} {name}")
    if rc != 0:
        return None
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        # libnftables 1.0.6 garbles some tables' JSON (e.g. `flags owner`); such a
        # table exists but cannot be ours as rendered.
        return {"nftables": [{"unparseable": out}]}


def table_exists(name: str) -> bool:
    rc, _out, _err = _binding().Nftables().cmd(f"list table {FAMILY} {name}")
    return rc == 0


def firewall_exists(table: str) -> bool:
    """The main table or its backstop: either is dmzctl's to remove."""
    return table_exists(table) or table_exists(backstop_name(table))


def list_firewall(table: str) -> Optional[dict]:
    """The main table followed by its backstop, as one listing; None when the main table is absent
    (a missing backstop shows as its chains missing)."""
    main = list_table(table)
    if main is None:
        return None
    backstop = list_table(backstop_name(table))
    items = main.get("nftables", []) + [item for item in (backstop or {}).get("nftables", []) if "metainfo" not in item]
    return {"nftables": items}


def canonical(listing: Optional[dict]) -> Any:
    """A listing reduced to what defines the policy: no handles, counters or limits' state, and no
    elements in the sets the packet path fills (the caps' meters: their elements are state)."""
    if listing is None:
        return None
    dynamic = _dynamic_sets(listing)
    objects = []
    for item in listing.get("nftables", []):
        if "metainfo" in item:
            continue
        (kind, body), = item.items()
        if not isinstance(body, dict):
            objects.append({kind: body})
            continue
        body = {k: v for k, v in body.items() if k not in ("handle", "index")}
        if kind == "set" and body.get("name") in dynamic:
            body.pop("elem", None)
        if kind == "rule":
            body["expr"] = [_strip_counter(e) for e in body.get("expr", [])]
        objects.append({kind: body})
    return objects


def _dynamic_sets(listing: dict) -> set:
    """Names of the sets that rules add to or update from the packet path (`add @s {...}`), and
    those the gateway's dnsmasq fills from its answers (an egress allowlist's names)."""
    names = {item["set"]["name"] for item in listing.get("nftables", [])
             if isinstance(item, dict) and isinstance(item.get("set"), dict)
             and is_name_set(item["set"].get("name", ""))}
    for item in listing.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        for expr in (rule or {}).get("expr", []):
            target = expr.get("set", {}).get("set") if isinstance(expr, dict) and isinstance(expr.get("set"), dict) \
                else None
            if isinstance(target, str) and target.startswith("@"):
                names.add(target[1:])
    return names


def _strip_counter(expr: Any) -> Any:
    if isinstance(expr, dict) and "counter" in expr:
        return {"counter": None}
    return expr


def _listed_in_throwaway_netns(batch: dict, table: str, json_output: bool) -> list[str]:
    """Apply `batch` in a network namespace of its own and list `table` and its backstop there
    (one output each; a table the batch does not make lists as nothing).

    libnftables lists a table differently from the JSON that created it; applying
    it where nothing else lives and reading it back gives the form to compare with.
    """
    unshare = shutil.which("unshare")
    binary = shutil.which("nft")
    if not unshare or not binary:
        raise HostError("unshare (util-linux) and nft (nftables) are needed to compare firewall tables")
    tables = [table, backstop_name(table)]
    # Three nft runs in one throwaway namespace, without a shell: a small Python step runs them in
    # turn and separates the listings with a NUL.
    steps = ("import subprocess, sys; nft, j, tables = sys.argv[1], sys.argv[2] == 'json', sys.argv[3:]; "
             "r = subprocess.run([nft, '-j', '-f', '-'], stdin=sys.stdin); r.returncode and sys.exit(r.returncode); "
             "out = [subprocess.run([nft] + (['-j'] if j else []) + ['list', 'table', 'inet', t], "
             "capture_output=True, text=True).stdout for t in tables]; "
             "sys.stdout.write(chr(0).join(out))")
    result = subprocess.run([unshare, "--net", sys.executable, "-I", "-c", steps, binary,
                             "json" if json_output else "text", *tables],
                            input=json.dumps(batch), capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise FirewallError(f"nftables refused the firewall batch: {result.stderr.strip()}", batch)
    return result.stdout.split("\0")


def kernel_form(batch: dict, table: str) -> Any:
    """How the kernel lists `batch` once applied (JSON, canonical), to compare with list_firewall(table)."""
    main, backstop = _listed_in_throwaway_netns(batch, table, json_output=True)
    items = json.loads(main).get("nftables", [])
    if backstop.strip():
        items += [item for item in json.loads(backstop).get("nftables", []) if "metainfo" not in item]
    return canonical({"nftables": items})


def kernel_text(batch: dict, table: str) -> str:
    """How `nft list table` shows `batch` once applied (the table, then its backstop), for people."""
    return "".join(_listed_in_throwaway_netns(batch, table, json_output=False))


def list_table_text(name: str) -> Optional[str]:
    """The table in nft's own syntax, for people."""
    nft = _binding().Nftables()
    rc, out, _err = nft.cmd(f"list table {FAMILY} {name}")
    return out if rc == 0 else None


def list_firewall_text(table: str) -> Optional[str]:
    """The main table and its backstop in nft's own syntax; None when neither exists."""
    parts = [text for text in (list_table_text(table), list_table_text(backstop_name(table))) if text is not None]
    return "".join(parts) if parts else None
