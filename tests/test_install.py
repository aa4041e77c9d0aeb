"""scripts/install.sh: a dmzctl that runs without the clone, its hooks, units and bash completion, and
--uninstall taking exactly that away.

The install is made from a copy of this checkout that is then moved away, into a temporary prefix, with
every host destination (the PATH directory, bash completion, libvirt's hooks, systemd's units) pointed
into the test's own directory: the machine's /usr/local/sbin, /etc/libvirt/hooks and /etc/systemd are
never touched. It needs root (the script insists) but no libvirtd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/install.sh"


def snapshot(directory: Path) -> dict[str, str]:
    """Every path under directory, with what it is (a link's target, a file's text)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = path.read_text(errors="replace")
        else:
            found[key] = "dir"
    return found


class Install:
    """One install and where it put things."""

    def __init__(self, base: Path):
        self.base = base
        self.source = base / "inst-src"
        self.moved = base / "inst-src-moved"
        self.prefix = base / "inst-prefix"
        self.bin = base / "sbin"
        self.completions = base / "completions"
        self.hooks = base / "hooks"
        self.units = base / "units"
        self.etc = base / "etc-dmzctl"

    def env(self, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("PYTHON", "VIRTUAL_ENV", "DMZCTL_"))}
        env.update(DMZCTL_INSTALL_BIN_DIR=str(self.bin), DMZCTL_INSTALL_COMPLETION_DIR=str(self.completions),
                   DMZCTL_HOOKS_DIR=str(self.hooks), DMZCTL_INSTALL_UNIT_DIR=str(self.units),
                   PATH=f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin", **extra)
        return env

    def script(self, *args: str, source: Path | None = None) -> subprocess.CompletedProcess:
        source = source or self.source
        return subprocess.run([str(source / SCRIPT), "--prefix", str(self.prefix), *args], env=self.env(),
                              cwd=self.base, capture_output=True, text=True, timeout=600)

    def dmzctl(self, *args: str) -> subprocess.CompletedProcess:
        """The installed dmzctl as a user runs it: by name, through PATH, from elsewhere."""
        return subprocess.run(["dmzctl", *args], env=self.env(), cwd=self.base, capture_output=True, text=True,
                              timeout=120)


def copy_checkout(target: Path) -> None:
    """The files of this checkout that git knows or would add (committed or not)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("scripts/install.sh runs as root: run the tests as root")
    base = tmp_path_factory.mktemp("inst")
    base.chmod(0o755)
    done = Install(base)
    copy_checkout(done.source)
    done.etc.mkdir()
    (done.etc / "pub.toml").write_text((ROOT / "examples" / "demo.toml").read_text())
    done.before = snapshot(base / "etc-dmzctl"), sorted(p.name for p in base.iterdir())
    try:
        first = done.script("--systemd")
        assert first.returncode == 0, first.stdout + first.stderr
        done.first = first
        done.source.rename(done.moved)  # the clone is gone: everything below runs without it
        yield done
    finally:
        source = done.moved if done.moved.exists() else done.source
        if (done.prefix / ".dmzctl-install").exists() and source.exists():
            done.script("--uninstall", source=source)
        shutil.rmtree(done.prefix, ignore_errors=True)


def test_the_installed_dmzctl_runs_without_the_clone(installed):
    assert (installed.bin / "dmzctl").resolve() == (installed.prefix / "bin" / "dmzctl").resolve()
    helped = installed.dmzctl("--help")
    assert helped.returncode == 0 and "destroy" in helped.stdout, helped.stderr
    config = installed.etc / "pub.toml"
    checked = installed.dmzctl("validate", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rendered = installed.dmzctl("render", str(config))
    assert rendered.returncode == 0 and "<network" in rendered.stdout and "<domain" in rendered.stdout, rendered.stderr
    where = subprocess.run([str(installed.prefix / "bin" / "python"), "-c",
                            "import dmzctl, dmzctl.render.base as b, libvirt, nftables; "
                            "print(dmzctl.__file__); print(b.xml_dir()); print(b.shipped_dir('systemd'))"],
                           env=installed.env(), cwd=installed.base, capture_output=True, text=True, check=True)
    for line in where.stdout.split():
        assert line.startswith(f"{installed.prefix}/"), where.stdout
    assert str(installed.source) not in rendered.stdout + where.stdout


def test_hooks_and_units_run_the_installed_copy(installed):
    python = installed.prefix / "bin"
    for kind in ("qemu", "network"):
        hook = (installed.hooks / f"{kind}.d" / "dmzctl").read_text()
        assert hook.startswith(f"#!{python}/python"), hook.splitlines()[0]
        assert str(installed.source) not in hook and str(ROOT) not in hook
    for unit in ("dmzctl.service", "dmzctl-guard.service"):
        text = (installed.units / unit).read_text()
        commands = [line for line in text.splitlines() if line.startswith(("ExecStart=", "ExecStop="))]
        assert commands and all(f"={python}/dmzctl " in line for line in commands
                                if "kill" not in line), commands
        assert str(installed.source) not in text and str(ROOT) not in text and "@DMZCTL@" not in text


def test_the_installed_network_hook_imports_dmzctl_from_the_prefix(installed):
    """Run as libvirt runs it: `start begin` of a network with dmzctl metadata whose config is gone.
    The hook imports dmzctl (from the prefix: the clone is away) and lets the network start, saying why
    there was no table."""
    hook = installed.hooks / "network.d" / "dmzctl"
    xml = ('<network><name>inst-net</name><metadata><dmzctl:network xmlns:dmzctl="http://dmzctl.org/xmlns/'
           f'dmzctl/1.0" dmz="inst-x" config="{installed.base}/gone.toml"/></metadata></network>')
    env = installed.env(DMZCTL_RUN_DIR=str(installed.base / "run"), DMZCTL_EVENT_LOG=str(installed.base / "events.log"))
    result = subprocess.run([str(hook), "inst-net", "start", "begin", "-"], input=xml, env=env, cwd="/",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "network inst-net started without its firewall table from the hook" in result.stderr, result.stderr
    assert "gone.toml: no such file" in result.stderr and "Traceback" not in result.stderr


def complete(installed: Install, *words: str) -> list[str]:
    """What bash's completion offers after `words` (the last one is being typed), from the installed
    completion script calling the installed dmzctl through PATH."""
    line = " ".join(words)
    script = (f"source {installed.completions / 'dmzctl'}\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE={line!r}; COMP_POINT={len(line)}\n"
              "_dmzctl_completion dmzctl\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=installed.env(), cwd=installed.base,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completes_subcommands_and_options(installed):
    everything = complete(installed, "dmzctl", "")
    assert {"destroy", "status", "up", "down", "install"} <= set(everything), everything
    assert complete(installed, "dmzctl", "des") == ["destroy"]
    assert "--connect" in complete(installed, "dmzctl", "status", "--con")


def test_a_second_run_changes_nothing(installed):
    hooks = snapshot(installed.hooks), snapshot(installed.units), snapshot(installed.completions)
    again = installed.script("--systemd", source=installed.moved)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already links" in again.stdout and "completions/dmzctl already installed" in again.stdout
    assert "hooks: installed" not in again.stdout and "systemd: installed" not in again.stdout, again.stdout
    assert (snapshot(installed.hooks), snapshot(installed.units), snapshot(installed.completions)) == hooks
    assert installed.dmzctl("--help").returncode == 0


def test_clear_errors_before_anything_changes(installed, tmp_path):
    foreign = tmp_path / "not-ours"
    foreign.mkdir()
    (foreign / "data").write_text("keep")
    refused = subprocess.run([str(installed.moved / SCRIPT), "--prefix", str(foreign)], env=installed.env(),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr
    assert "is not a dmzctl install" in refused.stderr and (foreign / "data").read_text() == "keep"
    assert sorted(p.name for p in foreign.iterdir()) == ["data"]
    other = tmp_path / "other-prefix"
    taken = subprocess.run([str(installed.moved / SCRIPT), "--prefix", str(other)], env=installed.env(),
                           capture_output=True, text=True, timeout=120)
    assert taken.returncode != 0 and "another install: uninstall that one first" in taken.stderr, taken.stderr
    assert not other.exists()
    unknown = subprocess.run([str(installed.moved / SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert unknown.returncode != 0 and unknown.stderr.strip() == "install.sh: unknown argument '--frobnicate' (see --help)"


def test_uninstall_removes_exactly_what_install_added(installed):
    etc_before, names_before = installed.before
    host_etc = snapshot(Path("/etc/dmzctl")) if Path("/etc/dmzctl").is_dir() else None
    removed = installed.script("--uninstall", source=installed.moved)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not installed.prefix.exists()
    for directory in (installed.bin, installed.completions, installed.hooks, installed.units):
        assert [p for p in directory.rglob("*") if not p.is_dir()] == [], directory
    assert snapshot(installed.etc) == etc_before  # the config is left alone
    assert host_etc == (snapshot(Path("/etc/dmzctl")) if Path("/etc/dmzctl").is_dir() else None)
    assert "kept the configs" in removed.stdout
    again = installed.script("--uninstall", source=installed.moved)
    assert again.returncode == 0 and "no dmzctl install recorded" in again.stdout, again.stdout + again.stderr
