"""The cloud-init NoCloud seed of a VM: meta-data, user-data, network-config (v2), and the ISO 9660
image (volume label `cidata`, Joliet and Rock Ridge) that carries them. Pure and deterministic:
the same config gives the same bytes, so a seed is compared by its digest.

user-data is the user's #cloud-config (vm.cloud_init.user_data) merged with what the config says:
mappings are merged key by key, lists are concatenated (the file's items first), and for any other
value the config's wins. network-config matches the NIC by its MAC: static ip/ip6 with the DMZ's
gateways and DNS when the VM has them, DHCP otherwise.

The ISO is made with pycdlib (pure Python, from PyPI): no external program, no temporary files,
and the bytes can be built in memory and uploaded through libvirt's storage API.
"""

from __future__ import annotations

import copy
import hashlib
import io
import threading
import time
import types
from contextlib import contextmanager
from typing import Any, Iterator

import yaml

from ..config import DMZ, VM

SEED_FILES = ("meta-data", "user-data", "network-config")
ISO_NAMES = {"meta-data": "/METADATA.;1", "user-data": "/USERDATA.;1", "network-config": "/NETWORKC.;1"}
VOLUME_LABEL = "cidata"
FIXED_TIME = 946684800.0  # 2000-01-01T00:00:00Z: every date in the ISO, so that its bytes never vary
_PYCDLIB_CLOCK = threading.Lock()


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def merge(base: Any, ours: Any) -> Any:
    """ours merged into base: mappings key by key, lists concatenated (base's first), else ours."""
    if isinstance(base, dict) and isinstance(ours, dict):
        merged = copy.deepcopy(base)
        for key, value in ours.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(ours, list):
        return copy.deepcopy(base) + copy.deepcopy(ours)
    return copy.deepcopy(ours)


def user_data(vm: VM) -> str:
    cloud = vm.cloud_init
    ours: dict[str, Any] = {"hostname": cloud.hostname}
    if cloud.ssh_authorized_keys:
        ours["ssh_authorized_keys"] = list(cloud.ssh_authorized_keys)
    theirs = yaml.safe_load(cloud.user_data_text) if cloud.user_data_text else None
    return "#cloud-config\n" + _dump(merge(theirs or {}, ours))


def _nameservers(dmz: DMZ) -> list[str]:
    """The DMZ's own DNS server (a hole) if it has one, else libvirt's dnsmasq on the gateways."""
    if dmz.dns is not None:
        return [str(dmz.dns)]
    if not dmz.dhcp:
        return []
    return [str(dmz.gateway.ip)] + ([str(dmz.gateway6.ip)] if dmz.gateway6 is not None else [])


def network_config(dmz: DMZ, vm: VM) -> str:
    """netplan-style version 2, as cloud-init's NoCloud reads it."""
    nic: dict[str, Any] = {"match": {"macaddress": vm.mac}, "set-name": "eth0"}
    addresses, routes = [], []
    if vm.ip is not None:
        addresses.append(f"{vm.ip}/{dmz.gateway.network.prefixlen}")
        routes.append({"to": "0.0.0.0/0", "via": str(dmz.gateway.ip)})
    else:
        nic["dhcp4"] = True
    if vm.ip6 is not None:
        addresses.append(f"{vm.ip6}/{dmz.gateway6.network.prefixlen}")
        routes.append({"to": "::/0", "via": str(dmz.gateway6.ip)})
    if addresses:
        nic["addresses"] = addresses
        nic["routes"] = routes
    servers = _nameservers(dmz)
    if servers and vm.ip is not None:
        nic["nameservers"] = {"addresses": servers}
    return _dump({"version": 2, "ethernets": {"eth0": nic}})


def seed_digest(dmz: DMZ, vm: VM) -> str:
    """What the seed says, as a digest: it names the cloud-init instance, so a change is a new instance."""
    text = "\0".join((vm.cloud_init.hostname, user_data(vm), network_config(dmz, vm)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def meta_data(dmz: DMZ, vm: VM) -> str:
    return _dump({"instance-id": f"{vm.name}-{seed_digest(dmz, vm)}", "local-hostname": vm.cloud_init.hostname})


def seed_files(dmz: DMZ, vm: VM) -> dict[str, str]:
    return {"meta-data": meta_data(dmz, vm), "user-data": user_data(vm), "network-config": network_config(dmz, vm)}


@contextmanager
def _fixed_clock() -> Iterator[None]:
    """pycdlib stamps every date with time.time() in local time; it gets a clock that stands still."""
    import pycdlib.dates
    import pycdlib.headervd
    import pycdlib.pycdlib

    clock = types.SimpleNamespace(time=lambda: FIXED_TIME, localtime=time.gmtime, gmtime=time.gmtime,
                                  timezone=0, altzone=0, daylight=0, strftime=time.strftime, mktime=time.mktime)
    modules = (pycdlib.pycdlib, pycdlib.headervd, pycdlib.dates)
    with _PYCDLIB_CLOCK:
        saved = [module.time for module in modules]
        try:
            for module in modules:
                module.time = clock
            yield
        finally:
            for module, original in zip(modules, saved):
                module.time = original


def seed_iso(files: dict[str, str]) -> bytes:
    """ISO 9660 with Joliet and Rock Ridge, label `cidata`: what NoCloud looks for."""
    import pycdlib  # only when a seed is made

    with _fixed_clock():
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, vol_ident=VOLUME_LABEL, sys_ident="LINUX", joliet=3, rock_ridge="1.09")
        for name in SEED_FILES:
            data = files[name].encode()
            iso.add_fp(io.BytesIO(data), len(data), ISO_NAMES[name], rr_name=name, joliet_path=f"/{name}",
                       file_mode=0o100444)
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
    return out.getvalue()
