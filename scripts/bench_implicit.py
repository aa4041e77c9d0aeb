#!/usr/bin/env python3
"""What secure defaults cost: the implicit blocks (other DMZs, host subnets, private ranges) as the
number of the host's subnets grows.

For N host subnets (0, 10, 100, 1,000, 10,000), in a throwaway network namespace (nothing on the
host changes): how long dmzctl takes to render the demo DMZ's table and to apply it in one
transaction, how many rules the table holds and how many elements its sets hold. Prints a
Markdown table; medians of --runs applies.

    .venv/bin/python scripts/bench_implicit.py [--runs 5] [--sizes 0,10,100,1000,10000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys

from benchlib import REPO, Stopwatch, ratio, repeat, summary, table

NETNS = f"dmzb-implicit-{os.getpid()}"


def view_with(n: int):
    """A host with n extra interface subnets: every other /28 of 198.18.0.0/15, so that none merge."""
    from dmzctl.implicit import HostNetwork, HostView

    base = ipaddress.ip_network("198.18.0.0/15").network_address
    subnets = [ipaddress.ip_network(f"{base + 32 * i}/28") for i in range(n)]
    return HostView(networks=tuple(HostNetwork(s, interface=f"if{i}") for i, s in enumerate(subnets)))


def measure(n: int, runs: int) -> dict:
    """Inside the namespace: render the demo DMZ's batch with n host subnets, apply it `runs` times."""
    from dmzctl.config import load_dmz
    from dmzctl.host import nft
    from dmzctl.implicit import blocks_for
    from dmzctl.render.nft import apply_batch, delete_batch, table_name

    dmz = load_dmz(REPO / "examples" / "demo.toml")
    with Stopwatch() as render:
        batch = apply_batch(dmz, blocks_for(dmz, view_with(n)))
    apply = summary(repeat(lambda: nft.apply(batch), runs))
    rules = sum(1 for item in batch["nftables"] if "rule" in item.get("add", {}))
    elements = sum(len(item["add"]["element"]["elem"]) for item in batch["nftables"]
                   if "element" in item.get("add", {}))
    nft.apply(delete_batch(table_name(dmz)))
    return {"n": n, "render_ms": render.seconds * 1000, "apply_ms": apply.median * 1000,
            "apply_min_ms": apply.min * 1000, "apply_max_ms": apply.max * 1000, "rules": rules,
            "elements": elements}


def report(rows: list[dict], runs: int) -> str:
    floor = rows[0]["apply_ms"]
    return table(["host subnets", "set elements", "rules", "render", f"apply (median of {runs}, min-max)",
                  "apply vs N=0"],
                 [[f"{row['n']:,}", f"{row['elements']:,}", row["rules"], f"{row['render_ms']:.1f} ms",
                   f"{row['apply_ms']:.1f} ms ({row['apply_min_ms']:.1f}-{row['apply_max_ms']:.1f})",
                   f"{ratio(row['apply_ms'] / floor)}x"] for row in rows],
                 align="rrrrrr")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="0,10,100,1000,10000")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    if opts.inside:
        print(json.dumps([measure(n, opts.runs) for n in sizes]))
        return 0
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        result = subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, __file__, "--inside",
                                 "--runs", str(opts.runs), "--sizes", opts.sizes],
                                capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        rows = json.loads(result.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", NETNS])
    print(report(rows, opts.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
