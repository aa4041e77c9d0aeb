#!/usr/bin/env python3
"""How dmzctl scales on one host: 1, 5 and 20 DMZs of 5 tiny VMs each, up to 100 VMs (issue 14).

Run as root with the project's venv, on a quiet machine (nothing else using libvirtd: this
restarts it):

    /work/main/.venv/bin/python scripts/bench_scale.py                   # 1x5, 5x5, 20x5: ~40 min
    /work/main/.venv/bin/python scripts/bench_scale.py --sizes 1x2,2x2   # a smoke run, ~3 min

It prints one Markdown report (also written to --output, default docs/benchmarks-scale.md), draws
every figure against the number of VMs (--plot, default docs/benchmarks-scale.png) and keeps the
raw figures as JSON (--json, default docs/benchmarks-scale.json). `--before FILE` adds a earlier
run's JSON (say, from the commit before a design change) to the plot and the tables.

The DMZs grow in one run (the sizes are cumulative). At each size it measures:

1. `dmzctl up` of the DMZ that brought it to that size (a cold process, 5 VMs started together);
2. `dmzctl status` and `dmzctl check` of all DMZs (cold processes, median of 3);
3. `dmzctl guard` of all DMZs: CPU while idle, and during churn (a DMZ's table deleted, an address
   added and removed on a bridge of this run's, a VM paused and resumed, every 5 s), with how long
   each deleted table stayed missing;
4. the size of dmzctl's nftables tables (rules, sets, set elements) and of the rules libvirt's
   nwfilter keeps for the VMs (iptables-nft and ebtables-nft chains);
5. a libvirtd restart (SIGTERM, then `libvirtd -d` as it was started): until it exited, until it
   answered, and until every VM's domain could be queried again (libvirt re-instantiates each
   running VM's filters while it reconnects to it).

Then, with dmzctl's VMs shut off and their networks and tables kept, the same restart is measured
with no VM, and with the same number of domains, copies of dmzctl's but with libvirt's plain
`clean-traffic` filter only (plain libvirt, no dmzctl filters).

The VMs: the tiny test guest (scripts/build-test-guest.sh) with --memory (64 MiB by default). The
first VM boots to the guest's READY line, proving the memory is enough; every VM is paused
(virsh suspend) once `up` returned. A paused domain keeps its QEMU process, tap device and filters
exactly as a running one, but uses no CPU: 100 guests under TCG would otherwise saturate the two
cores and every figure would measure guest load, not dmzctl. No timing is asserted anywhere.

Safety: DMZs sc00..sc19 (bridges dmzsc00.., 10.211.N.0/24 and fdd0:211:N::/64, protected
10.212.N.0/24 and fdd0:212:N::/64), plain domains scp-N-M, churn bridge scchurn0
(10.210.255.1/24). Objects of those names already present make the script stop before it changes
anything; what it created is removed at the end, also on failure, Ctrl-C or SIGTERM. The guests
are paused seconds after they start and are never asked to send anything; nothing leaves the
DMZ bridges. libvirtd is restarted by its PID only: the one `scripts/setup.sh` started.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from benchlib import (REPO, Interrupted, Report, cpu_model, hardware_virtualization, interrupt_on_signals,
                      kernel, log, median, memory, publish, revision, tool_version)

URI = "qemu:///system"
DMZCTL = [str(REPO / ".venv" / "bin" / "dmzctl")]
BENCH_LOCK = Path("/run/dmzctl-bench-scale.lock")
CHURN_BRIDGE = "scchurn0"
CHURN_ADDRESS = "10.210.255.1/24"
VMS_PER_DMZ_MAX = 5
DEFAULT_SIZES = "1x5,5x5,20x5"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


# --- pure parts: names, configs, sizes, the report (tests/test_bench_scale.py) ---------------

def dmz_name(index: int) -> str:
    return f"sc{index:02d}"


def vm_name(index: int, slot: int) -> str:
    return f"{dmz_name(index)}-v{slot}"


def plain_name(index: int, slot: int) -> str:
    return f"scp-{index}-{slot}"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1x5,5x5,20x5' → [(1, 5), (5, 5), (20, 5)]: DMZs × VMs per DMZ, growing."""
    sizes = []
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not found:
            raise ValueError(f"size {part!r}: expected DMZSxVMS, e.g. 5x5")
        dmzs, vms = int(found.group(1)), int(found.group(2))
        if not 1 <= dmzs <= 20 or not 1 <= vms <= VMS_PER_DMZ_MAX:
            raise ValueError(f"size {part!r}: 1-20 DMZs of 1-{VMS_PER_DMZ_MAX} VMs")
        sizes.append((dmzs, vms))
    if any(b[0] <= a[0] or b[1] != a[1] for a, b in zip(sizes, sizes[1:])):
        raise ValueError("sizes must grow in DMZs and keep the VMs per DMZ")
    return sizes


