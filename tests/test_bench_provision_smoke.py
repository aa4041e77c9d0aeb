"""Smoke test for scripts/bench_provision.py: its arguments and its pure parts, without a VM or the host.

The benchmark itself boots a real Debian guest per run (minutes under TCG); this only checks that the
script parses its options, that the files it writes for each way are what they claim to be, and that
the report comes out in shape from made-up runs. No timing is measured or asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from lxml import etree

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_provision.py"
sys.path.insert(0, str(REPO / "scripts"))

import bench_provision as bp  # noqa: E402

GUEST = bp.Guest(Path("/cache/guest/disk.qcow2"), Path("/cache/guest/vmlinuz"), Path("/cache/guest/initrd.img"),
                 "root=/dev/vda console=ttyS0")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchBenchBenchBenchBenchBenchBenchBenchBen bench"


def test_help_and_options():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--only" in out.stdout and "--runs" in out.stdout
    args = bp.parse_args([])
    assert (args.runs, args.only, args.user) == (3, None, "debian")
    assert bp.parse_args(["--runs", "5", "--only", "virt-install"]).only == "virt-install"
    for bad in (["--runs", "0"], ["--only", "vagrant"]):
        with pytest.raises(SystemExit):
            bp.parse_args(bad)


def test_the_dmzctl_file_uses_the_issue_field_names():
    text = bp.dmzctl_config(GUEST, KEY)
    config = tomllib.loads(text)
    vm = config["vm"][0]
    assert {"image", "disk_size", "pool", "ip", "kernel", "initrd", "cmdline"} <= set(vm)
    assert vm["cloud_init"]["ssh_authorized_keys"] == [KEY]
    assert vm["image"] == str(GUEST.disk) and vm["pool"] == bp.DZ.pool != "dmzctl"
    assert config["dmz"]["gateway"].startswith("10.221.0.") and vm["ip"] == bp.VM_IP
    assert bp.significant_lines(text) <= 20  # "a config of about 15 lines"


def test_by_hand_files_are_well_formed():
    network = etree.fromstring(bp.network_xml().encode())
    assert network.findtext("name") == bp.VI.network and network.find("bridge").get("name") == bp.VI.bridge
    assert network.find("forward").get("mode") == "route"
    assert bp.user_data(KEY).startswith("#cloud-config\n") and KEY in bp.user_data(KEY)
    assert "instance-id: iid-1" in bp.meta_data("iid-1")
    config = bp.network_config()
    assert bp.VI.mac in config and f"{bp.VM_IP}/24" in config and bp.VM_IP6 in config
    # the same address and size of VM for both ways
    assert f'ip = "{bp.VM_IP}"' in bp.firewall_source_config(GUEST) and f'ip = "{bp.VM_IP}"' in bp.dmzctl_config(GUEST, KEY)


def test_virt_install_command():
    files = {name: Path(f"/w/{name}") for name in ("user-data", "meta-data", "network-config")}
    argv = bp.virt_install_argv(GUEST, Path("/w/o.qcow2"), files)
    assert argv[0] == "virt-install" and "--import" in argv and "--noautoconsole" in argv
    options = dict(zip(argv[1::1], argv[2::1]))
    assert options["--memory"] == str(bp.MEMORY_MIB) and options["--virt-type"] == "qemu"
    assert options["--cloud-init"] == "user-data=/w/user-data,meta-data=/w/meta-data,network-config=/w/network-config"
    assert 'kernel_args="root=/dev/vda console=ttyS0"' in options["--boot"]
    assert bp.qemu_img_argv(GUEST, Path("/w/o.qcow2"))[-3:] == ["qcow2", "/w/o.qcow2", "4G"]


def test_the_rendered_table_renamed_for_the_admin(tmp_path):
    source = tmp_path / "bvi.toml"
    source.write_text(bp.firewall_source_config(GUEST))
    out = subprocess.run([sys.executable, "-m", "dmzctl.cli", "render", "--offline", "--what", "nft", str(source)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    renamed = bp.rename_table(bp.without_backstop(json.loads(out.stdout)), "dmzctl-bvi", bp.VI.table)
    text = json.dumps(renamed)
    assert "dmzctl-bvi" not in text and f'"{bp.VI.table}"' in text and f'"{bp.VI.bridge}"' in text


def test_probes_stay_on_the_dmz_bridge():
    argv = bp.ssh_argv(Path("/k"), "debian", "bvi0")
    assert "BindInterface=bvi0" in argv and argv[-2:] == [f"debian@{bp.VM_IP}", "true"]
    assert bp.ssh_banner(bp.VM_IP, "bprov-no-such-if0") is False  # bound to a missing device: nothing is sent


def test_line_counting():
    assert bp.significant_lines("#cloud-config\n\n# a comment\nhostname: x\n  # indented comment\n") == 2
    assert bp.significant_lines('[dmz]\nname = "x"  # trailing comment counts\n') == 2


def _runs() -> list:
    runs = []
    for index, (command, started, ssh) in enumerate([(4.0, 3.9, 100.0), (5.0, 4.8, 120.0), (4.5, 4.4, 110.0)], 1):
        runs.append(bp.Run("virt-install", index, 1.5, command=command, vm_started=started, firewall=command,
                           banner=ssh - 5, ssh=ssh, steps={"virt-install": 3.0, "nft -j -f": 0.1}))
    runs.append(bp.Run("virt-install", 4, 2.0, error="no SSH login"))
    return runs


def _tables(text: str) -> dict[str, list[list[str]]]:
    tables: dict[str, list[list[str]]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(c and set(c) <= set("-: ") for c in cells):
                tables.setdefault(section, []).append(cells)
    return tables


def test_report_from_made_up_runs(tmp_path):
    burdens = {"virt-install": bp.virt_install_burden(GUEST, KEY, '{\n  "nftables": []\n}\n', "", tmp_path),
               "dmzctl": bp.dmzctl_burden(GUEST, KEY)}
    text = bp.render_report(_runs(), ["virt-install"], [("Cores", "2")], burdens, 3, "debian")
    tables = _tables(text)
    header, *rows = tables["Results"]
    assert header[:5] == ["way", "runs", "total (median)", "command (median)", "boot to SSH (median)"]
    by_way = {row[0]: row for row in rows}
    vi = by_way["virt-install + nft by hand"]
    assert vi[1] == "3 (+1 failed)" and vi[2] == "110 s" and vi[3] == "4.50 s" and vi[4] == "106 s"
    assert vi[6].endswith("after the VM started")
    assert bp.NOT_MEASURED in by_way["`dmzctl up`"]  # the placeholder row until the provisioning branch merges
    assert len(tables["Per run"]) == 5 and "failed: no SSH login" in tables["Per run"][-1][2]
    assert [row[0] for row in tables["The by-hand commands, each (min / median / max)"][1:]] == [
        "`virt-install`", "`nft -j -f`"]
    burden = {row[0]: row for row in tables["What each way needs from the user"][1:]}
    assert burden["**commands, in an order to remember**"][1:] == ["5", "1"]
    assert burden["**files to write / lines**"][2] == f"1 / {bp.significant_lines(bp.dmzctl_config(GUEST, KEY))}"


def test_report_names_the_pools_virt_install_left(tmp_path):
    burdens = {"virt-install": bp.virt_install_burden(GUEST, KEY, "{}", "table inet bvi-fw {\n}\n", tmp_path),
               "dmzctl": bp.dmzctl_burden(GUEST, KEY)}
    text = bp.render_report(_runs(), ["virt-install"], [], burdens, 3, "debian",
                            {"virt-install": {"machine": "pc-i440fx-7.2"}}, ["boot (/var/lib/libvirt/boot)"])
    assert "`boot (/var/lib/libvirt/boot)`" in text.split("## Notes")[1]
    assert "| machine | pc-i440fx-7.2 |" in text


def test_ratio_row_when_both_ways_ran():
    runs = _runs()[:3] + [bp.Run("dmzctl", 1, 1.0, command=5.0, vm_started=5.0, ssh=55.0)]
    rows = bp.results_rows(runs, list(bp.WAYS))
    assert rows[-1][0].startswith("ratio") and rows[-1][2] == "0.50"
    assert rows[1][6] == "before the VM starts"
