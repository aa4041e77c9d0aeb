#!/usr/bin/env python3
"""Benchmark dmzctl's nftables table against the 2008 original's linear iptables rules (issue 6).

Run as root with the project's venv:

    sudo /work/main/.venv/bin/python scripts/bench_firewall.py            # full run, ~10 min
    sudo /work/main/.venv/bin/python scripts/bench_firewall.py --quick    # N = 1, 10, 100

It measures, for DMZ configs with N protected prefixes and 50 holes:

1. apply time: (a) dmzctl.host.nft.apply(apply_batch(dmz)), (b) the original's way, one
   `iptables` process per rule, (c) `nft -j -f` of dmzctl's own JSON batch (the floor) and,
   for reference, (d) `iptables-restore` of the same rules as (b);
2. per-packet cost: iperf3 TCP throughput and small-datagram UDP rate from a "dmz" namespace
   through a "router" namespace (bridge, routes, firewall under test) to a "wan" namespace;
3. size: rules and set elements of both approaches, read back from the kernel.

Everything happens in network namespaces this script creates (named dmzb-<pid>-*) and
deletes again, also on failure or Ctrl-C. Every command that changes a firewall runs in a
worker (this file with `__worker`) that first checks it is not in the host's namespace.
No packet leaves the machine: the only addresses used are 198.18.0.0/15 (RFC 2544's
benchmarking range) between the namespaces and 10.0.0.0/8 as rule data.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import ipaddress
import json
import os
import platform
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchlib import (REPO, Interrupted, Report, Stopwatch, cpu_model, duration, interrupt_on_signals, kernel,
                      load_average, log, median, median_range, memory, os_name, publish, ratio, spread,
                      tool_version, use_working_tree)

use_working_tree()

DMZ_NAME = "bench"
BRIDGE = "dz-bench"  # dmzctl's default bridge name for a DMZ called "bench"
DMZ_NET = ipaddress.ip_network("198.18.1.0/24")
GATEWAY = "198.18.1.1"  # the router's address on the DMZ bridge (the original's DMZ_IP)
DMZ_HOST = "198.18.1.2"  # the iperf3 client, "in the DMZ"
WAN_ROUTER = "198.18.2.1"
WAN_HOST = "198.18.2.2"  # the iperf3 server, "on the internet"
PROTECTED_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
PROTECTED_STRIDE = 8  # one /30 every 8 addresses: never adjacent, so nothing collapses
HOLES = 50
HOLE_PORT = 8000
IPERF_PORT = 5201
DEFAULT_SIZES = (1, 10, 100, 1000, 10000)
QUICK_SIZES = (1, 10, 100)
PROGRESS_EVERY = 100  # the iptables script reports every this many rules
SAMPLES = 6  # per-rule cost samples for a stopped (b) run
SAMPLE_RULES = 50  # iptables calls timed per sample


# --- the policy under test --------------------------------------------------------------

def protected_prefixes(n: int) -> list[str]:
    if n * PROTECTED_STRIDE > 2 ** 24:
        raise ValueError(f"N={n} does not fit in 10.0.0.0/8")
    return [f"{ipaddress.IPv4Address(PROTECTED_BASE + PROTECTED_STRIDE * i)}/30" for i in range(n)]


def bench_holes(n: int) -> list[dict]:
    """50 [[dmz.allow]] entries: tcp to the first address of prefix i mod N, port 8000+i."""
    return [{"to": str(ipaddress.IPv4Address(PROTECTED_BASE + PROTECTED_STRIDE * (i % n) + 1)),
             "proto": "tcp", "port": HOLE_PORT + i} for i in range(HOLES)]


def bench_config(n: int) -> dict:
    """The TOML a user would write, as the dict tomllib gives parse_dmz."""
    return {"dmz": {"name": DMZ_NAME, "bridge": BRIDGE, "gateway": f"{GATEWAY}/{DMZ_NET.prefixlen}",
                    "protected": protected_prefixes(n), "allow": bench_holes(n)}}


def original_rules(n: int) -> list[list[str]]:
    """The original start_firewall() generalised to N protected prefixes and 50 holes.

    The same rules as the 2008 script, in its order, with every per-subnet block looped over
    the N prefixes: 14 rules per prefix, 10 fixed rules for the host and spoofing, and each
    hole as an ACCEPT in FORWARD and INPUT put first (so that it wins over the drops, as the
    original's DNS hole did for UDP). Returns iptables arguments without the binary.
    """
    prefixes = protected_prefixes(n)
    limit = ["-m", "limit", "--limit", "6/h", "--limit-burst", "5"]
    iface = ["-i", BRIDGE]
    rules: list[list[str]] = []
    for hole in bench_holes(n):
        for chain in ("FORWARD", "INPUT"):
            rules.append(["-A", chain, "-d", hole["to"], *iface, "-p", hole["proto"],
                          "--dport", str(hole["port"]), "-j", "ACCEPT"])
    for prefix in prefixes:  # deny new TCP connections to the internal network and Dom0
        for chain in ("FORWARD", "INPUT"):
            rules.append(["-A", chain, "-d", prefix, *iface, "-p", "tcp", "--syn", *limit, "-j", "LOG"])
            rules.append(["-A", chain, "-d", prefix, *iface, "-p", "tcp", "--syn", "-j", "DROP"])
    rules.append(["-A", "INPUT", "-d", GATEWAY, *iface, "-p", "tcp", "--syn", *limit, "-j", "LOG"])
    rules.append(["-A", "INPUT", "-d", GATEWAY, *iface, "-p", "tcp", "--syn", "-j", "DROP"])
    for prefix in prefixes:  # deny UDP to the internal network
        for chain in ("FORWARD", "INPUT"):
            rules.append(["-A", chain, "-d", prefix, *iface, "-p", "udp", *limit, "-j", "LOG"])
            rules.append(["-A", chain, "-d", prefix, *iface, "-p", "udp", "-j", "DROP"])
    rules.append(["-A", "INPUT", "-d", GATEWAY, *iface, "-p", "udp", "--dport", "137", "-j", "DROP"])
    rules.append(["-A", "INPUT", "-d", GATEWAY, *iface, "-p", "udp", *limit, "-j", "LOG"])
    rules.append(["-A", "INPUT", "-d", GATEWAY, *iface, "-p", "udp", "-j", "DROP"])
    icmp_types = ("echo-request", "redirect", "router-advertisement")
    for prefix in prefixes:  # deny selected ICMP to the internal network
        for chain in ("FORWARD", "INPUT"):
            for icmp_type in icmp_types:
                rules.append(["-A", chain, "-d", prefix, *iface, "-p", "icmp",
                              "--icmp-type", icmp_type, "-j", "DROP"])
    for icmp_type in icmp_types:
        rules.append(["-A", "INPUT", "-d", GATEWAY, *iface, "-p", "icmp", "--icmp-type", icmp_type, "-j", "DROP"])
    for chain in ("INPUT", "FORWARD"):  # spoofed packets from the DMZ (modern "! -s" syntax)
        rules.append(["-A", chain, "!", "-s", str(DMZ_NET), *iface, "-j", "DROP"])
    return rules


def original_rule_count(n: int) -> int:
    return 14 * n + 2 * HOLES + 10


def original_forward_count(n: int) -> int:
    return 7 * n + HOLES + 1


def iptables_script(binary: str, rules: list[list[str]]) -> str:
    lines = ["#!/bin/sh", "set -e"]
    for index, rule in enumerate(rules, 1):
        lines.append(shlex.join([binary, *rule]))
        if index % PROGRESS_EVERY == 0:
            lines.append(f"echo {index}")  # a shell builtin: no extra process
    lines.append(f"echo {len(rules)}")
    return "\n".join(lines) + "\n"


def restore_text(rules: list[list[str]]) -> str:
    return "*filter\n" + "\n".join(" ".join(rule) for rule in rules) + "\nCOMMIT\n"  # no token needs quoting


def batch_counts(batch: dict) -> dict:
    """Rules, chains and set elements of dmzctl's batch, and rules a forwarded packet meets."""
    rules: dict[str, int] = {}
    chains = elements = 0
    for command in batch["nftables"]:
        body = command.get("add", {})
        if "rule" in body:
            rules[body["rule"]["chain"]] = rules.get(body["rule"]["chain"], 0) + 1
        elif "chain" in body:
            chains += 1
        elif "element" in body:
            elements += len(body["element"]["elem"])
    return {"rules": sum(rules.values()), "chains": chains, "elements": elements,
            # a new flow to a non-protected address matches nothing until the chain policy
            "per_packet_new": rules.get("forward", 0) + rules.get("from_dmz", 0)
            + rules.get("backstop_forward", 0) + rules.get("backstop_from_dmz", 0),
            "per_packet_established": 1}


# --- the worker: runs inside a namespace, does one firewall thing, prints JSON ----------

def _set_pdeathsig() -> None:
    """preexec_fn: die with the parent, so nothing outlives an interrupted run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort
        pass


def _netns_id() -> str:
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def _assert_own_namespace() -> None:
    # The parent passes the namespace it runs in (the host's); a worker must be somewhere else.
    host = os.environ.get("DMZB_HOST_NETNS")
    if not host or host == _netns_id():
        raise SystemExit("refusing to touch a firewall outside a benchmark namespace")


def worker(mode: str, args: list[str]) -> int:
    _assert_own_namespace()
    result: dict[str, Any] = {}
    if mode == "dmzctl":
        from dmzctl.config import parse_dmz
        from dmzctl.host.nft import apply
        from dmzctl.render.nft import apply_batch
        dmz = parse_dmz(json.loads(Path(args[0]).read_text()))
        with Stopwatch() as clock:
            apply(apply_batch(dmz))
        result["seconds"] = clock.seconds
    elif mode == "nft":
        result["seconds"] = _timed_process(["nft", "-j", "-f", args[0]])
    elif mode == "restore":
        with open(args[1], "rb") as rules:
            result["seconds"] = _timed_process([args[0]], stdin=rules)
    elif mode == "iptables":
        result = _run_iptables_script(args[0], float(args[1]), int(args[2]))
    elif mode == "count":
        result = _count(args[0], args[1:])
    elif mode == "clear":
        _clear(args[0])
    else:
        raise SystemExit(f"unknown worker mode {mode}")
    print(json.dumps(result))
    return 0


def _timed_process(argv: list[str], stdin=None) -> float:
    """The seconds one process took, from start to exit; a failure ends the worker with its message."""
    with Stopwatch() as clock:
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed: {proc.stderr.strip()[:500]}")
    return clock.seconds


def _run_iptables_script(script: str, cap: float, total: int) -> dict:
    """sh runs one iptables process per rule; stop it at `cap` seconds (0: no cap)."""
    errors = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while sh runs
    t0 = time.perf_counter()
    proc = subprocess.Popen(["sh", script], stdout=subprocess.PIPE, stderr=errors, preexec_fn=_set_pdeathsig)
    progress: list[tuple[int, float]] = [(0, 0.0)]
    buffer = b""
    capped = False
    try:
        fd = proc.stdout.fileno()
        while True:
            timeout = None if cap <= 0 else max(0.0, cap - (time.perf_counter() - t0))
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                capped = True
                break
            chunk = os.read(fd, 65536)
            now = time.perf_counter() - t0
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip().isdigit():
                    progress.append((int(line), now))
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by PID; its current iptables child ends by itself
        proc.wait()
    seconds = time.perf_counter() - t0
    errors.seek(0)
    stderr = errors.read().decode(errors="replace").strip()
    if not capped and proc.returncode != 0:
        raise SystemExit(f"the iptables script failed (rc {proc.returncode}): {stderr[:500]}")
    applied = progress[-1][0]
    return {"seconds": seconds, "capped": capped, "applied": applied, "total": total,
            "progress": progress[:: max(1, len(progress) // 200)] + [progress[-1]]}


def _count(save: str, what: list[str]) -> dict:
    """dmzctl's table, and optionally the namespace's tables and iptables' rules.

    `nft list tables` reads every rule (nft 1.0.6): with 140,000 iptables-nft rules present it
    takes ~25 s, as does iptables-save ~10 s; so each is only done when asked.
    """
    counts: dict[str, Any] = {"nft_rules": 0, "nft_chains": 0, "nft_elements": 0}
    items = []
    for table in (f"dmzctl-{DMZ_NAME}", f"dmzctl-{DMZ_NAME}.backstop"):  # the table and its backstop
        listing = subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True)
        if listing.returncode == 0:
            items += json.loads(listing.stdout).get("nftables", [])
    if items:
        for item in items:
            if "rule" in item:
                counts["nft_rules"] += 1
            elif "chain" in item:
                counts["nft_chains"] += 1
            elif "set" in item:
                counts["nft_elements"] += len(item["set"].get("elem", []))
    if "tables" in what:
        out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True, check=True).stdout
        counts["tables"] = sorted(f"{item['table']['family']} {item['table']['name']}"
                                  for item in json.loads(out).get("nftables", []) if "table" in item)
    if "iptables" in what:
        saved = subprocess.run([save], capture_output=True, text=True, check=True).stdout.splitlines()
        counts["ipt_rules"] = sum(1 for line in saved if line.startswith("-A "))
        counts["ipt_forward"] = sum(1 for line in saved if line.startswith("-A FORWARD "))
    return counts


def _clear(iptables: str) -> None:
    """Remove both firewalls from this (benchmark) namespace: dmzctl's tables and iptables'."""
    for family, name in (("inet", f"dmzctl-{DMZ_NAME}"), ("inet", f"dmzctl-{DMZ_NAME}.backstop"), ("ip", "filter")):
        subprocess.run(["nft", "delete", "table", family, name], capture_output=True)  # absent is fine
    if "legacy" in Path(iptables).name:
        for chain in ("INPUT", "FORWARD"):
            subprocess.run([iptables, "-F", chain], check=True)


# --- the parent: namespaces, runs, report ------------------------------------------------

class Bench:
    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.prefix = f"dmzb-{os.getpid()}"
        self.namespaces: list[str] = []
        self.children: list[subprocess.Popen] = []
        self.serial = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="dmzb-"))
        self.tmp.chmod(0o755)
        # Debian's names: iptables{,-nft,-legacy} with -restore and -save of the same flavour
        self.iptables = shutil.which(opts.iptables) or opts.iptables
        self.restore = shutil.which(f"{opts.iptables}-restore") or f"{opts.iptables}-restore"
        self.save = shutil.which(f"{opts.iptables}-save") or f"{opts.iptables}-save"

    # namespaces
    def netns(self, tag: str) -> str:
        self.serial += 1
        name = f"{self.prefix}-{tag}{self.serial}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.namespaces.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    def drop_netns(self, name: str) -> None:
        if name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], check=False, stderr=subprocess.DEVNULL)
            self.namespaces.remove(name)

    def ip(self, ns: str, *args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True)

    def cleanup(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()  # by PID: only processes this script started
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for name in list(self.namespaces):
            self.drop_netns(name)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def worker(self, ns: str, mode: str, *args: str, timeout: float = 600) -> dict:
        cmd = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()), "__worker", mode, *args]
        env = dict(os.environ, DMZB_HOST_NETNS=_netns_id())
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_set_pdeathsig,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {mode} in {ns} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # inputs per N
    def inputs(self, n: int) -> dict:
        from dmzctl.config import parse_dmz
        from dmzctl.render.nft import apply_batch
        config = bench_config(n)
        dmz = parse_dmz(config)
        if len(dmz.protected) != n or len(dmz.holes) != HOLES:
            raise RuntimeError(f"N={n}: parse_dmz gave {len(dmz.protected)} prefixes, {len(dmz.holes)} holes")
        batch = apply_batch(dmz)
        rules = original_rules(n)
        assert len(rules) == original_rule_count(n)
        paths = {"config": self.tmp / f"config-{n}.json", "batch": self.tmp / f"batch-{n}.json",
                 "script": self.tmp / f"iptables-{n}.sh", "restore": self.tmp / f"restore-{n}.txt"}
        paths["config"].write_text(json.dumps(config))
        paths["batch"].write_text(json.dumps(batch))
        paths["script"].write_text(iptables_script(self.iptables, rules))
        paths["restore"].write_text(restore_text(rules))
        return {"paths": {k: str(v) for k, v in paths.items()}, "counts": batch_counts(batch),
                "rules": len(rules), "rule_list": rules, "batch_bytes": paths["batch"].stat().st_size}

    # 1. apply time
    def apply_times(self, n: int, inp: dict) -> dict:
        opts = self.opts
        times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
        b_info: dict[str, Any] = {"capped": None, "spent": 0.0}
        for run in range(opts.runs):
            this_run: dict[str, str] = {}
            for approach in ("a", "c", "d", "b"):
                if approach == "b" and not self._more_b(times["b"], b_info):
                    continue
                ns = self.netns("apply")
                try:
                    if approach == "a":
                        res = self.worker(ns, "dmzctl", inp["paths"]["config"])
                    elif approach == "c":
                        res = self.worker(ns, "nft", inp["paths"]["batch"])
                    elif approach == "d":
                        res = self.worker(ns, "restore", self.restore, inp["paths"]["restore"])
                    else:
                        cap = opts.iptables_cap
                        res = self.worker(ns, "iptables", inp["paths"]["script"], str(cap), str(inp["rules"]),
                                          timeout=(cap + 120) if cap > 0 else 24 * 3600)
                        b_info["spent"] += res["seconds"]
                        if res["capped"]:
                            b_info["capped"] = res
                            this_run["b"] = (f"stopped at the {cap:.0f} s cap after {res['applied']:,} "
                                             f"of {inp['rules']:,} rules")
                            continue
                finally:
                    self.drop_netns(ns)
                times[approach].append(res["seconds"])
                this_run[approach] = duration(res["seconds"])
            log(f"  N={n} run {run + 1}/{opts.runs}: " + ", ".join(f"{k}={v}" for k, v in this_run.items()))
        if b_info["capped"]:
            b_info.update(self.estimate_b(n, inp, b_info["capped"]))
        return {"times": times, "b": b_info, "load": os.getloadavg()[0]}

    def estimate_b(self, n: int, inp: dict, capped: dict) -> dict:
        """What a stopped (b) run would have taken: the per-rule cost sampled where it did not get.

        At each of SAMPLES sizes k between where the run stopped and the end, a fresh namespace gets
        the first k rules with iptables-restore (untimed), then the next SAMPLE_RULES rules one
        iptables process each, exactly as the script would have run them (timed). The estimate is
        the measured part plus the trapezoid integral of that per-rule cost over the rules left.
        """
        rules, total = inp["rule_list"], inp["rules"]
        progress = capped["progress"]
        k_done, t_done = progress[-1]
        back = progress[max(0, len(progress) - 6)]
        points = [(k_done, (t_done - back[1]) / (k_done - back[0]))] if k_done > back[0] else []
        last = max(k_done, total - SAMPLE_RULES)
        for j in range(1, SAMPLES + 1):
            k = int(k_done + (last - k_done) * j / SAMPLES)
            prefix, script = self.tmp / f"sample-{n}-{k}.txt", self.tmp / f"sample-{n}-{k}.sh"
            prefix.write_text(restore_text(rules[:k]))
            script.write_text(iptables_script(self.iptables, rules[k:k + SAMPLE_RULES]))
            ns = self.netns("sample")
            try:
                self.worker(ns, "restore", self.restore, str(prefix))
                res = self.worker(ns, "iptables", str(script), "0", str(SAMPLE_RULES))
            finally:
                self.drop_netns(ns)
                prefix.unlink()
                script.unlink()
            points.append((k, res["seconds"] / len(rules[k:k + SAMPLE_RULES])))
            log(f"  N={n} (b) sample: {points[-1][1] * 1e3:.1f} ms per iptables call with {k:,} rules present")
        rest = sum((k1 - k0) * (c0 + c1) / 2 for (k0, c0), (k1, c1) in zip(points, points[1:]))
        rest += (total - points[-1][0]) * points[-1][1]
        return {"estimate": t_done + rest, "samples": points}

    def _more_b(self, done: list[float], info: dict) -> bool:
        if info["capped"]:
            return False
        if not done:
            return True
        # another run only while it is expected to fit in the per-N budget for (b)
        return info["spent"] + median(done) <= self.opts.iptables_budget

    # 2. per-packet cost
    def topology(self) -> dict:
        router, dmz, wan = self.netns("rtr"), self.netns("dmz"), self.netns("wan")
        for ns in (router, dmz, wan):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=False)
        self.ip(router, "link", "add", BRIDGE, "type", "bridge")
        self.ip(router, "link", "add", "dzp0", "type", "veth", "peer", "name", "eth0", "netns", dmz)
        self.ip(router, "link", "set", "dzp0", "master", BRIDGE)
        self.ip(router, "link", "add", "wan0", "type", "veth", "peer", "name", "eth0", "netns", wan)
        self.ip(router, "addr", "add", f"{GATEWAY}/{DMZ_NET.prefixlen}", "dev", BRIDGE)
        self.ip(router, "addr", "add", f"{WAN_ROUTER}/24", "dev", "wan0")
        self.ip(dmz, "addr", "add", f"{DMZ_HOST}/{DMZ_NET.prefixlen}", "dev", "eth0")
        self.ip(wan, "addr", "add", f"{WAN_HOST}/24", "dev", "eth0")
        for ns, dev in ((router, BRIDGE), (router, "dzp0"), (router, "wan0"), (dmz, "eth0"), (wan, "eth0")):
            self.ip(ns, "link", "set", dev, "up")
        self.ip(dmz, "route", "add", "default", "via", GATEWAY)
        self.ip(wan, "route", "add", str(DMZ_NET), "via", WAN_ROUTER)
        subprocess.run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", wan, "iperf3", "-s", "-B", WAN_HOST, "-p", str(IPERF_PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_set_pdeathsig)
        self.children.append(server)
        topo = {"router": router, "dmz": dmz, "wan": wan, "server": server}
        # the first packets through a fresh bridge port can be lost: warm the path up
        for attempt in range(20):
            try:
                self.iperf(topo, ["-n", "64K"], timeout=10)
                break
            except RuntimeError:
                if server.poll() is not None:
                    raise RuntimeError("the iperf3 server in the wan namespace exited")
                time.sleep(0.3)
        else:
            raise RuntimeError("no iperf3 connection dmz -> wan through the router namespace")
        return topo

    def iperf(self, topo: dict, extra: list[str], timeout: float) -> dict:
        cmd = ["ip", "netns", "exec", topo["dmz"], "iperf3", "-c", WAN_HOST, "-B", DMZ_HOST, "-p", str(IPERF_PORT),
               "-J", "--connect-timeout", "2000", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_set_pdeathsig)
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            data = {}
        if proc.returncode != 0 or "error" in data:
            raise RuntimeError(f"iperf3 failed: {data.get('error') or proc.stderr.strip()[:300]}")
        return data

    def set_firewall(self, topo: dict, kind: str, inp: Optional[dict]) -> None:
        """Clear the router namespace, load one firewall, check it is there (and nothing else)."""
        router = topo["router"]
        self.worker(router, "clear", self.iptables)
        if kind == "dmzctl":
            self.worker(router, "dmzctl", inp["paths"]["config"])
        elif kind == "iptables":
            # loaded in one go: how the rules got there does not change what a packet meets
            self.worker(router, "restore", self.restore, inp["paths"]["restore"])
        # iptables-restore is all or nothing; reading 140,000 rules back costs more than the test
        # itself (see _count), so big rulesets are counted in the size part instead
        small = kind != "iptables" or inp["rules"] <= 20000
        legacy = "legacy" in Path(self.iptables).name
        counts = self.worker(router, "count", self.save, *(("tables", "iptables") if small else ()))
        expect = {"nft_rules": inp["counts"]["rules"] if kind == "dmzctl" else 0}
        if small:
            expect["ipt_rules"] = inp["rules"] if kind == "iptables" else 0
            expect["tables"] = {"none": [], "dmzctl": [f"inet dmzctl-{DMZ_NAME}", f"inet dmzctl-{DMZ_NAME}.backstop"],
                                "iptables": [] if legacy else ["ip filter"]}[kind]
            if legacy:
                counts["tables"] = [t for t in counts["tables"] if t != "ip filter"]
        got = {key: counts.get(key) for key in expect}
        if got != expect:
            raise RuntimeError(f"{kind}: the router namespace holds {got}; expected {expect}")

    def throughput(self, topo: dict, n: int, inp: dict) -> list[dict]:
        """none, dmzctl, iptables in turn, `throughput_runs` rounds, so that load drift hits all three."""
        opts = self.opts
        kinds = ("none", "dmzctl", "iptables")
        samples: dict[str, dict[str, list]] = {k: {"tcp": [], "udp": [], "sent": [], "load": []} for k in kinds}
        # client and server on different CPUs: less run-to-run variation from the scheduler
        cpus = sorted(os.sched_getaffinity(0))
        affinity = ["-A", f"{cpus[0]},{cpus[1]}"] if len(cpus) >= 2 else []
        for _ in range(opts.throughput_runs):
            for kind in kinds:
                self.set_firewall(topo, kind, inp)
                data = self.iperf(topo, ["-t", str(opts.iperf_time), *affinity], timeout=opts.iperf_time + 30)
                samples[kind]["tcp"].append(data["end"]["sum_received"]["bits_per_second"])
                data = self.iperf(topo, ["-u", "-l", str(opts.udp_size), "-b", "0", "-t", str(opts.iperf_time),
                                         *affinity], timeout=opts.iperf_time + 30)
                s = data["end"]["sum"]
                samples[kind]["udp"].append((s["packets"] - s["lost_packets"]) / s["seconds"])
                samples[kind]["sent"].append(s["packets"] / s["seconds"])
                samples[kind]["load"].append(os.getloadavg()[0])
                log(f"  N={n} {kind:8s}: TCP {gbit(samples[kind]['tcp'][-1])} Gbit/s, UDP "
                    f"{samples[kind]['udp'][-1] / 1e3:.1f} kpps received, {samples[kind]['sent'][-1] / 1e3:.1f} "
                    f"sent (load {samples[kind]['load'][-1]:.2f})")
        self.set_firewall(topo, "none", inp)
        rows = []
        for kind in kinds:
            got = samples[kind]
            rows.append({"n": n, "kind": kind, "tcp": median(got["tcp"]),
                         "udp": median(got["udp"]), "sent": median(got["sent"]),
                         "load": max(got["load"]), "samples": got,
                         "per_packet": {"none": 0, "dmzctl": "1 / %d" % inp["counts"]["per_packet_new"],
                                        "iptables": original_forward_count(n)}[kind]})
        return rows

    # 3. size
    def size(self, n: int, inp: dict) -> dict:
        ns = self.netns("size")
        try:
            self.worker(ns, "dmzctl", inp["paths"]["config"])
            self.worker(ns, "restore", self.restore, inp["paths"]["restore"])
            kernel = self.worker(ns, "count", self.save, "iptables")
        finally:
            self.drop_netns(ns)
        return {"n": n, "batch": inp["counts"], "kernel": kernel, "ipt_rules": inp["rules"],
                "ipt_forward": original_forward_count(n), "batch_bytes": inp["batch_bytes"]}


# --- the report ------------------------------------------------------------------------

def gbit(bps: float) -> str:
    value = bps / 1e9
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def kpps(packets_per_second: float) -> str:
    return f"{packets_per_second / 1e3:.1f}"


def machine() -> dict:
    return {
        "CPU": cpu_model(),
        "Cores": f"{os.cpu_count()} (as the kernel sees them)",
        "Memory": memory(),
        "Kernel": kernel(full=True),
        "OS": os_name(),
        "nft": tool_version(["nft", "--version"]),
        "iptables": tool_version(["iptables", "--version"]),
        "iperf3": tool_version(["iperf3", "--version"]),
        "Python": f"{platform.python_version()} ({sys.executable})",
    }


def report(opts, bench: Bench, info: dict, started: dt.datetime, load_start, load_end, duration_s: float,
           apply_rows: list, tput_rows: list, size_rows: list) -> str:
    doc = Report()
    command = " ".join(["scripts/bench_firewall.py", *map(shlex.quote, opts.argv)])
    doc.add("# Firewall benchmarks: dmzctl's nftables table vs. the original's linear iptables rules",
            f"Generated by `{command}` (issue 6). "
            f"Run it again to refresh these figures; they are from one run on a shared machine.",
            "## Machine")
    doc.table(["", ""], [*info.items(),
                         ["Date", started.strftime('%Y-%m-%d %H:%M:%S %Z')],
                         ["Load average (1/5/15 min)", f"at start {load_average(load_start, ' ')}; "
                                                       f"at end {load_average(load_end, ' ')}"],
                         ["Duration", f"{duration_s:.0f} s"]])
    doc.add("Other engineers run tests on this machine at the same time: the load average above and next to "
            "each throughput figure says how busy it was. Figures are wall-clock.")
    setup_section(doc, opts, bench)
    apply_section(doc, apply_rows)
    throughput_section(doc, opts, bench, tput_rows)
    size_section(doc, size_rows)
    return doc.text()


def setup_section(doc: Report, opts, bench: Bench) -> None:
    doc.add("## Set-up", "\n".join([
        f"- Each config has N protected /30 prefixes, one every {PROTECTED_STRIDE} addresses from 10.0.0.0 "
        f"(never adjacent, so dmzctl's parse_dmz collapses none of them), and {HOLES} holes: "
        f"`[[dmz.allow]]` tcp to the first address of prefix i mod N, port {HOLE_PORT}+i. "
        f"DMZ {DMZ_NET} on bridge `{BRIDGE}`, gateway {GATEWAY}.",
        "- **(a) dmzctl**: `dmzctl.host.nft.apply(apply_batch(dmz))` timed inside a worker process in the "
        "namespace (the DMZ is parsed before the clock starts; Python start-up is not counted).",
        f"- **(b) original**: the 2008 `start_firewall()`, one `{Path(bench.iptables).name}` process per rule "
        "run by `sh` from a script, linear rules. Rules generated (iptables syntax):",
        f"  - per hole, first: `-A FORWARD|INPUT -d <hole> -i {BRIDGE} -p tcp --dport <port> -j ACCEPT` (2 rules; "
        "the original had one DNS hole, in FORWARD only; dmzctl opens every hole for both forward and input);",
        f"  - per protected prefix, 14 rules, in the original's order (each block looped over the prefixes): "
        f"FORWARD and INPUT `-d <prefix> -i {BRIDGE} -p tcp --syn -m limit --limit 6/h --limit-burst 5 -j LOG` "
        "and `... -p tcp --syn -j DROP`; the same pair for `-p udp`; "
        "`-p icmp --icmp-type echo-request|redirect|router-advertisement -j DROP` (3 per chain);",
        f"  - 10 fixed rules: INPUT `-d {GATEWAY}` tcp SYN LOG+DROP, udp dport 137 DROP, udp LOG+DROP, "
        f"the 3 ICMP DROPs; anti-spoofing `! -s {DMZ_NET} -i {BRIDGE} -j DROP` in INPUT and FORWARD, last.",
        f"  - In total 14·N + {2 * HOLES + 10} rules; a forwarded packet that matches none (all allowed "
        f"traffic: the original has no ESTABLISHED shortcut) is checked against every FORWARD rule: "
        f"7·N + {HOLES + 1}.",
        f"  - (b) is stopped after {opts.iptables_cap:.0f} s per run and gets at most ~{opts.iptables_budget:.0f} s "
        "of runs per N (another run only if it is expected to fit), so it has fewer runs at large N; a stopped "
        "run is shown as `> cap` with how far it got, plus an estimate of the whole run: each iptables call "
        "reads the whole ruleset, so a call costs more the more rules exist; the cost per call is measured at "
        f"{SAMPLES} sizes between where the run stopped and the end (first k rules loaded with {Path(bench.restore).name}, "
        f"then the next {SAMPLE_RULES} rules of the script timed, one process each) and integrated over the "
        "rules that were left.",
        "- **(c) floor**: `nft -j -f batch.json` of dmzctl's own JSON batch (`apply_batch`), timed around the "
        "`nft` process.",
        f"- **(d) reference**: `{Path(bench.restore).name}` of exactly the rules of (b), one process.",
        "- Each run uses a fresh network namespace (created and deleted outside the timing).",
    ]))


def apply_section(doc: Report, apply_rows: list) -> None:
    """(a) against (b), and against the floor (c): min / median / max, ratios of medians."""
    rows = []
    for row in apply_rows:
        t = row["times"]
        med = {k: median(v) for k, v in t.items() if v}
        b_cell = spread(t["b"], empty="–")
        a_b = ratio(med["a"] / med["b"]) if "b" in med else "–"
        capped = row["b"]["capped"]
        if capped and t["b"]:  # completed runs, then one that hit the cap
            b_cell += f" (+1 run stopped at {duration(capped['seconds'])})"
        elif capped:
            est = row["b"].get("estimate")
            b_cell = (f"> {duration(capped['seconds'])} (stopped: {capped['applied']:,} of "
                      f"{capped['total']:,} rules" + (f"; est. ≈ {duration(est)}" if est else "") + ")")
            a_b = f"< {ratio(med['a'] / capped['seconds'])}" + (f" (≈ {ratio(med['a'] / est)})" if est else "")
        runs_b = f"{len(t['b'])}" + ("+1 stopped" if capped else "")
        rows.append([f"{row['n']:,}", f"{len(t['a'])}/{runs_b}/{len(t['c'])}/{len(t['d'])}",
                     spread(t["a"], empty="–"), b_cell, spread(t["c"], empty="–"), spread(t["d"], empty="–"),
                     a_b, ratio(med["a"] / med["c"]), f"{row['load']:.2f}"])
    doc.add("## 1. Apply time",
            "min / median / max per approach; ratios of medians (a/b < 1: dmzctl is faster).")
    doc.table(["N", "runs a/b/c/d", "(a) dmzctl apply", "(b) iptables per rule", "(c) nft -j -f",
               "(d) iptables-restore", "a/b", "a/c", "load 1 min"], rows, align="rlllllrrr")


def throughput_section(doc: Report, opts, bench: Bench, tput_rows: list) -> None:
    """TCP and small-UDP rates through each firewall, against that N's unfiltered path."""
    doc.add("## 2. Per-packet cost")
    if not tput_rows:
        doc.add("Skipped (`--no-throughput`).")
        return
    doc.add(f"iperf3 from namespace dmz ({DMZ_HOST}, on bridge `{BRIDGE}`) to namespace wan ({WAN_HOST}) "
            "through namespace router, which holds the bridge, the routes and the firewall under test "
            f"(nothing else). TCP: {opts.iperf_time} s, one stream, receiver's rate. UDP: "
            f"`-u -l {opts.udp_size} -b 0` ({opts.udp_size}-byte datagrams, as fast as one sender can), "
            f"{opts.iperf_time} s, datagrams received per second (median, and min–max over the runs; and sent: the sender's system call carries the "
            "packet through bridge, router and firewall, so its rate shows the path's per-packet cost even when "
            "the receiver drops). iperf3 client and server pinned to different CPUs (`-A`). "
            f"Median of {opts.throughput_runs} run(s) each; the three firewalls take turns in each round and are "
            "compared with that N's own unfiltered runs; \"load\" is the highest 1-minute load average seen. "
            f"The iptables rules are loaded with {Path(bench.restore).name} here (the same rules as (b)). "
            "\"rules per packet\": rules a forwarded packet of an allowed flow is checked against "
            "(dmzctl: established / first packet of a flow). dmzctl's table also turns on connection tracking "
            "in the router namespace, which the other two do not; that cost is included in its figures.")
    none = [row["samples"] for row in tput_rows if row["kind"] == "none"]
    tcp_none = [v for got in none for v in got["tcp"]]
    udp_none = [v for got in none for v in got["udp"]]
    doc.add(f"Noise: over this run the unfiltered path alone measured {gbit(min(tcp_none))}–{gbit(max(tcp_none))} "
            f"Gbit/s TCP and {min(udp_none) / 1e3:.0f}–{max(udp_none) / 1e3:.0f} kpps UDP; differences smaller than "
            "that spread (typical at small N) are the machine's other load, not the firewall.")
    rows = []
    base = {}
    for row in tput_rows:
        if row["kind"] == "none":
            base[row["n"]] = row
        b = base[row["n"]]
        got = row["samples"]
        per_packet = row["per_packet"] if isinstance(row["per_packet"], str) else f"{row['per_packet']:,}"
        rows.append([f"{row['n']:,}", row["kind"], per_packet, median_range(got["tcp"], gbit),
                     ratio(row["tcp"] / b["tcp"]), median_range(got["udp"], kpps), ratio(row["udp"] / b["udp"]),
                     median_range(got["sent"], kpps), f"{row['load']:.2f}"])
    doc.table(["N", "firewall", "rules per packet", "TCP Gbit/s", "TCP vs none", "UDP kpps received",
               "UDP vs none", "UDP kpps sent", "load 1 min"], rows, align="rlrrrrrrr")


def size_section(doc: Report, size_rows: list) -> None:
    """Rules and set elements of both, as the kernel holds them."""
    doc.add("## 3. Size",
            "Counted in the kernel after applying both firewalls in a fresh namespace "
            "(dmzctl: `nft -j list table inet dmzctl-bench`; original: `iptables-save`). dmzctl's rules are fixed; "
            "the prefixes are elements of the interval set `protected4`.")
    rows = []
    for row in size_rows:
        k = row["kernel"]
        rows.append([f"{row['n']:,}", f"{k['nft_rules']:,}", f"{k['nft_elements']:,}", f"{k['nft_chains']:,}",
                     f"{row['batch_bytes'] / 1024:,.0f} KiB", f"{k['ipt_rules']:,}", 0, f"{k['ipt_forward']:,}"])
    doc.table(["N", "dmzctl rules", "dmzctl set elements", "dmzctl chains", "dmzctl JSON batch", "iptables rules",
               "iptables set elements", "iptables FORWARD rules"], rows, align="rrrrrrrr")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="protected prefix counts, e.g. 1,10,100 (default 1,10,100,1000,10000)")
    parser.add_argument("--runs", type=int, help="apply runs per approach and N (default 5; --quick 3)")
    parser.add_argument("--quick", action="store_true",
                        help="N = 1,10,100, 3 runs, 1 iperf3 run each, 30 s cap for (b): about a minute")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"), help="Markdown file to write")
    parser.add_argument("--no-throughput", action="store_true", help="skip the iperf3 part")
    parser.add_argument("--iperf-time", type=int, help="seconds per iperf3 run (default 2)")
    parser.add_argument("--throughput-runs", type=int,
                        help="iperf3 runs per firewall and N, median reported (default 2; --quick 1)")
    parser.add_argument("--udp-size", type=int, default=64, help="UDP payload bytes for the packet-rate test")
    parser.add_argument("--iptables-cap", type=float,
                        help="stop one run of (b) after this many seconds, 0 = never (default 120; --quick 30)")
    parser.add_argument("--iptables-budget", type=float,
                        help="seconds of (b) runs per N before fewer runs are made (default 150; --quick 20)")
    parser.add_argument("--iptables", default="iptables",
                        help="iptables binary for (b), e.g. iptables-legacy (default: iptables, here the nft flavour)")
    opts = parser.parse_args(argv)
    opts.argv = argv
    quick = opts.quick
    opts.sizes = [int(x) for x in opts.sizes.split(",")] if opts.sizes else list(QUICK_SIZES if quick else DEFAULT_SIZES)
    if any(n < 1 for n in opts.sizes):
        parser.error("--sizes must be positive")
    opts.runs = opts.runs or (3 if quick else 5)
    opts.iperf_time = opts.iperf_time or 2
    opts.throughput_runs = opts.throughput_runs or (1 if quick else 2)
    opts.iptables_cap = opts.iptables_cap if opts.iptables_cap is not None else (30.0 if quick else 120.0)
    opts.iptables_budget = opts.iptables_budget if opts.iptables_budget is not None else (20.0 if quick else 150.0)
    return opts


