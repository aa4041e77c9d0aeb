#!/usr/bin/python
# -*- coding: utf-8 -*-
# BSD-3-Clause (see the dmzctl repository)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: dmz
short_description: A libvirt DMZ made by dmzctl, from its config
description:
  - Writes a DMZ's config (TOML) and brings the DMZ to the state asked for with dmzctl, on the target host.
  - Calls dmzctl's JSON interfaces (C(up --json), C(down --json), C(destroy --json), C(plan --json),
    C(status --json), C(verify --json)); dmzctl must be installed on the target (role C(dmzctl.libvirt.host)).
  - Check mode asks C(dmzctl plan) (state up and verified) or C(dmzctl status) (down and destroyed) and changes nothing.
  - With C(--diff), shows the config file before and after and the plan's text.
version_added: "0.1.0"
options:
  name:
    description: The DMZ's name (C(dmz.name) in the config; filled in when the config leaves it out).
    type: str
    required: true
  config:
    description:
      - The DMZ's config as a dict in dmzctl's TOML schema (C([dmz]), C([[dmz.allow]]), C([[vm]]) ...).
      - Written to I(config_dir)/I(name).toml, where C(dmzctl boot) and C(dmzctl guard) find it.
    type: dict
  src:
    description: A config file already on the target, used where it is (not copied).
    type: path
  state:
    description:
      - C(up) as C(dmzctl up); C(down) halts it (VMs off, network stopped, table removed, definitions kept);
      - C(destroyed) removes its definitions (C(dmzctl destroy)) and the config file this module wrote;
      - C(verified) is C(up), then C(dmzctl verify) proves the isolation with real packets and fails on a mismatch
        (skipped in check mode, since probes send packets).
    type: str
    choices: [up, down, destroyed, verified]
    default: up
  config_dir:
    description: Where I(config) is written as I(name).toml.
    type: path
    default: /etc/dmzctl
  dmzctl:
    description: The dmzctl executable on the target (a path, or a name looked up on PATH and in /usr/local/sbin).
    type: str
    default: dmzctl
  restart_changed:
    description: Restart running VMs whose definition changed (C(up --restart-changed)).
    type: bool
    default: false
  timeout:
    description: Seconds of ACPI grace before a VM is destroyed (down, destroyed); default each VM's shutdown_timeout.
    type: float
  delete_volumes:
    description: With state destroyed, also delete the volumes dmzctl made for the VMs (their data is lost).
    type: bool
    default: false
  verify_targets:
    description: With state verified, also probe these ADDR[:PORT] (C(verify --target)).
    type: list
    elements: str
    default: []
author: dmzctl
"""

EXAMPLES = r"""
- name: The web DMZ, up
  dmzctl.libvirt.dmz:
    name: web
    config:
      dmz: {bridge: dmzweb0, mode: route, gateway: 10.213.0.1/24, protected: [192.168.1.0/24]}
      vm:
        - {name: web1, memory: 1GiB, disks: [{path: /var/lib/libvirt/images/web1.qcow2}], ip: 10.213.0.10}

- name: Halted, definitions kept
  dmzctl.libvirt.dmz: {name: web, state: down}
