"""The Ansible collection in ansible/ (dmzctl.libvirt): its TOML writer, and playbooks run with
ansible-core against localhost (local connection) on the real libvirtd and nftables.

The module is pointed at this checkout's dmzctl and writes its configs to a temporary
directory (config_dir), never /etc/dmzctl. DMZs are named ans-*, subnets 10.223.0.0/24
(the DMZ) and 10.224.0.0/24 (protected). ansible-playbook's output is read as JSON, never as
text: ansible-core has no json callback of its own (ansible.posix has), so tests/ansible_callback
brings one of the same shape.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from guest import ROOT, guest_dir, kernel_vm_toml, wipe

COLLECTION = ROOT / "ansible" / "ansible_collections" / "dmzctl" / "libvirt"
sys.path.insert(0, str(ROOT / "ansible"))
from ansible_collections.dmzctl.libvirt.plugins.module_utils.toml_text import TomlError, dumps  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "ansible"
BIN = Path(sys.executable).parent
DMZCTL = BIN / "dmzctl"
GATEWAY = "10.223.0.1/24"


# --- the TOML writer (no host) ---------------------------------------------------------

SAMPLE = {
    "dmz": {"name": "ans-golden", "bridge": "ansg0", "gateway": GATEWAY, "protected": ["10.224.0.0/24"],
            "dhcp": True, "max_flows": 200, "log_rate": "6/hour", "weird key": "tab\there \"quoted\" \\ \u0001"},
    "hole": [{"from": "ans-web", "to": "10.224.0.53", "proto": "udp", "port": 53},
             {"from": "ans-web", "to": "10.224.0.80", "port": [80, 443]}],
    "vm": [{"name": "ans-web", "memory": "128MiB", "vcpus": 1, "ratio": 0.5,
            "limits": {"cpu_per_vcpu": 50},
            "disks": [{"path": "/var/lib/x.qcow2", "format": "qcow2"}],
            "mixed": [1, "two", {"three": 3}], "empty": []}],
}


def test_toml_writer_golden(regenerate):
    text = dumps(SAMPLE)
    golden = GOLDEN / "sample.toml"
    if regenerate:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()
    assert tomllib.loads(text) == SAMPLE


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.toml")) + sorted(
    (ROOT / "tests" / "configs").rglob("*.toml")), ids=lambda p: p.name)
def test_toml_writer_round_trips_configs(path):
    data = tomllib.loads(path.read_text())
    assert tomllib.loads(dumps(data)) == data


def test_toml_writer_names_what_has_no_toml_form():
    with pytest.raises(TomlError, match=r"^vm\[0\]\.memory: null has no TOML form"):
        dumps({"vm": [{"name": "a", "memory": None}]})


def test_role_packages_are_host_packages():
    """The role installs what scripts/install.sh does: HOST_PACKAGES of scripts/packages.sh."""
    source = (ROOT / "scripts" / "packages.sh").read_text()
    block = source[source.index("HOST_PACKAGES=("):source.index("\n)", source.index("HOST_PACKAGES=("))]
    listed = [word for line in block.splitlines()[1:] if not line.strip().startswith("#") for word in line.split()]
    defaults = (COLLECTION / "roles" / "host" / "defaults" / "main.yml").read_text()
    role = re.findall(r"^  - (\S+)$", defaults.split("dmzctl_packages:")[1].split("\n#")[0], re.M)
    assert role == listed


def test_readme_many_hosts_example_is_a_valid_config(tmp_path):
    """The README's group_vars of DMZs, written by the module's TOML writer, is a config dmzctl accepts;
    its playbook passes ansible-playbook's syntax check."""
    import yaml

    section = (ROOT / "README.md").read_text().split("## Many hosts", 1)[1]
    found = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    blocks = {"ini": next(text for language, text in found if language == "ini"),
              "yaml": next(text for language, text in found if language == "yaml" and "dmzs:" in text),
              "play": next(text for language, text in found if language == "yaml" and "hosts:" in text)}
    dmz = yaml.safe_load(blocks["yaml"])["dmzs"][0]
    config = dict(dmz["config"], dmz={"name": dmz["name"], **dmz["config"]["dmz"]})
    (tmp_path / "web.toml").write_text(dumps(config))
    result = subprocess.run([str(DMZCTL), "validate", str(tmp_path / "web.toml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (tmp_path / "inventory.ini").write_text(blocks["ini"])
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "dmzhosts.yml").write_text(blocks["yaml"])
    (tmp_path / "site.yml").write_text(blocks["play"])
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.ini"),
                             str(tmp_path / "site.yml"), "--syntax-check"], capture_output=True, text=True,
                            env=ansible_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def ansible_env(tmp_path: Path) -> dict:
    return {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "ansible"), "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"), "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote")}