def dmz_toml(index: int, vms: int, guest: Path, memory_mib: int) -> str:
    name = dmz_name(index)
    lines = [
        "[dmz]", f'name = "{name}"', f'bridge = "dmz{name}"', 'mode = "route"',
        f'gateway = "10.211.{index}.1/24"', f'gateway6 = "fdd0:211:{index}::1/64"',
        f'protected = ["10.212.{index}.0/24", "fdd0:212:{index}::/64"]',
        f'dns = "10.212.{index}.53"', "dhcp = true", 'egress = "any"', "",
    ]
    for slot in range(vms):
        ip, ip6 = f"10.211.{index}.{10 + slot}", f"fdd0:211:{index}::{10 + slot:x}"
        cmdline = (f"console=ttyS0 quiet cryptomgr.notests dmz.name={vm_name(index, slot)} dmz.ip={ip}/24 "
                   f"dmz.gw=10.211.{index}.1 dmz.ip6={ip6}/64 dmz.gw6=fdd0:211:{index}::1")
        lines += ["[[vm]]", f'name = "{vm_name(index, slot)}"', f'memory = "{memory_mib}MiB"', "vcpus = 1",
                  f'kernel = "{guest / "kernel"}"', f'initrd = "{guest / "initrd.img"}"', f'cmdline = "{cmdline}"',
                  f'ip = "{ip}"', f'ip6 = "{ip6}"', 'graphics = "none"', "shutdown_timeout = 5",
                  "autostart = false", ""]
    return "\n".join(lines)


@dataclass
class Restart:
    stopped: float = 0.0      # SIGTERM → the old daemon exited
    answered: float = 0.0     # `libvirtd -d` → a connection answers
    reconnected: float = 0.0  # `libvirtd -d` → every VM's domain answers a job-taking query
    domains: int = 0

    @property
    def total(self) -> float:
        return self.stopped + self.reconnected


@dataclass
class Size:
    dmzs: int
    vms: int
    up: Optional[float] = None                 # cold `dmzctl up` of the last DMZ
    status: Optional[float] = None
    check: Optional[float] = None
    guard_idle_cpu: Optional[float] = None     # CPU % of one core
    guard_churn_cpu: Optional[float] = None
    guard_restore: list[float] = field(default_factory=list)  # seconds a deleted table stayed missing
    guard_rss_mib: Optional[float] = None
    nft_rules: Optional[int] = None
    nft_sets: Optional[int] = None
    nft_elements: Optional[int] = None
    nwfilter_rules: Optional[int] = None
    libvirt_filters: Optional[int] = None      # nwfilter definitions
    restart_dmzctl: list[Restart] = field(default_factory=list)
    restart_plain: list[Restart] = field(default_factory=list)
    plain_rules: Optional[int] = None
    qemu_rss_mib: Optional[float] = None       # per paused VM


def restart_median(restarts: list[Restart], attr: str = "total") -> Optional[float]:
    return median([getattr(r, attr) for r in restarts]) if restarts else None


def fmt_s(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def fmt_n(value) -> str:
    return "n/a" if value is None else f"{value:,}"


def fmt_ratio(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}×"


def slope(sizes: list[Size], attr: str) -> Optional[float]:
    """Seconds per VM of a restart (least squares over the sizes, through the medians)."""
    points = [(s.dmzs * s.vms, restart_median(getattr(s, attr))) for s in sizes if getattr(s, attr)]
    if len(points) < 2:
        return points[0][1] / points[0][0] if points else None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread_x = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread_x if spread_x else None


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f} %"


