"""One observed state, one diff: status, check and plan report each kind of drift the same way, and
check --fix repairs it (or, for an object that is not dmzctl's, refuses to touch it).

A DMZ with two tiny guests is brought up once; each row puts the host into one kind of drift
behind dmzctl's back, asks the three commands, repairs with check --fix, and checks the DMZ is
in sync again before the next row.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from guest import dmzctl, guest_dir, kernel_vm_toml, wait_for_serial, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ, BRIDGE = "drf", "drfbr0"
GATEWAY = "10.228.0.1/24"
VMS = {"drf-web": "10.228.0.10", "drf-spare": "10.228.0.11"}
TABLE = f"dmzctl-{DMZ}"


def virsh(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True,
                          input=input_text, timeout=120)


def config_text(vms: dict) -> str:
    head = (f'[dmz]\nname = "{DMZ}"\nbridge = "{BRIDGE}"\ngateway = "{GATEWAY}"\n'
            f'protected = ["10.228.128.0/24"]\n')
    return head + "".join(kernel_vm_toml(vm, ip, GATEWAY, guest_dir()) for vm, ip in vms.items())


def redefine(kind: str, name: str, change) -> None:
    """Dump an object's persistent XML, change it, define it again: an edit behind dmzctl's back."""
    dump = {"net": ["net-dumpxml", "--inactive"], "dom": ["dumpxml", "--inactive"], "nwfilter": ["nwfilter-dumpxml"]}
    define = {"net": "net-define", "dom": "define", "nwfilter": "nwfilter-define"}
    root = etree.fromstring(virsh(*dump[kind], name).stdout.encode())
    change(root)
    path = Path(f"/tmp/{DMZ}-{kind}-{name}.xml")
    path.write_bytes(etree.tostring(root))
    try:
        result = virsh(define[kind], str(path))
        assert result.returncode == 0, result.stderr
    finally:
        path.unlink(missing_ok=True)


def set_memory(root) -> None:
    for tag in ("memory", "currentMemory"):
        root.find(tag).text = str(int(root.find(tag).text) + 1024)


def stp_off(root) -> None:
    root.find("bridge").set("stp", "off")


def extra_rule(root) -> None:
    rule = etree.SubElement(root, "rule", action="accept", direction="out", priority="999")
    etree.SubElement(rule, "all")


def rule_handle(chain: str, comment: str) -> int:
    listing = json.loads(subprocess.run(["nft", "-j", "-a", "list", "chain", "inet", TABLE, chain],
                                        capture_output=True, text=True, check=True).stdout)
    return next(item["rule"]["handle"] for item in listing["nftables"]
                if item.get("rule", {}).get("comment") == comment)


def foreign_domain() -> None:
    """The spare VM replaced by a domain of the same name that is not dmzctl's."""
    virsh("destroy", "drf-spare")
    virsh("undefine", "drf-spare")
    xml = ("<domain type='qemu'><name>drf-spare</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64'>hvm</type></os></domain>")
    path = Path(f"/tmp/{DMZ}-foreign.xml")
    path.write_text(xml)
    try:
        assert virsh("define", str(path)).returncode == 0
    finally:
        path.unlink(missing_ok=True)


def drop_spare_from_config(world) -> None:
    world["config"].write_text(config_text({"drf-web": VMS["drf-web"]}))


