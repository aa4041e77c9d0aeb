"""Reading and validating DMZ configuration files (TOML, one DMZ per file).

Everything is checked before anything is rendered; every problem found is
reported, one line each, naming the file, the field and what to do.
The result is a tree of frozen dataclasses that the renderers consume.

  model    the dataclasses (DMZ, VM, Hole, Disk, ...) and the defaults derived from names
  checker  the problem collector with its typed getters, and the value parsers
  dmz      the [dmz] table, then its VMs and holes: parse_dmz
  vm       the [[vm]] tables; disks, limits, holes and provision (image, volumes, cloud-init) in their own
           modules
  load     files: load_dmz, load_all (what must be unique across DMZs)
"""

from ..errors import ConfigError
from .checker import parse_memory, parse_rate
from .disks import DISK_FORMATS, DISK_KEYS, IMAGE_KEYS
from .dmz import BRIDGE_RE, DMZ_KEYS, DMZ_NAME_RE, EGRESS, MODES, RATE_RE, parse_dmz
from .edges import EGRESS_ALLOW_KEYS, INBOUND, PUBLISH_KEYS, describe_ports
from .holes import ALLOW_KEYS, PROTOCOLS
from .limits import (
    FLOW_RATE_RE, LIMIT_KEYS, MAX_CAP, MAX_DISK_LIMIT, MIN_CPU_SHARE, MIN_NET_RATE, QEMU_OVERHEAD_MIB,
)
from .load import DEFAULT_CONFIG_DIR, default_config_paths, load_all, load_dmz
from .model import (
    DEFAULT_POOL, DMZ, IFNAMSIZ, MAX_FLOWS, MAX_NEW_FLOWS, VM, CloudInit, Disk, EgressAllow, FlowCaps, Hole, Image,
    IPAddress, IPInterface, IPNetwork, Limits, Publish, Volume, data_volume_name, default_bridge, default_format,
    default_mac, root_volume_name, seed_volume_name, volume_names,
)
from .provision import CLOUD_INIT_KEYS, PROVISION_KEYS, VOLUME_KEYS, parse_size
from .vm import BOOT, GRAPHICS, GRAPHICS_LISTEN, MAC_RE, MIN_MEMORY_MIB, VIRT_TYPES, VM_KEYS, VM_NAME_RE

__all__ = [
    "ALLOW_KEYS", "BOOT", "BRIDGE_RE", "ConfigError", "DEFAULT_CONFIG_DIR", "DISK_FORMATS", "DISK_KEYS", "DMZ",
    "DMZ_KEYS", "DMZ_NAME_RE", "EGRESS", "EGRESS_ALLOW_KEYS", "EgressAllow", "INBOUND", "PUBLISH_KEYS", "Publish",
    "describe_ports", "FLOW_RATE_RE", "GRAPHICS", "GRAPHICS_LISTEN", "IFNAMSIZ", "IMAGE_KEYS",
    "IPAddress", "IPInterface", "IPNetwork", "LIMIT_KEYS", "MAC_RE", "MAX_CAP", "MAX_DISK_LIMIT", "MAX_FLOWS",
    "MAX_NEW_FLOWS", "MIN_CPU_SHARE", "MIN_MEMORY_MIB", "MIN_NET_RATE", "MODES", "PROTOCOLS",
    "QEMU_OVERHEAD_MIB", "RATE_RE", "VIRT_TYPES", "VM", "VM_KEYS", "VM_NAME_RE", "Disk", "FlowCaps", "Hole",
    "Image", "Limits", "default_bridge", "default_config_paths", "default_format", "default_mac", "load_all",
    "load_dmz", "parse_dmz", "parse_memory", "parse_rate",
    "CLOUD_INIT_KEYS", "CloudInit", "DEFAULT_POOL", "PROVISION_KEYS", "VOLUME_KEYS", "Volume", "data_volume_name",
    "parse_size", "root_volume_name", "seed_volume_name", "volume_names",
]