def _run_tables(report: Report, sizes: list[Size], baseline: list[Restart]) -> None:
    rows = []
    for size in sizes:
        rows.append([f"{size.dmzs} × {size.vms}", size.dmzs * size.vms, fmt_s(size.up), fmt_s(size.status),
                     fmt_s(size.check), _pct(size.guard_idle_cpu), _pct(size.guard_churn_cpu),
                     fmt_s(median(size.guard_restore)) if size.guard_restore else "n/a"])
    report.table(["DMZs × VMs", "VMs", "`up` (+1 DMZ)", "`status` all", "`check` all", "guard CPU idle",
                  "guard CPU churn", "deleted table back in"], rows, "lrrrrrrr")
    report.table(["VMs", "dmzctl tables: rules", "sets", "set elements", "nwfilter definitions",
                  "nwfilter rules (iptables/ebtables-nft)", "same VMs, plain clean-traffic", "QEMU PSS per VM"],
                 [[s.dmzs * s.vms, fmt_n(s.nft_rules), fmt_n(s.nft_sets), fmt_n(s.nft_elements),
                   fmt_n(s.libvirt_filters), fmt_n(s.nwfilter_rules), fmt_n(s.plain_rules),
                   "n/a" if s.qemu_rss_mib is None else f"{s.qemu_rss_mib:.0f} MiB"] for s in sizes],
                 "rrrrrrrr")
    rows = []
    for size in sizes:
        ours, plain = restart_median(size.restart_dmzctl), restart_median(size.restart_plain)
        rows.append([size.dmzs * size.vms, fmt_s(ours), fmt_s(restart_median(size.restart_dmzctl, "answered")),
                     fmt_s(plain), fmt_ratio(ours, plain),
                     ", ".join(fmt_s(r.total) for r in size.restart_dmzctl)])
    report.table(["VMs", "libvirtd restart, dmzctl's VMs", "of which until it answered",
                  "same VMs, plain clean-traffic", "dmzctl / plain", "each run"], rows, "rrrrrl")
    report.add(f"No VM at all: {fmt_s(restart_median(baseline))}. Per VM (least squares over the sizes): "
               f"dmzctl {fmt_s(slope(sizes, 'restart_dmzctl'))}, plain clean-traffic "
               f"{fmt_s(slope(sizes, 'restart_plain'))}.")


def render_report(sizes: list[Size], baseline: list[Restart], machine: dict, label: str,
                  before: Optional[dict] = None) -> str:
    report = Report()
    report.add("# Scale: 1 to 20 DMZs, up to 100 VMs on one host",
               f"Generated by `scripts/bench_scale.py` on {machine.get('date', '?')} ({label}; revision "
               f"{machine.get('revision', '?')}). Plot: `docs/benchmarks-scale.png`; raw figures: "
               "`docs/benchmarks-scale.json`" + (" and `docs/benchmarks-scale-before.json`" if before else "")
               + ". Nothing here is asserted by a test.")
    if before:
        old_sizes, old_baseline = sizes_from_json(before)
        rows = []
        for name, run_sizes in ((before.get("label", "before"), old_sizes), (label, sizes)):
            ours, plain = slope(run_sizes, "restart_dmzctl"), slope(run_sizes, "restart_plain")
            largest = run_sizes[-1]
            rows.append([name, fmt_s(ours), fmt_s(plain), fmt_ratio(ours, plain),
                         f"{fmt_s(largest.up)} ({largest.dmzs} DMZs)",
                         fmt_n(largest.nwfilter_rules // max(1, largest.dmzs * largest.vms)
                               if largest.nwfilter_rules is not None else None)])
        report.add("## Before and after, in short")
        report.table(["design", "libvirtd restart per VM", "plain clean-traffic per VM", "ratio",
                      "`up` of the last DMZ", "nwfilter rules per VM"], rows, "lrrrrr")
    report.add("## Machine",
               "\n".join(f"- {key}: {value}" for key, value in machine.items() if key not in ("date",)))
    report.add("## How",
               "- Each DMZ has the tiny test guest (a Debian kernel and a busybox initramfs) as its VMs, with "
               f"{machine.get('vm memory', '?')}, the smallest that boots it (64 MiB panics: out of memory while "
               "unpacking the initramfs); the first VM boots to its READY line. Every VM is started by "
               "`dmzctl up`, then **paused** (`virsh suspend`): QEMU, the tap device and every filter stay as "
               "for a running guest, but 100 guests under TCG would otherwise fill both cores and every "
               "figure would measure guest load. The restart figures are therefore for running (paused) "
               "domains, not defined-only ones.\n"
               "- `up`, `status` and `check` are cold `dmzctl` processes; `up` is of the DMZ that brought "
               "the host to that size, with the others already up.\n"
               "- guard: `dmzctl guard` over all configs; CPU from /proc over a window idle, then over a "
               "window of churn (every 5 s one DMZ's table deleted, an address added and removed on a "
               "bridge of the benchmark's, one VM resumed and paused again); \"deleted table back in\" is "
               "how long the deleted table stayed missing.\n"
               "- libvirtd restart: SIGTERM by PID, wait for it to exit, `libvirtd -d` as it was started; "
               "\"answered\" is the first connection, the total runs until every domain answered a query "
               "that waits for libvirt's reconnect to it (`virDomainMemoryStats`). libvirt re-creates the "
               "filters of every running VM before it answers anyone. Plain = the same number of domains, "
               "copies of dmzctl's with libvirt's own `clean-traffic` filter only, started paused.")
    report.add(f"## {label}")
    _run_tables(report, sizes, baseline)
    if before:
        report.add(f"## {before.get('label', 'before')} (revision {before.get('revision', '?')})")
        _run_tables(report, old_sizes, old_baseline)
    return report.text()


