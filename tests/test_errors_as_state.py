"""Never read an error as a state: a libvirt error is no answer, and a DMZ's firewall goes only
after libvirt has positively confirmed that every one of its VMs is off."""

from __future__ import annotations

import pytest
import typer

libvirt = pytest.importorskip("libvirt")

from dmzctl import cli, lifecycle  # noqa: E402
from dmzctl.config import parse_dmz  # noqa: E402
from dmzctl.errors import HostError  # noqa: E402
from dmzctl.host.virt import Virt  # noqa: E402


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


def bare_virt() -> Virt:
    virt = Virt.__new__(Virt)  # no connection: only the state logic is under test
    import threading

    virt._state_changed = threading.Condition()
    return virt


def test_an_error_is_not_shut_off():
    virt = bare_virt()
    dom = Dom(libvirt_error(libvirt.VIR_ERR_OPERATION_TIMEOUT, "cannot acquire state change lock"))
    with pytest.raises(HostError, match="reading the state of domain web: cannot acquire state change lock"):
        virt.is_off(dom)


def test_a_domain_that_is_gone_is_off():
    virt = bare_virt()
    assert virt.is_off(Dom(libvirt_error(libvirt.VIR_ERR_NO_DOMAIN)))
    assert virt.is_off(Dom(libvirt.VIR_DOMAIN_SHUTOFF))
    assert not virt.is_off(Dom(libvirt.VIR_DOMAIN_RUNNING))


def test_stop_domains_stops_at_an_error_so_down_keeps_the_firewall():
    """down() removes the table only after stop_domains returns: an error while waiting ends the run."""
    dmz = parse_dmz({"dmz": {"name": "err", "gateway": "10.9.0.1/24", "protected": ["10.8.0.0/24"]},
                     "vm": [{"name": "web", "kernel": "/k", "memory": 128}]})

    class FlakyVirt:
        def __init__(self):
            self.inner = bare_virt()
            self.dom = Dom(libvirt.VIR_DOMAIN_RUNNING, libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "rpc broke"))
            self.shutdown = False

        def domain(self, _name):
            return self.dom

        def is_off(self, dom):
            return self.inner.is_off(dom)

        def shutdown_domain(self, _dom):
            self.shutdown = True

        def wait_for(self, predicate, timeout, tick=None):
            return self.inner.wait_for(predicate, timeout, tick)

    virt = FlakyVirt()
    with pytest.raises(HostError, match="rpc broke"):
        lifecycle.stop_domains(virt, dmz, ["web"], timeout=5, say=lambda _m: None)
    assert virt.shutdown


def test_a_libvirt_error_that_escapes_is_one_line_and_exit_3(capsys):
    def action():
        raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "end of file while reading data")

    with pytest.raises(typer.Exit) as exited:
        cli.run(action)
    assert exited.value.exit_code == 3
    err = capsys.readouterr().err
    assert err == "dmzctl: libvirt: end of file while reading data\n"