# (kind of drift, how to cause it, the difference kinds all three must report, whether fix repairs it)
CASES = [
    ("table missing", lambda w: subprocess.run(["nft", "delete", "table", "inet", TABLE], check=True),
     {"table-missing"}, True),
    ("a chain flushed", lambda w: subprocess.run(["nft", "flush", "chain", "inet", TABLE, "from_dmz"], check=True),
     {"table-chain-flushed"}, True),
    ("a rule altered", lambda w: subprocess.run(["nft", "delete", "rule", "inet", TABLE, "from_dmz", "handle",
                                                 str(rule_handle("from_dmz", "to protected IPv4"))], check=True),
     {"table-rules-altered"}, True),
    ("network XML changed", lambda w: redefine("net", DMZ, stp_off), {"network-definition"}, True),
    ("network inactive", lambda w: virsh("net-destroy", DMZ), {"network-inactive"}, True),
    ("VM XML changed", lambda w: redefine("dom", "drf-web", set_memory), {"vm-definition"}, True),
    ("VM shut off", lambda w: virsh("destroy", "drf-web"), {"vm-not-running"}, True),
    ("the backstop deleted", lambda w: subprocess.run(["nft", "delete", "table", "inet", f"{TABLE}.backstop"],
                                                       check=True), {"table-chain-missing"}, True),
    ("nwfilter edited", lambda w: redefine("nwfilter", "dmzctl-drf-drf-web", extra_rule),
     {"nwfilter-differs"}, True),
    ("a foreign object with the same name", lambda w: foreign_domain(), {"vm-foreign"}, False),
    ("a VM removed from the config", drop_spare_from_config, {"vm-not-in-config"}, True),
]


def kinds_of_status(config: Path) -> set:
    return {d["kind"] for d in json.loads(dmzctl("status", str(config), "--json").stdout)[0]["differences"]}


def kinds_of_check(config: Path) -> set:
    return {d["kind"] for d in json.loads(dmzctl("check", str(config), "--json").stdout)["dmzs"][0]["differences"]}


def kinds_of_plan(config: Path):
    result = dmzctl("plan", str(config), "--json")
    if result.returncode != 0:
        return result  # refused (a foreign object): the caller checks the message
    return {d["kind"] for d in json.loads(result.stdout)[0]["differences"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    config = tmp_path_factory.mktemp("drift") / "drf.toml"
    config.write_text(config_text(VMS))
    wipe(DMZ, list(VMS))
    try:
        dmzctl("up", str(config), check=True)
        for vm in VMS:
            wait_for_serial(vm, "DMZGUEST READY")
        yield {"config": config}
    finally:
        config.write_text(config_text(VMS))
        dmzctl("destroy", str(config), "--timeout", "0")
        wipe(DMZ, list(VMS))


@pytest.mark.parametrize("name, cause, expected, repairable", CASES, ids=[c[0] for c in CASES])
def test_every_kind_of_drift_is_reported_alike_and_repaired(world, name, cause, expected, repairable):
    config = world["config"]
    fixed = dmzctl("check", str(config), "--fix")
    assert fixed.returncode == 0, f"not in sync before '{name}': {fixed.stdout}{fixed.stderr}"
    cause(world)
    status, check = kinds_of_status(config), kinds_of_check(config)
    assert expected <= check, f"{name}: check reports {check}"
    assert status == check, f"{name}: status says {status}, check says {check}"
    plan = kinds_of_plan(config)
    if repairable:
        assert plan == check, f"{name}: plan says {plan}, check says {check}"
        repaired = dmzctl("check", str(config), "--fix", "--json")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert json.loads(repaired.stdout)["in_sync"]
    else:
        # dmzctl never touches what is not its own: plan and fix refuse, in one line, exit 4.
        assert plan.returncode == 4 and "is not dmzctl's" in plan.stderr, plan.stderr
        refused = dmzctl("check", str(config), "--fix", "--json")
        assert refused.returncode == 1 and "is not dmzctl's" in json.loads(refused.stdout)["dmzs"][0]["fix_error"]
        assert virsh("dominfo", "drf-spare").returncode == 0, "the foreign domain was left alone"
        virsh("undefine", "drf-spare")
        assert dmzctl("check", str(config), "--fix").returncode == 0
        wait_for_serial("drf-spare", "DMZGUEST READY")


def test_check_s_summary_counts_what_its_list_shows(world):
    """The summary and the list come from the same differences (after a destroy, every object is missing)."""
    config = world["config"]
    config.write_text(config_text(VMS))
    dmzctl("check", str(config), "--fix")
    dmzctl("destroy", str(config), "--timeout", "0", check=True)
    result = dmzctl("check", str(config))
    listed = [line for line in result.stdout.splitlines() if line.startswith(f"{DMZ}: ")]
    summary = result.stdout.splitlines()[-1]
    assert f"{DMZ} ({len(listed)} differences: " in summary, result.stdout
    dmzctl("up", str(config), check=True)