def draw_plot(sizes: list[Size], baseline: list[Restart], output: Path, before: Optional[dict] = None,
              label: str = "after") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old_sizes, _old_baseline = sizes_from_json(before) if before else ([], [])
    old_label = before.get("label", "before") if before else ""

    def vms(run_sizes):
        return [s.dmzs * s.vms for s in run_sizes]

    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    ax.plot(vms(sizes), [restart_median(s.restart_dmzctl) for s in sizes], "o-", label=f"dmzctl: {label}")
    ax.plot(vms(sizes), [restart_median(s.restart_plain) for s in sizes], "s--", label="plain clean-traffic")
    if old_sizes:
        ax.plot(vms(old_sizes), [restart_median(s.restart_dmzctl) for s in old_sizes], "^:", color="tab:red",
                label=f"dmzctl: {old_label}")
    if baseline:
        ax.axhline(restart_median(baseline), color="grey", linewidth=0.8, label="no VM")
    ax.set_title("libvirtd restart, until every VM answers")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.plot(vms(sizes), [s.up for s in sizes], "o-", label=f"up of one more DMZ: {label}")
    if old_sizes:
        ax.plot(vms(old_sizes), [s.up for s in old_sizes], "^:", color="tab:red", label=f"up: {old_label}")
    ax.plot(vms(sizes), [s.status for s in sizes], "s-", label="status of all")
    ax.plot(vms(sizes), [s.check for s in sizes], "d-", label="check of all")
    ax.set_title("commands (cold processes)")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    ax.plot(vms(sizes), [s.guard_idle_cpu for s in sizes], "o-", label="idle")
    ax.plot(vms(sizes), [s.guard_churn_cpu for s in sizes], "s-", label="churn (an event every 5 s)")
    ax.set_title("dmzctl guard CPU")
    ax.set_ylabel("% of one core")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot(vms(sizes), [s.nft_rules for s in sizes], "o-", label="dmzctl nft rules")
    ax.plot(vms(sizes), [s.nft_elements for s in sizes], "s-", label="dmzctl set elements")
    ax.plot(vms(sizes), [s.nwfilter_rules for s in sizes], "^-", label=f"nwfilter rules: {label}")
    ax.plot(vms(sizes), [s.plain_rules for s in sizes], "v--", label="nwfilter rules: plain clean-traffic")
    if old_sizes:
        ax.plot(vms(old_sizes), [s.nwfilter_rules for s in old_sizes], "^:", color="tab:red",
                label=f"nwfilter rules: {old_label}")
    ax.set_title("firewall sizes")
    ax.legend(fontsize=7)
    for ax in (a for row in axes for a in row):
        ax.set_xlabel("VMs on the host")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=80)
    plt.close(figure)


def sizes_from_json(data: dict) -> tuple[list[Size], list[Restart]]:
    sizes = []
    for item in data["sizes"]:
        item = dict(item)
        item["restart_dmzctl"] = [Restart(**r) for r in item["restart_dmzctl"]]
        item["restart_plain"] = [Restart(**r) for r in item["restart_plain"]]
        sizes.append(Size(**item))
    return sizes, [Restart(**r) for r in data.get("baseline", [])]


# --- the host ------------------------------------------------------------------------------------

def run(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout)


