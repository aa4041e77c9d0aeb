"""The settings of one dmzctl run, built once (in the Typer callback, or by a hook from its
environment) and passed down: nothing reads the environment at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional

VIRT_TYPES = ("kvm", "qemu")


@dataclass(frozen=True)
class Settings:
    uri: str = "qemu:///system"
    virt_type: Optional[str] = None  # kvm | qemu for every VM of "auto"; None: ask the host
    run_dir: Path = Path("/run/dmzctl")  # locks and markers
    event_log: Path = Path("/var/log/dmzctl.log")
    hooks_dir: Path = Path("/etc/libvirt/hooks")
    state_dir: Path = Path("/var/lib/dmzctl")  # what outlives a boot: verify's last results (verify/<dmz>.json)
    debug: bool = False

    @classmethod
    def from_environment(cls, env: Optional[Mapping[str, str]] = None, **options) -> "Settings":
        """Options given (not None) win over the environment, which wins over the defaults."""
        env = os.environ if env is None else env
        settings = cls(
            uri=env.get("LIBVIRT_DEFAULT_URI") or cls.uri,
            virt_type=env.get("DMZCTL_VIRT_TYPE") or None,
            run_dir=Path(env.get("DMZCTL_RUN_DIR") or cls.run_dir),
            event_log=Path(env.get("DMZCTL_EVENT_LOG") or cls.event_log),
            hooks_dir=Path(env.get("DMZCTL_HOOKS_DIR") or cls.hooks_dir),
            state_dir=Path(env.get("DMZCTL_STATE_DIR") or cls.state_dir),
        )
        settings = replace(settings, **{key: value for key, value in options.items() if value is not None})
        settings.check()
        return settings

    def check(self) -> None:
        from .errors import HostError

        if self.virt_type not in (None, *VIRT_TYPES):
            raise HostError(f"the virtualisation type must be kvm or qemu (DMZCTL_VIRT_TYPE or --virt-type); "
                            f"got {self.virt_type!r}")