"""

RETURN = r"""
config_path: {description: The config file dmzctl was given., returned: always, type: str}
config_changed: {description: Whether the module wrote (or would write) the config file., returned: always, type: bool}
changes: {description: What dmzctl changed for this DMZ, one line each (would change, in check mode)., returned: always, type: list, elements: str}
pending: {description: What applies later (e.g. a network definition at the next restart)., returned: always, type: list, elements: str}
refreshed: {description: Other DMZs' tables dmzctl re-applied because the host's networks changed., returned: always, type: list, elements: str}
plan: {description: C(dmzctl plan --json) for this DMZ (check or diff mode, states up and verified)., returned: when planned, type: dict}
verify: {description: C(dmzctl verify --json)'s report (state verified)., returned: when verified, type: dict}
"""

import json
import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dmzctl.libvirt.plugins.module_utils.toml_text import TomlError, dumps

OFF = ("absent", "foreign", "shut off", "crashed")
HEADER = "# Written by Ansible (dmzctl.libvirt.dmz): edits here are overwritten at the next run.\n"


class Dmzctl:
    """dmzctl's commands, their JSON, and their one-line errors."""

    def __init__(self, module):
        self.module = module
        executable = module.params["dmzctl"]
        if "/" not in executable:
            executable = module.get_bin_path(executable, required=True, opt_dirs=["/usr/local/sbin"])
        self.executable = executable
        self.rename = {}  # a temporary file's path -> the path it stands for, in messages

    def message(self, text):
        for temporary, real in self.rename.items():
            text = text.replace(temporary, real)
        return text

    def call(self, *args):
        """(exit code, the parsed JSON document or None, the error line or '')."""
        rc, out, err = self.module.run_command([self.executable] + list(args))
        try:
            document = json.loads(out) if out.strip() else None
        except ValueError:
            document = None
        errors = [line[len("dmzctl: "):] if line.startswith("dmzctl: ") else line
                  for line in err.splitlines() if line.startswith("dmzctl: ")]
        if isinstance(document, dict) and document.get("error"):
            errors = [document["error"]]
        if (rc != 0 or document is None) and not errors:
            said = (err.strip().splitlines() or out.strip().splitlines() or ["exit %d" % rc])[-1]
            errors = ["dmzctl %s gave no JSON document (exit %d): %s" % (args[0], rc, said)]
        return rc, document, self.message("; ".join(errors))

    def must(self, *args, **kwargs):
        """The JSON document of a command that must succeed; else the task fails with its line.
        status exits 1 with its document when the DMZ is not as configured: ok=(0, 1) for it."""
        rc, document, error = self.call(*args)
        if rc not in kwargs.get("ok", (0,)) or document is None:
            self.module.fail_json(msg=error or "dmzctl %s gave no JSON" % args[0], rc=rc, command=list(args))
        return document


def config_text(module):
    """The wanted file's text, or None when the module does not write the config."""
    config = module.params["config"]
    if config is None:
        return None
    config = dict(config)
    dmz = dict(config.get("dmz") or {})
    name = module.params["name"]
    if dmz.get("name", name) != name:
        module.fail_json(msg="config.dmz.name is %r, but name is %r" % (dmz["name"], name))
    config["dmz"] = dict([("name", name)] + [(k, v) for k, v in dmz.items() if k != "name"])
    try:
        return HEADER + dumps(config)
    except TomlError as error:
        module.fail_json(msg="config: %s" % error)


def read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except (IOError, OSError):
        return None


class Run:
    """One task: the config file and the DMZ, checked or changed."""

    def __init__(self, module):
        self.module = module
        self.dmzctl = Dmzctl(module)
        params = module.params
        self.state = params["state"]
        self.path = params["src"] or os.path.join(params["config_dir"], params["name"] + ".toml")
        self.want = config_text(module)
        self.have = read(self.path)
        self.result = dict(changed=False, config_path=self.path, config_changed=False, changes=[], pending=[],
                           refreshed=[])
        self.diffs = []
        self.scratch = tempfile.mkdtemp(prefix="dmzctl-ansible-")

    @property
    def file_changes(self):
        return self.want is not None and self.want != self.have

    def staged(self):
        """A path holding the wanted config without touching the real one (check mode, plans)."""
        if not self.file_changes:
            return self.path
        staged = os.path.join(self.scratch, os.path.basename(self.path))
        with open(staged, "w") as handle:
            handle.write(self.want)
        self.dmzctl.rename[staged] = self.path
        return staged

    def need_config(self):
        if self.want is None and self.have is None:
            self.module.fail_json(msg="%s: no such file; give config or src" % self.path)

    def file_diff(self):
        """The config file's before and after, and the task changed, when it will change."""
        if self.file_changes and not self.result.get("config_changed"):
            self.diffs.append(dict(before_header=self.path, after_header=self.path, before=self.have or "",
                                   after=self.want))
            self.result.update(changed=True, config_changed=True)

    def write(self):
        self.file_diff()
        if not self.file_changes or self.module.check_mode:
            return
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, 0o755)
        handle, temporary = tempfile.mkstemp(dir=directory or ".", prefix=".dmzctl-")
        with os.fdopen(handle, "w") as out:
            out.write(self.want)
        os.chmod(temporary, 0o644)
        self.module.atomic_move(temporary, self.path)

    def restore(self):
        """A failed up leaves the config file as it was: boot and guard read it."""
        if not self.file_changes or self.module.check_mode:
            return
        if self.have is None:
            os.unlink(self.path)
        else:
            with open(self.path, "w") as handle:
                handle.write(self.have)

    def take(self, outcome):
        mine = [d for d in outcome.get("dmzs", []) if d.get("dmz") == self.module.params["name"]] or outcome["dmzs"]
        for dmz in mine:
            self.result["changes"] += dmz.get("changes", [])
            self.result["pending"] += dmz.get("pending", [])
            self.result["refreshed"] += dmz.get("refreshed", [])
            self.result["changed"] = self.result["changed"] or bool(dmz.get("changed"))
        for line in self.result["refreshed"]:
            self.module.warn("dmzctl also %s" % line)

    def plan(self):
        staged = self.staged()
        args = ["plan", "--json", staged] + (["--config-path", self.path] if staged != self.path else [])
        args += ["--restart-changed"] if self.module.params["restart_changed"] else []
        plans = self.dmzctl.must(*args)
        plan = plans[0] if plans else {"changes": [], "differences": []}
        self.result["plan"] = plan
        text = plan_text(plan)
        if plan["changes"]:
            self.diffs.append(dict(prepared=text))
        return plan

    def up(self):
        self.need_config()
        if self.module.check_mode or self.module._diff:
            self.file_diff()
            plan = self.plan()
            if self.module.check_mode:
                would = [describe(step) for step in plan["changes"]]
                would += ["%s: %s" % (d["object"], d["problem"])
                          for d in plan.get("differences", []) if d.get("kind") == "hooks-missing"]
                self.result["changes"] = would
                self.result["changed"] = self.result["changed"] or bool(would)
                return
        self.write()
        args = ["up", "--json", self.path] + (["--restart-changed"] if self.module.params["restart_changed"] else [])
        rc, outcome, error = self.dmzctl.call(*args)
        if rc != 0 or outcome is None:
            self.restore()
            self.module.fail_json(msg=error, rc=rc, **self.partial(outcome))
        self.take(outcome)

    def partial(self, outcome):
        done = dict(changes=[], pending=[])
        for dmz in (outcome or {}).get("dmzs", []):
            done["changes"] += dmz.get("changes", [])
            done["pending"] += dmz.get("pending", [])
        return done

    def down(self, destroy):
        if self.want is None and self.have is None:
            if destroy:
                return  # nothing written, nothing known: already destroyed
            self.need_config()
        path = self.path if not destroy else self.staged()
        if not destroy:
            self.write()
        if self.module.check_mode:
            self.would_halt(path, destroy)
        else:
            self.halt(path, destroy)
        if destroy and self.have is not None and self.module.params["src"] is None:
            self.diffs.append(dict(before_header=self.path, after_header="(removed)", before=self.have, after=""))
            self.result["changed"] = True
            self.result["changes"].append("config %s removed" % self.path)
            if not self.module.check_mode:
                os.unlink(self.path)

    def would_halt(self, path, destroy):
        statuses = self.dmzctl.must("status", "--json", path if destroy or not self.file_changes else self.staged(),
                                    ok=(0, 1))
        status = statuses[0]
        running = [vm["name"] for vm in status["vms"] if vm["state"] not in OFF]
        would = ["VM %s stopped" % name for name in running]
        if status["network"] == "active" or (destroy and status["network"] == "inactive"):
            would.append("network %s %s" % (status["name"], "removed" if destroy else "stopped"))
        if status["firewall"] != "absent":
            would.append("firewall table of %s removed" % status["name"])
        if destroy:
            would += ["VM %s undefined" % vm["name"] for vm in status["vms"] if vm["state"] not in ("absent", "foreign")]
        self.result["changes"] += would
        self.result["changed"] = self.result["changed"] or bool(would)

    def halt(self, path, destroy):
        params = self.module.params
        args = ["destroy" if destroy else "down", "--json", path]
        args += ["--timeout", str(params["timeout"])] if params["timeout"] is not None else []
        args += ["--delete-volumes", "--yes"] if destroy and params["delete_volumes"] else []
        rc, outcome, error = self.dmzctl.call(*args)
        if rc != 0 or outcome is None:
            self.module.fail_json(msg=error, rc=rc, **self.partial(outcome))
        self.take(outcome)

    def verify(self):
        if self.module.check_mode:  # probes send packets and record their results: not in check mode
            self.result["verify"] = {"skipped": "check mode"}
            return
        args = ["verify", "--json", self.path]
        for target in self.module.params["verify_targets"]:
            args += ["--target", target]
        rc, reports, error = self.dmzctl.call(*args)
        if not isinstance(reports, list) or not reports:
            self.module.fail_json(msg=error or "dmzctl verify gave no report", rc=rc, **self.result)
        report = reports[0]
        self.result["verify"] = report
        if rc != 0 or not report.get("ok"):
            bad = [p for p in report.get("probes", []) if p.get("status") != "ok"]
            lines = report.get("problems", []) + ["%s %s %s: expected %s, observed %s" % (
                p["kind"], p["proto"], p["dst"] + (":%s" % p["port"] if p.get("port") else ""),
                p["expected"], p["observed"]) for p in bad]
            self.module.fail_json(msg="verify: %s" % "; ".join(lines or [error or "failed"]), **self.result)

    def run(self):
        try:
            if self.state in ("up", "verified"):
                self.up()
                if self.state == "verified":
                    self.verify()
            else:
                self.down(destroy=self.state == "destroyed")
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self.diffs:
            self.result["diff"] = self.diffs if len(self.diffs) > 1 else self.diffs[0]
        self.module.exit_json(**self.result)


def describe(step):
    return "%s %s: %s%s" % (step["kind"], step["name"], step["action"], (" (%s)" % step["note"]) if step["note"] else "")


def plan_text(plan):
    """The plan as `dmzctl plan` prints it, from its JSON."""
    if not plan["changes"]:
        return "%s: nothing to do\n" % plan.get("dmz", "")
    lines = ["%s: %d change(s) (%s)" % (plan["dmz"], len(plan["changes"]), plan["config"])]
    for step in plan["changes"]:
        lines.append("  " + describe(step))
        lines += ["      " + line for line in step.get("diff", [])]
    return "\n".join(lines) + "\n"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            config=dict(type="dict"),
            src=dict(type="path"),
            state=dict(type="str", default="up", choices=["up", "down", "destroyed", "verified"]),
            config_dir=dict(type="path", default="/etc/dmzctl"),
            dmzctl=dict(type="str", default="dmzctl"),
            restart_changed=dict(type="bool", default=False),
            timeout=dict(type="float"),
            delete_volumes=dict(type="bool", default=False),
            verify_targets=dict(type="list", elements="str", default=[]),
        ),
        mutually_exclusive=[("config", "src")],
        supports_check_mode=True,
    )
    Run(module).run()


if __name__ == "__main__":
    main()