def timed(*argv: str) -> float:
    began = time.perf_counter()
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - began
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(argv[:3])}… exited {result.returncode}: {result.stderr.strip()[-400:]}")
    return seconds


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    found = re.search(r"^VmRSS:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) / 1024 if found else 0.0


class Bench:
    def __init__(self, args):
        import libvirt  # Debian's python3-libvirt, seen through the venv

        self.libvirt = libvirt
        self.args = args
        self.sizes_wanted = parse_sizes(args.sizes)
        self.vms_per_dmz = self.sizes_wanted[0][1]
        self.workdir = Path(tempfile.mkdtemp(prefix="dmzctl-bench-scale-"))
        self.configs: list[Path] = []
        self.plain_domains: list[str] = []
        self.sizes: list[Size] = []
        self.baseline: list[Restart] = []
        self.guest: Optional[Path] = None
        self.churn_bridge = False
        self.loads: list[tuple[float, float, float]] = []
        self.memory_in_use = "n/a"

    # -- safety --
    def refuse_foreign(self) -> None:
        conn = self.connect()
        try:
            names = [d.name() for d in conn.listAllDomains()] + [n.name() for n in conn.listAllNetworks()]
        finally:
            conn.close()
        clash = [n for n in names if re.match(r"(dmzctl-)?sc\d\d|scp-", n)]
        tables = run("nft", "list", "tables").stdout
        clash += re.findall(r"table inet (dmzctl-sc\d\d)\b", tables)
        if Path(f"/sys/class/net/{CHURN_BRIDGE}").exists():
            clash.append(CHURN_BRIDGE)
        if clash:
            raise SystemExit(f"bench_scale: already present, not this run's: {', '.join(sorted(set(clash)))} "
                             "(remove them, e.g. with `dmzctl destroy`, first)")
        if len(run("pgrep", "-x", "libvirtd", check=False).stdout.split()) != 1:
            raise SystemExit("bench_scale: expected exactly one libvirtd (scripts/setup.sh starts it)")

    def connect(self, timeout: float = 60):
        began = time.monotonic()
        while True:
            try:
                return self.libvirt.open(URI)
            except self.libvirt.libvirtError:
                if time.monotonic() - began > timeout:
                    raise
                time.sleep(0.05)

    # -- set-up --
    def prepare(self) -> None:
        self.refuse_foreign()
        self.guest = Path(run(str(REPO / "scripts" / "build-test-guest.sh"), timeout=1800).stdout.strip())
        for index in range(self.sizes_wanted[-1][0]):
            path = self.workdir / f"{dmz_name(index)}.toml"
            path.write_text(dmz_toml(index, self.vms_per_dmz, self.guest, self.args.memory))
            self.configs.append(path)
        run("ip", "link", "add", CHURN_BRIDGE, "type", "bridge")
        self.churn_bridge = True
        run("ip", "link", "set", CHURN_BRIDGE, "up")

    def up(self, index: int) -> float:
        first = vm_name(0, 0)
        if index == 0:  # an earlier run's log of this VM (ours): READY must come from this boot
            (QEMU_LOG_DIR / f"{first}-serial.log").unlink(missing_ok=True)
        seconds = timed(*DMZCTL, "up", str(self.configs[index]))
        conn = self.connect()
        try:
            names = [vm_name(index, slot) for slot in range(self.vms_per_dmz)]
            for name in sorted(names, key=lambda n: n == first):  # the first VM last: it boots fully
                if name == first:
                    self.wait_ready(name)
                dom = conn.lookupByName(name)
                if dom.state()[0] == self.libvirt.VIR_DOMAIN_RUNNING:
                    dom.suspend()
        finally:
            conn.close()
        return seconds

    def wait_ready(self, name: str) -> None:
        """The guest's READY line in its serial log (removed before its `up`)."""
        log_file = QEMU_LOG_DIR / f"{name}-serial.log"
        began = time.monotonic()

        def since_start() -> str:
            return log_file.read_text(errors="replace") if log_file.exists() else ""

        while "DMZGUEST READY" not in since_start():
            if time.monotonic() - began > 300:
                raise RuntimeError(f"{name} did not boot to READY with {self.args.memory} MiB in 300 s")
            time.sleep(0.5)
        log(f"{name} booted to READY with {self.args.memory} MiB in {time.monotonic() - began:.0f} s")

    # -- measurements --
    def measure_all(self) -> None:
        built = 0
        for dmzs, vms in self.sizes_wanted:
            size = Size(dmzs=dmzs, vms=vms)
            while built < dmzs:
                log(f"up {dmz_name(built)} ({built + 1}/{dmzs})")
                size.up = self.up(built)
                built += 1
            configs = [str(p) for p in self.configs[:dmzs]]
            log(f"{dmzs * vms} VMs: status, check")
            size.status = median([timed(*DMZCTL, "status", *configs) for _ in range(3)])
            size.check = median([timed(*DMZCTL, "check", *configs) for _ in range(3)])
            self.firewall_sizes(size, dmzs)
            size.qemu_rss_mib = self.qemu_pss([vm_name(i, s) for i in range(dmzs) for s in range(vms)])
            log(f"{dmzs * vms} VMs: guard")
            self.measure_guard(size, configs)
            for run_index in range(self.args.restarts):
                log(f"{dmzs * vms} VMs: libvirtd restart {run_index + 1}/{self.args.restarts} (dmzctl filters)")
                size.restart_dmzctl.append(self.restart_libvirtd([vm_name(i, s) for i in range(dmzs)
                                                                  for s in range(vms)]))
            self.loads.append(os.getloadavg())
            self.sizes.append(size)
            self.save_json()
        self.measure_plain()

    def firewall_sizes(self, size: Size, dmzs: int) -> None:
        ruleset = json.loads(run("nft", "-j", "list", "ruleset", timeout=300).stdout)["nftables"]
        # The main tables and their backstops (the backstop exists only in the later design).
        ours = {f"dmzctl-{dmz_name(i)}{suffix}" for i in range(dmzs) for suffix in ("", ".backstop")}
        size.nft_rules = sum(1 for item in ruleset if "rule" in item and item["rule"]["table"] in ours)
        sets = [item["set"] for item in ruleset if "set" in item and item["set"]["table"] in ours]
        size.nft_sets = len(sets)
        size.nft_elements = sum(len(s.get("elem", [])) for s in sets)
        size.nwfilter_rules = nwfilter_rule_count(ruleset)
        conn = self.connect()
        try:
            size.libvirt_filters = sum(1 for name in conn.listNWFilters() if name.startswith("dmzctl-"))
        finally:
            conn.close()
        meminfo = Path("/proc/meminfo").read_text()
        total, available = (int(re.search(rf"^{key}:\s*(\d+) kB", meminfo, re.M).group(1))
                            for key in ("MemTotal", "MemAvailable"))
        self.memory_in_use = f"{(total - available) / 1048576:.1f} GiB with {dmzs * self.vms_per_dmz} VMs"

    def qemu_pss(self, names: list[str]) -> Optional[float]:
        """The mean proportional set size of the VMs' QEMU processes (shared pages split among them)."""
        sizes = []
        for name in names:
            try:
                pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
                found = re.search(r"^Pss:\s*(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
            except (OSError, ValueError):
                continue
            if found:
                sizes.append(int(found.group(1)) / 1024)
        return round(sum(sizes) / len(sizes), 1) if sizes else None

    def measure_guard(self, size: Size, configs: list[str]) -> None:
        guard = subprocess.Popen([*DMZCTL, "guard", "--interval", "3600", *configs], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            time.sleep(self.args.guard_settle)  # its first check of every DMZ
            before = cpu_seconds(guard.pid)
            time.sleep(self.args.guard_window)
            size.guard_idle_cpu = round(100 * (cpu_seconds(guard.pid) - before) / self.args.guard_window, 2)
            conn = self.connect()
            try:
                before, began = cpu_seconds(guard.pid), time.monotonic()
                turn = 0
                while time.monotonic() - began < self.args.guard_window:
                    index = turn % len(configs)
                    table = f"dmzctl-{dmz_name(index)}"
                    run("nft", "delete", "table", "inet", table)
                    deleted = time.monotonic()
                    run("ip", "addr", "add", CHURN_ADDRESS, "dev", CHURN_BRIDGE)
                    dom = conn.lookupByName(vm_name(index, 0))
                    dom.resume()
                    time.sleep(0.2)
                    dom.suspend()
                    run("ip", "addr", "del", CHURN_ADDRESS, "dev", CHURN_BRIDGE)
                    while run("nft", "list", "table", "inet", table, check=False).returncode != 0:
                        if time.monotonic() - deleted > 120:  # a figure too: recorded, not fatal
                            log(f"guard did not restore {table} within 120 s")
                            break
                        time.sleep(0.02)
                    size.guard_restore.append(round(time.monotonic() - deleted, 3))
                    turn += 1
                    time.sleep(max(0.0, began + 5 * turn - time.monotonic()))
                size.guard_churn_cpu = round(100 * (cpu_seconds(guard.pid) - before) / (time.monotonic() - began), 2)
            finally:
                conn.close()
            size.guard_rss_mib = round(rss_mib(guard.pid), 1)
            # The churn leaves the views the checks read stale for a moment: let guard settle.
            time.sleep(2)
        finally:
            guard.terminate()
            try:
                guard.wait(30)
            except subprocess.TimeoutExpired:
                guard.kill()
                guard.wait()

    def restart_libvirtd(self, domains: list[str]) -> Restart:
        pid = int(run("pgrep", "-x", "libvirtd").stdout.split()[0])
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                   if "=" in item)
        cwd = os.readlink(f"/proc/{pid}/cwd")
        result = Restart(domains=len(domains))
        began = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while Path(f"/proc/{pid}").exists():
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            if time.monotonic() - began > 300:
                raise RuntimeError("libvirtd did not exit within 300 s of SIGTERM")
            time.sleep(0.02)
        result.stopped = time.monotonic() - began
        started = time.monotonic()
        subprocess.run(["libvirtd", "-d"], env=env, cwd=cwd, check=True)
        conn = self.connect(timeout=600)
        try:
            conn.getLibVersion()
            result.answered = time.monotonic() - started
            for name in domains:
                self.wait_domain(conn, name, started)
            result.reconnected = time.monotonic() - started
        finally:
            conn.close()
        log(f"restart with {len(domains)} VMs: stopped {result.stopped:.1f} s, answered {result.answered:.1f} s, "
            f"all VMs {result.reconnected:.1f} s")
        return result

    def wait_domain(self, conn, name: str, started: float) -> None:
        libvirt = self.libvirt
        while True:
            try:
                conn.lookupByName(name).memoryStats()
                return
            except libvirt.libvirtError as error:
                if error.get_error_code() in (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_NO_DOMAIN,
                                              libvirt.VIR_ERR_OPERATION_INVALID):
                    if time.monotonic() - started > 900:
                        raise
                    time.sleep(0.05)
                    continue
                return  # answered, with something this query cannot report: reconnected

    def measure_plain(self) -> None:
        """The same restarts with dmzctl's VMs shut off: none, then plain clean-traffic copies."""
        conn = self.connect()
        try:
            templates = {}
            for index in range(self.sizes_wanted[-1][0]):
                for slot in range(self.vms_per_dmz):
                    dom = conn.lookupByName(vm_name(index, slot))
                    templates[(index, slot)] = dom.XMLDesc(self.libvirt.VIR_DOMAIN_XML_INACTIVE)
                    if dom.isActive():
                        dom.destroy()
        finally:
            conn.close()
        for run_index in range(self.args.restarts):
            log(f"no VM: libvirtd restart {run_index + 1}/{self.args.restarts}")
            self.baseline.append(self.restart_libvirtd([]))
        started = 0
        for size in self.sizes:
            conn = self.connect()
            try:
                while started < size.dmzs:
                    for slot in range(size.vms):
                        xml = plain_domain_xml(templates[(started, slot)], plain_name(started, slot))
                        dom = conn.defineXML(xml)
                        self.plain_domains.append(dom.name())
                        dom.createWithFlags(self.libvirt.VIR_DOMAIN_START_PAUSED)
                    started += 1
            finally:
                conn.close()
            ruleset = json.loads(run("nft", "-j", "list", "ruleset", timeout=300).stdout)["nftables"]
            size.plain_rules = nwfilter_rule_count(ruleset)
            for run_index in range(self.args.restarts):
                log(f"{size.dmzs * size.vms} plain VMs: libvirtd restart {run_index + 1}/{self.args.restarts}")
                size.restart_plain.append(self.restart_libvirtd(list(self.plain_domains)))
            self.save_json()

    def save_json(self) -> None:
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.data(), indent=1) + "\n")

    def data(self) -> dict:
        return {"label": self.args.label, "revision": revision(), "memory_mib": self.args.memory,
                "sizes": [asdict(s) for s in self.sizes], "baseline": [asdict(r) for r in self.baseline]}

    def machine(self) -> dict:
        return {"date": dt.date.today().isoformat(), "revision": revision(), "CPU": f"{cpu_model()}, "
                f"{os.cpu_count()} cores, hardware virtualization: {'yes' if hardware_virtualization() else 'no'}",
                "memory": memory(), "kernel": kernel(), "libvirt": tool_version(["libvirtd", "--version"]),
                "nft": tool_version(["nft", "--version"]),
                "libvirt hooks": "dmzctl's installed" if Path("/etc/libvirt/hooks/qemu.d/dmzctl").exists()
                else "none",
                "vm memory": f"{self.args.memory} MiB",
                "memory in use at the largest size (MemTotal - MemAvailable)": self.memory_in_use,
                "load average during the run (1 min, at each size)": ", ".join(f"{l[0]:.1f}" for l in self.loads)}

    # -- clean-up --
    def teardown(self) -> None:
        try:
            conn = self.connect()
        except self.libvirt.libvirtError:
            conn = None
        if conn is not None:
            for name in list(self.plain_domains):
                try:
                    dom = conn.lookupByName(name)
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
                except self.libvirt.libvirtError as error:
                    log(f"clean-up: {name}: {error}")
            conn.close()
        for path in reversed(self.configs):
            result = subprocess.run([*DMZCTL, "destroy", str(path)], capture_output=True, text=True)
            if result.returncode not in (0,) and "not defined" not in result.stdout + result.stderr:
                log(f"clean-up: dmzctl destroy {path.name}: {(result.stderr or result.stdout).strip()[-300:]}")
        if self.churn_bridge:
            run("ip", "link", "del", CHURN_BRIDGE, check=False)
        for path in self.configs:
            path.unlink(missing_ok=True)
        try:
            self.workdir.rmdir()
        except OSError:
            pass