def test_module_documents_exactly_its_options(tmp_path):
    """ansible-doc reads the module's DOCUMENTATION; its options are the argument_spec's (what
    ansible-test's validate-modules checks, which needs a download to run)."""
    result = subprocess.run([str(BIN / "ansible-doc"), "-t", "module", "dmzctl.libvirt.dmz", "--json"],
                            capture_output=True, text=True, env=ansible_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)["dmzctl.libvirt.dmz"]["doc"]
    source = (COLLECTION / "plugins" / "modules" / "dmz.py").read_text()
    spec = source[source.index("argument_spec=dict("):source.index("mutually_exclusive")]
    assert sorted(doc["options"]) == sorted(re.findall(r"^ {12}(\w+)=dict\(", spec, re.M))


@pytest.mark.parametrize("command", ["up", "down", "destroy", "kill"])
def test_json_outcome_of_a_failure_is_one_document(tmp_path, command):
    """What the module reads: the error as one JSON line on stdout, with dmzctl's exit code; all
    the config's problems on that one line."""
    bad = tmp_path / "ans-bad.toml"
    bad.write_text('[dmz]\nname = "ans-bad"\ngateway = "nonsense"\nprotected = 3\n')
    for path, code in ((tmp_path / "absent.toml", 2), (bad, 2)):
        result = subprocess.run([str(DMZCTL), command, "--json", str(path)], capture_output=True, text=True,
                                timeout=120)
        document = json.loads(result.stdout)
        assert result.returncode == code == document["exit_code"], result
        assert document["changed"] is False and document["dmzs"] == []
        assert "\n" not in document["error"] and str(path) in document["error"], document
    assert document["error"].count(str(bad)) >= 2, document  # both problems, on one line


# ansible-test's sanity tests that need no virtual environment of their own; the others
# (validate-modules, pylint, pep8, yamllint, import, ansible-doc, runtime-metadata) bootstrap
# pip from ci-files.testing.ansible.com first, which an offline host cannot reach.
OFFLINE_SANITY = ["action-plugin-docs", "compile", "empty-init", "line-endings", "no-assert", "no-get-exception",
                  "no-illegal-filenames", "no-smart-quotes", "replace-urlopen", "shebang", "symlinks",
                  "use-argspec-type-path", "use-compat-six"]


