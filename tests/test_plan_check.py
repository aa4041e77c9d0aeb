"""`dmzctl plan` and `dmzctl check` against the real libvirtd and nftables (issue 5).

DMZs here start with `pc` (10.251.0.0/24 cut into /26s, fdd0:251::/64); each test removes what
it created, also when it fails.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from guest import dmzctl, guest_dir, kernel_vm_toml, wipe

pytestmark = [pytest.mark.host]


@pytest.fixture
def make_dmz(tmp_path, monkeypatch):
    created = []
    monkeypatch.setenv("DMZCTL_EVENT_LOG", str(tmp_path / "events.log"))

    def make(name: str, gateway: str, vms: str = "", gateway6: str | None = None) -> Path:
        path = tmp_path / f"{name}.toml"
        six = f'gateway6 = "{gateway6}"\n' if gateway6 else ""
        protected = '"10.252.0.0/25", "fdd0:252::/64"' if gateway6 else '"10.252.0.0/25"'
        path.write_text(f'[dmz]\nname = "{name}"\nbridge = "{name}br0"\ngateway = "{gateway}"\n{six}'
                        f'protected = [{protected}]\n\n{vms}')
        created.append((name, path, re.findall(r'^name = "([^"]+)"', vms, re.M)))
        wipe(name, created[-1][2])
        return path

    yield make
    for name, path, vms in created:
        dmzctl("destroy", str(path), "--timeout", "0")
        wipe(name, vms)


def steps(plan_json: str) -> list[tuple[str, str, str]]:
    return [(c["kind"], c["name"], c["action"]) for c in json.loads(plan_json)[0]["changes"]]


def up_changes(stdout: str, dmz: str) -> list[tuple[str, str, str]]:
    """`up`'s report in plan's terms: the two must list the same changes in the same order."""
    found = []
    for line in stdout.splitlines():
        what = line.removeprefix(f"{dmz}: ")
        for pattern, kind, action in ((r"network (\S+) defined", "network", "define"),
                                      (r"network (\S+) started", "network", "start"),
                                      (r"network (\S+) definition updated", "network", "update"),
                                      (r"nwfilter (\S+) defined", "nwfilter", "define"),
                                      (r"nwfilter (\S+) updated", "nwfilter", "update"),
                                      (r"firewall table (inet \S+) applied", "firewall", "apply"),
                                      (r"firewall table (inet \S+) updated", "firewall", "update"),
                                      (r"VM (\S+) defined", "vm", "define"),
                                      (r"VM (\S+) definition updated", "vm", "update"),
                                      (r"VM (\S+) started", "vm", "start")):
            match = re.match(pattern, what)
            if match:
                found.append((kind, match.group(1), action))
                break
    return found


def normalised(plan_steps):
    # plan names the network with its bridge: "pcpl (bridge pcplbr0)"
    return [(kind, name.split(" (")[0], action) for kind, name, action in plan_steps]


def changed_lines(diff: list[str]) -> list[str]:
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


@pytest.mark.guest
def test_plan_is_what_up_does_nothing_when_unchanged_and_exactly_an_edit(make_dmz):
    vm = kernel_vm_toml("pc-web", "10.251.0.10", "10.251.0.1/26", guest_dir())
    config = make_dmz("pcpl", "10.251.0.1/26", vm, gateway6="fdd0:251::1/64")

    first = dmzctl("plan", str(config), "--json", check=True)
    planned = normalised(steps(first.stdout))
    assert planned[0] == ("network", "pcpl", "define") and planned[-1] == ("vm", "pc-web", "start"), planned
    up = dmzctl("up", str(config), check=True)
    assert up_changes(up.stdout, "pcpl") == planned, (up.stdout, planned)

    unchanged = dmzctl("plan", str(config), check=True)
    assert unchanged.stdout == f"pcpl: nothing to do ({config})\n"
    assert steps(dmzctl("plan", str(config), "--json", check=True).stdout) == []

    # One edit, two effects: a VM's memory and one more protected subnet.
    config.write_text(config.read_text().replace('memory = "128MiB"', 'memory = "144MiB"')
                      .replace('protected = ["10.252.0.0/25"', 'protected = ["10.252.0.0/25", "10.252.0.192/26"'))
    plan = json.loads(dmzctl("plan", str(config), "--json", check=True).stdout)[0]["changes"]
    assert [(c["kind"], c["name"], c["action"]) for c in plan] == [
        ("firewall", "inet dmzctl-pcpl", "update"),
        ("vm", "pc-web", "update"),
    ]
    firewall, domain = (c["diff"] for c in plan)
    # The table's set and the backstop's rule: one more protected subnet in each.
    lines = changed_lines(firewall)
    assert lines[:2] == ["-\t\telements = { 10.252.0.0/25 }",
                         "+\t\telements = { 10.252.0.0/25, 10.252.0.192/26 }"], firewall
    old, new = lines[2:]
    assert old.startswith("-") and new.startswith("+") and "drop backstop-protected" in old + new, firewall
    assert "10.252.0.192/26" in new and "10.252.0.192" not in old, firewall
    assert [line[0] + line[1:].strip() for line in changed_lines(domain)] == [
        '-<memory unit="KiB">131072</memory>', '-<currentMemory unit="KiB">131072</currentMemory>',
        '+<memory unit="KiB">147456</memory>', '+<currentMemory unit="KiB">147456</currentMemory>'], domain
    assert plan[1]["note"] == "applies at its next start (dmzctl up --restart-changed)"
    text = dmzctl("plan", str(config), check=True).stdout
    assert text.startswith(f"pcpl: 2 change(s) ({config})\n  ~ firewall inet dmzctl-pcpl updated: "), text

    # plan changed nothing: the live objects are as before.
    live = subprocess.run(["nft", "list", "set", "inet", "dmzctl-pcpl", "protected4"], capture_output=True,
                          text=True).stdout
    assert "10.252.0.192" not in live
    assert "<memory unit='KiB'>131072</memory>" in subprocess.run(
        ["virsh", "dumpxml", "--inactive", "pc-web"], capture_output=True, text=True).stdout

    applied = dmzctl("up", str(config), check=True)
    assert up_changes(applied.stdout, "pcpl") == [tuple(step) for step in
                                                   [(c["kind"], c["name"], c["action"]) for c in plan]]
    assert dmzctl("plan", str(config), check=True).stdout == f"pcpl: nothing to do ({config})\n"
    # The running VM still has the old definition: only --restart-changed would act, and plan says so.
    restart = steps(dmzctl("plan", str(config), "--restart-changed", "--json", check=True).stdout)
    assert restart == [("vm", "pc-web", "restart")]
    pending = dmzctl("check", str(config))
    assert pending.returncode == 1
    assert "pcpl: VM pc-web: runs an older definition (dmzctl up --restart-changed)" in pending.stdout


def test_check_sums_up_several_dmzs_and_fix_restores_them(make_dmz):
    one = make_dmz("pcca", "10.251.0.129/26")
    two = make_dmz("pccb", "10.251.0.193/26")
    absent = dmzctl("check", str(one), str(two))
    assert absent.returncode == 1
    # The summary counts what the list shows: the network and the table (and the shared clean-traffic
    # filter when no other DMZ is up), from the same differences.
    listed = {name: sum(1 for line in absent.stdout.splitlines() if line.startswith(f"{name}: "))
              for name in ("pcca", "pccb")}
    assert re.fullmatch(rf"dmzctl check: 2 DMZ\(s\), 2 drifted: pcca \({listed['pcca']} differences: network "
                        rf"missing, \+{listed['pcca'] - 1} more\), pccb \({listed['pccb']} differences: network "
                        rf"missing, \+{listed['pccb'] - 1} more\)", absent.stdout.splitlines()[-1]), absent.stdout
    dmzctl("up", str(one), str(two), check=True)
    clean = dmzctl("check", str(one), str(two))
    assert clean.returncode == 0, clean.stdout
    assert clean.stdout.splitlines() == [f"pcca: in sync ({one})", f"pccb: in sync ({two})",
                                         "dmzctl check: 2 DMZ(s), all in sync"]

    subprocess.run(["virsh", "-q", "net-destroy", "pcca"], check=True, capture_output=True)
    subprocess.run(["nft", "delete", "table", "inet", "dmzctl-pccb"], check=True)
    drifted = dmzctl("check", str(one), str(two))
    assert drifted.returncode == 1
    assert "pcca: network pcca: not active" in drifted.stdout
    assert "pccb: firewall table inet dmzctl-pccb: missing" in drifted.stdout
    assert drifted.stdout.splitlines()[-1] == ("dmzctl check: 2 DMZ(s), 2 drifted: pcca (1 difference: network "
                                               "inactive), pccb (1 difference: firewall table missing)")

    fixed = dmzctl("check", str(one), str(two), "--fix", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    report = json.loads(fixed.stdout)
    assert report["in_sync"] and report["summary"] == "dmzctl check: 2 DMZ(s), 2 fixed (pcca, pccb), all in sync"
    assert report["dmzs"][0]["fixed"] == ["network pcca started"]
    assert report["dmzs"][1]["fixed"] == ["firewall table inet dmzctl-pccb applied"]
    assert dmzctl("check", str(one), str(two)).returncode == 0