def plain_domain_xml(dmzctl_xml: str, name: str) -> str:
    """dmzctl's domain, renamed, without its uuid, metadata or serial log, filtered by clean-traffic only."""
    from lxml import etree

    root = etree.fromstring(dmzctl_xml.encode())
    root.find("name").text = name
    for tag in ("uuid", "metadata"):
        for element in root.findall(tag):
            root.remove(element)
    for serial in root.iter("serial", "console"):
        for log_element in serial.findall("log"):
            serial.remove(log_element)
    for interface in root.iter("interface"):
        for old in interface.findall("filterref"):
            ip = next((p.get("value") for p in old.findall("parameter") if p.get("name") == "IP"), None)
            interface.remove(old)
            ref = etree.SubElement(interface, "filterref", filter="clean-traffic")
            if ip:
                etree.SubElement(ref, "parameter", name="IP", value=ip)
        for target in interface.findall("target"):
            interface.remove(target)
    return etree.tostring(root, encoding="unicode")


# nwfilter's chains: iptables-nft (FI-/FO-/HI-/libvirt-…) and ebtables-nft (libvirt-I-…, I-…-ipv4, …).
NWFILTER_CHAIN = re.compile(r"^(F[IO]-|HI-|libvirt-|[IO]-vnet|[IO]-tap|[IO]-)")