def test_ansible_test_sanity_offline(tmp_path):
    tests = [word for name in OFFLINE_SANITY for word in ("--test", name)]
    result = subprocess.run([str(BIN / "ansible-test"), "sanity", "--python", "3.11", *tests], cwd=COLLECTION,
                            capture_output=True, text=True, env=ansible_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ERROR" not in result.stdout + result.stderr


# --- playbooks on this host ------------------------------------------------------------

def playbook(tmp_path: Path, tasks: list[dict], *options: str, play: dict | None = None) -> dict:
    """Run one play on localhost; the json callback's document (with the run's seconds)."""
    path = tmp_path / "play.json"  # JSON is YAML
    path.write_text(json.dumps([{"hosts": "localhost", "connection": "local", "gather_facts": False,
                                 "tasks": tasks, **(play or {})}]))
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "ansible"), "ANSIBLE_STDOUT_CALLBACK": "dmzctl_json",
           "ANSIBLE_CALLBACK_PLUGINS": str(ROOT / "tests" / "ansible_callback"),
           "ANSIBLE_LOCALHOST_WARNING": "false", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
           "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
    began = time.monotonic()
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", str(path), *options],
                            capture_output=True, text=True, env=env, timeout=600)
    try:
        document = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from ansible-playbook (exit {result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}") from None
    document["seconds"] = time.monotonic() - began
    document["rc"] = result.returncode
    return document


def task_result(document: dict, index: int = 0) -> dict:
    return document["plays"][0]["tasks"][index]["hosts"]["localhost"]


def stats(document: dict) -> dict:
    return document["stats"]["localhost"]


def changed(document: dict) -> int:
    """How many tasks changed, in a run where none failed."""
    assert stats(document)["failures"] == 0, json.dumps(document["plays"], indent=1)[-4000:]
    return stats(document)["changed"]


def changed_tasks(document: dict) -> list[str]:
    return [task["task"]["name"] for play in document["plays"] for task in play["tasks"]
            if task["hosts"]["localhost"].get("changed")]


def dmz_task(name: str, config_dir: Path, state: str = "up", **options) -> dict:
    return {"dmzctl.libvirt.dmz": {"name": name, "state": state, "config_dir": str(config_dir),
                                   "dmzctl": str(DMZCTL), **options}}


def dmz_config(name: str, protected: str = "10.224.0.0/24", vms: list[dict] | None = None) -> dict:
    config = {"dmz": {"bridge": f"{name.replace('-', '')}0", "mode": "route", "gateway": GATEWAY,
                      "protected": [protected]}}
    if vms:
        config["vm"] = vms
    return config


def dmzctl_json(*args: str) -> list | dict:
    result = subprocess.run([str(DMZCTL), *args, "--json"], capture_output=True, text=True, timeout=300)
    return json.loads(result.stdout)


def nft_table_exists(name: str) -> bool:
    return subprocess.run(["nft", "list", "table", "inet", f"dmzctl-{name}"], capture_output=True).returncode == 0


def rendered(path: Path) -> str:
    """What `up` makes of the config on this host now: the table follows the host's networks."""
    result = subprocess.run([str(DMZCTL), "render", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_on_a_still_host(tmp_path: Path, tasks: list[dict], path: Path, view: str | None = None) -> dict:
    """A run that must change nothing after one that made the DMZ as configured (view: what the config
    rendered to after that one). On a shared host other tests add and remove bridges at any time, and
    dmzctl then rightly re-renders the table: only a run with the rendering the
    same before and after it is judged. Another run is made when the host moved (never more than three)."""
    for _ in range(3):
        start = rendered(path)
        view = start if view is None else view
        document = playbook(tmp_path, tasks)
        end = rendered(path)
        if view == start == end:
            return document
        view = end
    pytest.fail("the host's networks or addresses changed under three runs in a row")


@pytest.fixture
def owned(tmp_path, monkeypatch):
    """The DMZs a test names, wiped from the host before and after it, whatever happened."""
    monkeypatch.setenv("DMZCTL_EVENT_LOG", str(tmp_path / "events.log"))
    names: list[tuple[str, list[str]]] = []

    def own(name: str, vms: list[str] = ()) -> str:
        names.append((name, list(vms)))
        wipe(name, list(vms))
        return name

    yield own
    for name, vms in names:
        wipe(name, vms)


@pytest.mark.host
@pytest.mark.guest
def test_playbook_changed_ok_check_repair_down_destroyed(tmp_path, owned):
    name = owned("ans-web", ["ans-web1"])
    vm = tomllib.loads(kernel_vm_toml("ans-web1", "10.223.0.10", GATEWAY, guest_dir(), shutdown_timeout=10))["vm"][0]
    config_dir = tmp_path / "etc"
    config = dmz_config(name, vms=[vm])
    path = config_dir / f"{name}.toml"

    first = playbook(tmp_path, [dmz_task(name, config_dir, config=config)])
    view = rendered(path)
    assert changed(first) == 1, task_result(first)
    assert "VM ans-web1 started" in " ".join(task_result(first)["changes"])
    assert tomllib.loads(path.read_text())["dmz"]["name"] == name
    # Not the verdict, nor "in sync": the table follows the host's networks, which other tests on a
    # shared host change at any moment (up re-renders it).
    status = dmzctl_json("status", str(path))[0]
    assert status["network"] == "active" and status["vms"][0]["state"] == "running", status
    assert status["firewall"] != "absent", status

    second = run_on_a_still_host(tmp_path, [dmz_task(name, config_dir, config=config)], path, view)
    assert changed(second) == 0 and stats(second)["ok"] == 1, task_result(second)

    # Check mode with an edited config: the diff of the file and the plan's text; nothing changes.
    before, table_before = path.read_text(), subprocess.run(
        ["nft", "list", "table", "inet", f"dmzctl-{name}"], capture_output=True, text=True).stdout
    edited = dmz_config(name, protected="10.224.1.0/24", vms=[vm])
    check = playbook(tmp_path, [dmz_task(name, config_dir, config=edited)], "--check", "--diff")
    result = task_result(check)
    assert changed(check) == 1, result
    diffs = result["diff"] if isinstance(result["diff"], list) else [result["diff"]]
    assert '-protected = ["10.224.0.0/24"]' in diff_text(diffs[0]) and '+protected = ["10.224.1.0/24"]' in diff_text(
        diffs[0])
    assert any("firewall inet dmzctl-ans-web: update" in d.get("prepared", "") and "10.224.1.0/24" in d["prepared"]
               for d in diffs), diffs
    assert path.read_text() == before
    table_after = subprocess.run(["nft", "list", "table", "inet", f"dmzctl-{name}"], capture_output=True,
                                 text=True).stdout
    assert "10.224.1.0/24" not in table_after and "10.224.0.0/24" in table_after, table_after
    assert re.sub(r"counter packets \d+ bytes \d+", "", table_after) == re.sub(
        r"counter packets \d+ bytes \d+", "", table_before)

    # Drift: the table deleted behind dmzctl's back; a run repairs it and says so.
    subprocess.run(["nft", "delete", "table", "inet", f"dmzctl-{name}"], check=True)
    repair = playbook(tmp_path, [dmz_task(name, config_dir, config=config)])
    assert changed(repair) == 1, task_result(repair)
    assert f"firewall table inet dmzctl-{name} applied" in task_result(repair)["changes"]
    assert nft_table_exists(name)

    down = playbook(tmp_path, [dmz_task(name, config_dir, "down")])
    assert changed(down) == 1, task_result(down)
    status = dmzctl_json("status", str(path))[0]
    assert status["verdict"].startswith("DOWN") and status["vms"][0]["state"] == "shut off", status
    assert not nft_table_exists(name)
    again = playbook(tmp_path, [dmz_task(name, config_dir, "down")], "--check")
    assert changed(again) == 0, task_result(again)
    again = playbook(tmp_path, [dmz_task(name, config_dir, "down")])
    assert changed(again) == 0, task_result(again)

    check_gone = playbook(tmp_path, [dmz_task(name, config_dir, "destroyed")], "--check")
    assert changed(check_gone) == 1 and path.exists(), task_result(check_gone)
    gone = playbook(tmp_path, [dmz_task(name, config_dir, "destroyed", config=config)])
    assert changed(gone) == 1, task_result(gone)
    assert not path.exists()
    probe = config_dir / "probe.toml"
    probe.write_text(dumps(dict(config, dmz=dict(config["dmz"], name=name))))
    assert dmzctl_json("status", str(probe))[0]["verdict"] == "NOT DEFINED"
    probe.unlink()
    again = playbook(tmp_path, [dmz_task(name, config_dir, "destroyed", config=config)])
    assert changed(again) == 0, task_result(again)
    runs = {"first (VM started)": first, "second (ok)": second, "check --diff, edited": check, "repair": repair,
            "down": down, "check, destroyed": check_gone, "destroyed": gone}
    print("playbook runs: " + ", ".join(f"{label} {run['seconds']:.1f} s" for label, run in runs.items()))


def diff_text(diff: dict) -> str:
    import difflib

    return "\n".join(difflib.unified_diff(diff.get("before", "").splitlines(), diff.get("after", "").splitlines(),
                                          lineterm=""))


@pytest.mark.host
def test_playbook_bad_config_fails_with_dmzctl_line(tmp_path, owned):
    name = owned("ans-bad")
    config_dir = tmp_path / "etc"
    config = dmz_config(name)
    config["dmz"]["gateway"] = "10.223.0.300/24"
    for options in ((), ("--check",)):
        document = playbook(tmp_path, [dmz_task(name, config_dir, config=config)], *options)
        result = task_result(document)
        assert result["failed"] and stats(document)["failures"] == 1, result
        assert "\n" not in result["msg"] and str(config_dir / f"{name}.toml") in result["msg"], result["msg"]
        assert "dmz.gateway" in result["msg"], result["msg"]
        assert not (config_dir / f"{name}.toml").exists()  # a failed up leaves no config behind
    assert not nft_table_exists(name)


@pytest.mark.host
def test_playbook_verified_without_vm(tmp_path, owned):
    """A DMZ with no VM is valid; `verified` brings it up and proves it with real packets (a config
    file already on the host, src)."""
    name = owned("ans-ver")
    config_dir = tmp_path / "etc"
    path = config_dir / f"{name}.toml"
    path.parent.mkdir()
    path.write_text(dumps(dict(dmz_config(name), dmz={"name": name, **dmz_config(name)["dmz"]})))
    # verify refuses to prove a table that differs from the config: judged on a host that stood still
    document = run_on_a_still_host(tmp_path, [dmz_task(name, config_dir, "verified", src=str(path))], path)
    result = task_result(document)
    assert stats(document)["failures"] == 0, result
    assert result["verify"]["ok"] and result["verify"]["counts"]["MISMATCH"] == 0, result["verify"]
    gone = playbook(tmp_path, [dmz_task(name, config_dir, "destroyed")])
    assert changed(gone) == 1 and not nft_table_exists(name), task_result(gone)


@pytest.mark.host
def test_role_installs_into_its_own_prefix(tmp_path):
    """The role for real, with every path it writes under tmp_path: the venv scripts/install.sh makes,
    the link, the completion, the hooks. Its apt task finds the packages installed (scripts/setup.sh
    put them there) and changes nothing; the systemd units are off (no systemd here) and libvirtd is
    not signalled (the hooks are not in /etc/libvirt/hooks)."""
    role = {"role": "dmzctl.libvirt.host", "vars": {
        "dmzctl_source": str(ROOT), "dmzctl_prefix": str(tmp_path / "opt"), "dmzctl_bin_dir": str(tmp_path / "sbin"),
        "dmzctl_completion_dir": str(tmp_path / "completion"), "dmzctl_hooks_dir": str(tmp_path / "hooks"),
        "dmzctl_unit_dir": str(tmp_path / "units"), "dmzctl_systemd": False}}
    (tmp_path / "sbin").mkdir()
    check = playbook(tmp_path, [], "--check", play={"roles": [role]})
    changed(check)
    assert not (tmp_path / "opt").exists()
    first = playbook(tmp_path, [], play={"roles": [role]})
    assert changed(first) == 2 and changed_tasks(first) == [
        "dmzctl.libvirt.host : dmzctl from the checkout (scripts/install.sh)",
        "dmzctl.libvirt.host : Remember what was installed"], changed_tasks(first)
    installed = subprocess.run([str(tmp_path / "sbin" / "dmzctl"), "validate", str(ROOT / "examples" / "demo.toml")],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    hook = (tmp_path / "hooks" / "qemu.d" / "dmzctl").read_text().splitlines()[0]
    assert hook.startswith(f"#!{tmp_path / 'opt' / 'bin' / 'python'}"), hook
    assert (tmp_path / "completion" / "dmzctl").is_file()
    (tmp_path / "hooks" / "qemu.d" / "dmzctl").unlink()  # drift: the role puts it back, and says so
    repair = playbook(tmp_path, [], play={"roles": [role]})
    assert changed_tasks(repair) == ["dmzctl.libvirt.host : libvirt hooks and systemd units still in place "
                                     "(dmzctl install)"], changed_tasks(repair)
    assert (tmp_path / "hooks" / "qemu.d" / "dmzctl").is_file()
    second = playbook(tmp_path, [], play={"roles": [role]})
    assert changed(second) == 0, changed_tasks(second)
    print(f"role: check {check['seconds']:.1f} s, first run {first['seconds']:.1f} s, hook repaired "
          f"{repair['seconds']:.1f} s, second {second['seconds']:.1f} s")