def main(argv: list[str]) -> int:
    if argv[:1] == ["__worker"]:
        return worker(argv[1], argv[2:])
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_firewall.py needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("ip", "nft", "sh", opts.iptables, f"{opts.iptables}-restore",
                                 f"{opts.iptables}-save") + (() if opts.no_throughput else ("iperf3",))
               if not shutil.which(tool)]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    stale = [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                          text=True).stdout.splitlines() if line.startswith("dmzb-")]
    if stale:
        log(f"note: namespaces from other runs exist (left alone): {', '.join(stale)}")

    interrupt_on_signals()
    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    t_start = time.monotonic()
    info = machine()
    log(f"sizes {opts.sizes}, {opts.runs} runs; load average {load_average(load_start, ' ')}")
    bench = Bench(opts)
    apply_rows, tput_rows, size_rows = [], [], []
    try:
        inputs = {}
        for n in opts.sizes:
            inputs[n] = bench.inputs(n)
        log("1. apply time")
        for n in opts.sizes:
            row = bench.apply_times(n, inputs[n])
            row["n"] = n
            apply_rows.append(row)
        log("3. size")
        for n in opts.sizes:
            size_rows.append(bench.size(n, inputs[n]))
        if not opts.no_throughput:
            log("2. per-packet cost")
            topo = bench.topology()
            for n in opts.sizes:
                tput_rows += bench.throughput(topo, n, inputs[n])
    except (KeyboardInterrupt, Interrupted):
        log("interrupted: cleaning up")
        return 130
    finally:
        bench.cleanup()
    elapsed = time.monotonic() - t_start
    publish(report(opts, bench, info, started, load_start, os.getloadavg(), elapsed, apply_rows, tput_rows, size_rows),
            Path(opts.output))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