def nwfilter_rule_count(ruleset: list[dict]) -> int:
    count = 0
    for item in ruleset:
        rule = item.get("rule")
        if rule and rule["family"] in ("ip", "ip6", "bridge") and NWFILTER_CHAIN.match(rule["chain"]):
            count += 1
    return count


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="DMZSxVMS,… growing (default %(default)s)")
    parser.add_argument("--memory", type=int, default=64, help="MiB per VM (default %(default)s)")
    parser.add_argument("--restarts", type=int, default=2, help="libvirtd restarts per size (default %(default)s)")
    parser.add_argument("--guard-window", type=float, default=30.0, help="seconds idle, and of churn")
    parser.add_argument("--guard-settle", type=float, default=10.0, help="seconds before guard's idle window")
    parser.add_argument("--dmzctl", help="the dmzctl command to measure (default: this checkout's .venv/bin/dmzctl)")
    parser.add_argument("--label", default="current design", help="this run's name in tables and plots")
    parser.add_argument("--before", help="JSON of an earlier run to compare with")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks-scale.md"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "benchmarks-scale.png"))
    parser.add_argument("--json", default=str(REPO / "docs" / "benchmarks-scale.json"))
    parser.add_argument("--report-only", action="store_true", help="redraw the report and plot from --json")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.dmzctl:
        DMZCTL[:] = args.dmzctl.split()
    try:
        parse_sizes(args.sizes)
    except ValueError as error:
        print(f"bench_scale: {error}", file=sys.stderr)
        return 2
    before = json.loads(Path(args.before).read_text()) if args.before else None
    if args.report_only:
        data = json.loads(Path(args.json).read_text())
        sizes, baseline = sizes_from_json(data)
        machine = data.get("machine", {})
        publish(render_report(sizes, baseline, machine, data.get("label", ""), before), Path(args.output))
        draw_plot(sizes, baseline, Path(args.plot), before, data.get("label", "after"))
        return 0
    if os.geteuid() != 0:
        print("bench_scale: run as root (libvirt's system instance and nftables need it)", file=sys.stderr)
        return 2
    BENCH_LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = open(BENCH_LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench_scale: another run holds {BENCH_LOCK}", file=sys.stderr)
        return 3
    interrupt_on_signals()
    bench = Bench(args)
    try:
        bench.prepare()
        bench.measure_all()
        machine = bench.machine()
    except (KeyboardInterrupt, Interrupted) as stop:
        log(f"interrupted ({stop or 'Ctrl-C'}); cleaning up")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # clean-up must not be cut short
            signal.signal(sig, signal.SIG_IGN)
        try:
            bench.teardown()
        finally:
            BENCH_LOCK.unlink(missing_ok=True)
            lock.close()
    data = bench.data()
    data["machine"] = machine
    Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    publish(render_report(bench.sizes, bench.baseline, machine, args.label, before), Path(args.output))
    draw_plot(bench.sizes, bench.baseline, Path(args.plot), before, args.label)
    log(f"wrote {args.plot} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
