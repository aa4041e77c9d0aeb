"""Never read an error as a state: a libvirt error is no answer, and a DMZ's firewall goes only
after libvirt has positively confirmed that every one of its VMs is off."""

from __future__ import annotations

import pytest
import typer

libvirt = pytest.importorskip("libvirt")

from dmzctl import cli  # noqa: E402
from dmzctl.config import parse_dmz  # noqa: E402
from dmzctl.errors import HostError  # noqa: E402
from dmzctl.host.virt import Virt  # noqa: E402
from dmzctl.ops import lifecycle  # noqa: E402
from dmzctl.settings import Settings  # noqa: E402


def libvirt_error(code: int, message: str = "simulated") -> "libvirt.libvirtError":
    error = libvirt.libvirtError(message)
    error.err = (code, 0, message, 2, "", None, None, 0, 0)
    return error


class Dom:
    def __init__(self, *states):
        self.states = list(states)

    def name(self):
        return "web"

    def state(self):
        answer = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(answer, Exception):
            raise answer
        return answer, 0


def bare_virt(dom) -> Virt:
    """A Virt without a connection whose one domain is `dom`: only the state logic is under test."""
    import threading

    virt = Virt.__new__(Virt)
    virt._state_changed = threading.Condition()
    virt._domain = lambda _name: dom
    virt.shutdown_domain = lambda _name: setattr(virt, "asked_to_shut_down", True)
    return virt


def test_an_error_is_not_shut_off():
    virt = bare_virt(Dom(libvirt_error(libvirt.VIR_ERR_OPERATION_TIMEOUT, "cannot acquire state change lock")))
    with pytest.raises(HostError, match="reading the state of domain web: cannot acquire state change lock"):
        virt.is_off("web")


def test_a_domain_that_is_gone_is_off():
    assert bare_virt(Dom(libvirt_error(libvirt.VIR_ERR_NO_DOMAIN))).is_off("web")
    assert bare_virt(None).is_off("web")
    assert bare_virt(Dom(libvirt.VIR_DOMAIN_SHUTOFF)).is_off("web")
    assert not bare_virt(Dom(libvirt.VIR_DOMAIN_RUNNING)).is_off("web")


def test_stop_domains_stops_at_an_error_so_down_keeps_the_firewall(tmp_path):
    """down() removes the table only after stop_domains returns: an error while waiting ends the run."""
    dmz = parse_dmz({"dmz": {"name": "err", "gateway": "10.9.0.1/24", "protected": ["10.8.0.0/24"]},
                     "vm": [{"name": "web", "kernel": "/k", "memory": 128}]})
    virt = bare_virt(Dom(libvirt.VIR_DOMAIN_RUNNING, libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "rpc broke")))
    settings = Settings(run_dir=tmp_path, event_log=tmp_path / "events.log")
    with pytest.raises(HostError, match="rpc broke"):
        lifecycle.stop_domains(virt, dmz, ["web"], settings, timeout=5, say=lambda _m: None)
    assert virt.asked_to_shut_down


def test_a_libvirt_error_that_escapes_is_one_line_and_exit_3(capsys):
    def action():
        raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "end of file while reading data")

    with pytest.raises(typer.Exit) as exited:
        cli.run(action)
    assert exited.value.exit_code == 3
    err = capsys.readouterr().err
    assert err == "dmzctl: libvirt: end of file while reading data\n"


@pytest.mark.parametrize("uri, host", [("qemu+ssh://kvm1.invalid/system", "kvm1.invalid"),
                                       ("qemu+tcp://192.0.2.77/system", "192.0.2.77"),
                                       ("qemu:///system", None), ("qemu+ssh://localhost/system", None),
                                       ("qemu+unix:///system?socket=/run/x", None)])
def test_a_remote_libvirt_uri_is_named(uri, host):
    from dmzctl.host.uri import remote_host

    assert remote_host(uri) == host


def test_a_remote_uri_is_refused_before_connecting(monkeypatch, tmp_path):
    """dmzctl applies the tables where it runs: with the VMs on another host they would be unguarded.
    Refused before libvirt.open is called, so no packet leaves for that host."""
    opened = []
    monkeypatch.setattr(libvirt, "open", lambda uri: opened.append(uri))
    with pytest.raises(HostError, match=r"another host \(kvm1.invalid\).*run dmzctl on kvm1.invalid itself"):
        Virt("qemu+ssh://kvm1.invalid/system")
    assert opened == []
    config = tmp_path / "x.toml"
    config.write_text('[dmz]\nname = "x"\ngateway = "10.209.0.1/24"\nprotected = ["10.209.1.0/24"]\n')
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, ["status", "-c", "qemu+ssh://kvm1.invalid/system", str(config)])
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is another host (kvm1.invalid)" in lines[0], result.output
    assert opened == []
