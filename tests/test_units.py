"""The shipped systemd units, as `dmzctl install` writes them, judged by systemd itself.

There is no systemd running here (no PID 1 systemd), but systemd-analyze can
still parse and check unit files: directives, dependencies and the ExecStart
binaries must all be valid.
"""

import shutil
import subprocess

import pytest

from dmzctl.ops.install import dmzctl_binary, render_unit


@pytest.mark.parametrize("unit", ["dmzctl.service", "dmzctl-guard.service"])
def test_units_pass_systemd_analyze_verify(tmp_path, unit):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian's systemd package) is needed"
    for name in ("dmzctl.service", "dmzctl-guard.service"):  # they refer to each other
        (tmp_path / name).write_text(render_unit(name, dmzctl_binary()))
    result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / unit)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0 and "dmzctl" not in result.stderr, result.stderr
    assert "@DMZCTL@" not in (tmp_path / unit).read_text()
