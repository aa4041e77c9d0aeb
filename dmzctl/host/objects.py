"""What dmzctl reads from libvirt's objects, as plain values: their state, whose they are (the
dmzctl metadata namespace), the digest of what rendered them, and libvirt's errors in one line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lxml import etree

from ..errors import OwnershipError
from ..render.base import NS

try:
    import libvirt
except ImportError:  # reported when a connection is needed, not at import
    libvirt = None


def describe(error: "libvirt.libvirtError") -> str:
    code = error.get_error_code()
    message = error.get_error_message() or str(error)
    # One line: libvirt passes on what a helper (tc, QEMU) printed, newlines and all.
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR) and "socket" in message:
        return f"libvirtd is not reachable ({message}); start it (libvirtd -d) or check --connect"
    if code == libvirt.VIR_ERR_AUTH_FAILED or code == libvirt.VIR_ERR_AUTH_UNAVAILABLE:
        return f"libvirt refused access ({message}); run as root or check polkit"
    return message


STATE_NAMES = {}


def state_name(state: int) -> str:
    if not STATE_NAMES and libvirt is not None:
        STATE_NAMES.update({
            libvirt.VIR_DOMAIN_NOSTATE: "no state", libvirt.VIR_DOMAIN_RUNNING: "running",
            libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
            libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
            libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
        })
    return STATE_NAMES.get(state, f"state {state}")


def owner_of(xml: str) -> Optional[str]:
    """The DMZ named in a document's dmzctl metadata, or None when dmzctl does not own it."""
    root = etree.fromstring(xml.encode())
    owned = root.find(f"metadata/{{{NS}}}*")
    return owned.get("dmz") if owned is not None else None


def digest_of(xml: str) -> Optional[str]:
    root = etree.fromstring(xml.encode())
    owned = root.find(f"metadata/{{{NS}}}*")
    return owned.get("digest") if owned is not None else None


@dataclass(frozen=True)
class NetworkInfo:
    name: str
    owner: Optional[str]  # the DMZ its dmzctl metadata names; None when not dmzctl's
    active: bool
    autostart: bool
    digest: Optional[str]  # of the persistent definition (what the next start runs)
    live_digest: Optional[str]  # of what runs now; None when inactive
    definition: str  # the persistent XML
    bridge: Optional[str] = None
    live: Optional[str] = None  # the running XML; None when inactive


@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: str
    running: bool
    owner: Optional[str]
    digest: Optional[str]  # of the definition (what the next start runs)
    live_digest: Optional[str]  # of what runs now; None when not running
    autostart: bool
    started_at: Optional[float]
    definition: str = ""  # the persistent XML (the live one for a transient domain)


def check_owned(kind: str, name: str, owner: Optional[str], dmz_name: str) -> None:
    if owner is None:
        raise OwnershipError(f"{kind} {name!r} already exists and is not dmzctl's; dmzctl will not touch "
                             f"it: rename the DMZ or VM in the config, or remove that {kind} yourself")
    if owner != dmz_name:
        raise OwnershipError(f"{kind} {name!r} belongs to dmzctl DMZ {owner!r}, not {dmz_name!r}; "
                             f"pick another name")
