"""Cloud-image VMs without the host: the config's new fields and their problems, the storage XML,
the seed's texts (golden), the merge of user_data, and the seed ISO read back with pycdlib."""

from __future__ import annotations

import copy
import hashlib
import io
import tomllib
from pathlib import Path

import pycdlib
import pytest
from lxml import etree

from dmzctl.config import load_dmz, parse_dmz
from dmzctl.desired import build
from dmzctl.errors import ConfigError
from dmzctl.render.base import to_string
from dmzctl.render.domain import HostFacts
from dmzctl.render.seed import merge, network_config, seed_digest, seed_files, seed_iso
from dmzctl.render.storage import (
    render_data_volume, render_pool, render_root_volume, render_seed_volume, volumes_of,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "provision"
SCHEMAS = Path("/usr/share/libvirt/schemas")
SERVER = ROOT / "examples" / "server.toml"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlaceholderPlaceholderPlaceholderPlace admin@example"


def server_data() -> dict:
    return tomllib.loads(SERVER.read_text())


def server(data: dict | None = None):
    return parse_dmz(data or server_data(), Path("/etc/dmzctl/server.toml"), "0" * 64)


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        server(data)
    return caught.value.problems


def with_vm(**changes) -> dict:
    data = server_data()
    vm = data["vm"][0]
    for key, value in changes.items():
        if value is None:
            vm.pop(key, None)
        else:
            vm[key] = value
    return data


# --- the config --------------------------------------------------------------------------

def test_the_example_server_config():
    vm = server().vm("web")
    assert (str(vm.image.path), vm.image.format, vm.disk_size, vm.pool) == (
        "/var/lib/dmzctl/images/debian-12-genericcloud-amd64.qcow2", "qcow2", 20 << 30, "dmzctl")
    assert vm.cloud_init.hostname == "web" and vm.cloud_init.ssh_authorized_keys == (KEY,)
    assert vm.boot == "hd" and vm.disks == ()
    assert volumes_of(vm) == [("dmzctl", "web-root.qcow2"), ("dmzctl", "web-cidata.iso")]
    assert len([line for line in SERVER.read_text().splitlines() if line.strip() and not line.startswith("#")]) <= 16


def test_image_format_from_the_name_or_the_config_never_the_content():
    assert server(with_vm(image="/img/base.raw")).vm("web").image.format == "raw"
    assert server(with_vm(image="/img/base", image_format="qcow2")).vm("web").image.format == "qcow2"


def test_volumes_and_disks_side_by_side():
    vm = server(with_vm(disks=["/var/lib/dmzctl/extra.qcow2"], volume=[{"name": "data", "size": "10GiB"}],
                        pool="fast")).vm("web")
    assert volumes_of(vm) == [("fast", "web-root.qcow2"), ("fast", "web-data.qcow2"), ("fast", "web-cidata.iso")]
    domain = build(server(with_vm(disks=["/var/lib/dmzctl/extra.qcow2"], volume=[{"name": "data", "size": "1GiB"}])),
                   HostFacts(pool_paths=(("dmzctl", "/srv/pool"),))).domains["web"]
    sources = [(d.get("device"), d.find("source").get("file"), d.find("target").get("dev"))
               for d in domain.iterfind("devices/disk")]
    assert sources == [("disk", "/srv/pool/web-root.qcow2", "vda"), ("disk", "/var/lib/dmzctl/extra.qcow2", "vdb"),
                       ("disk", "/srv/pool/web-data.qcow2", "vdc"), ("cdrom", "/srv/pool/web-cidata.iso", "hdc")]


@pytest.mark.parametrize("changes, field, text", [
    ({"disk_size": None}, "vm[web].disk_size", "required with vm.image"),
    ({"disk_size": "20 parsecs"}, "vm[web].disk_size", "must be a size such as '20GiB'"),
    ({"disk_size": 20}, "vm[web].disk_size", "must be a size"),
    ({"image": "relative.qcow2"}, "vm[web].image", "must be an absolute path"),
    ({"image_format": "vmdk"}, "vm[web].image_format", "must be one of raw, qcow2"),
    ({"pool": "no/slash"}, "vm[web].pool", "must be 1-64 characters"),
    ({"volume": [{"name": "root", "size": "1GiB"}]}, "vm[web].volume[1].name", "not root or cidata"),
    ({"volume": [{"name": "data"}]}, "vm[web].volume[1].size", "required but missing"),
    ({"volume": [{"name": "d", "size": "1GiB"}, {"name": "d", "size": "2GiB"}]}, "vm[web].volume[2].name",
     "already a volume of this VM"),
    ({"volume": [{"name": "d", "size": "1GiB", "format": "raw"}]}, "vm[web].volume[1].format", "unknown key"),
    ({"cloud_init": {"hostname": "Not_A_Host"}}, "vm[web].cloud_init.hostname", "must be a host name"),
    ({"cloud_init": {"ssh_authorized_keys": ["hello world"]}}, "vm[web].cloud_init.ssh_authorized_keys",
     "key 1: not an OpenSSH public key"),
    ({"cloud_init": {"ssh_authorized_keys": "/nonexistent/keys"}}, "vm[web].cloud_init.ssh_authorized_keys",
     "cannot read /nonexistent/keys"),
    ({"cloud_init": {"ssh_authorized_keys": 3}}, "vm[web].cloud_init.ssh_authorized_keys", "list of public keys"),
    ({"cloud_init": {"user_data": "/nonexistent/ud"}}, "vm[web].cloud_init.user_data", "cannot read"),
    ({"cloud_init": {"hostnme": "x"}}, "vm[web].cloud_init.hostnme", "did you mean 'hostname'"),
])
def test_bad_input_is_one_line_naming_the_field(changes, field, text):
    found = problems(with_vm(**changes))
    assert len(found) == 1, found
    assert found[0].startswith(f"/etc/dmzctl/server.toml: {field}: ") and text in found[0], found


def test_disk_size_and_image_format_need_an_image():
    found = problems(with_vm(image=None, image_format="qcow2", kernel="/boot/vmlinuz"))
    assert sorted(p.split(": ")[1] for p in found) == ["vm[web].disk_size", "vm[web].image_format"], found


def test_two_vms_cannot_share_a_volume_name():
    data = server_data()
    data["vm"][0]["volume"] = [{"name": "b-root", "size": "1GiB"}]
    data["vm"][0]["name"] = "a"
    data["vm"].append({"name": "a-b", "image": "/img/x.qcow2", "disk_size": "2GiB"})
    found = problems(data)
    assert len(found) == 1 and "volume a-b-root.qcow2 in pool dmzctl is also VM a's" in found[0], found


def test_keys_from_a_file_and_user_data_files(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# admins\n{KEY}\n\nssh-rsa AAAAB3Nza second@example\n")
    user_data = tmp_path / "ud.yaml"
    user_data.write_text("#cloud-config\npackages: [nginx]\nssh_authorized_keys: [ssh-ed25519 AAAAold old@x]\n")
    vm = server(with_vm(cloud_init={"ssh_authorized_keys": str(keys), "user_data": str(user_data),
                                    "hostname": "www.example.org"})).vm("web")
    assert vm.cloud_init.ssh_authorized_keys == (KEY, "ssh-rsa AAAAB3Nza second@example")
    assert vm.cloud_init.hostname == "www.example.org"
    for text, message in (("packages: [a]\n", "must start with '#cloud-config'"),
                          ("#cloud-config\npackages: [a\n", "is not valid YAML at line"),
                          ("#cloud-config\n- a\n", "must hold a mapping")):
        user_data.write_text(text)
        found = problems(with_vm(cloud_init={"user_data": str(user_data)}))
        assert len(found) == 1 and "vm[web].cloud_init.user_data" in found[0] and message in found[0], found
    keys.write_text("# nobody\n")
    assert "holds no key" in problems(with_vm(cloud_init={"ssh_authorized_keys": str(keys)}))[0]


def test_the_example_loads_as_a_file():
    assert load_dmz(SERVER).vm("web").cloud_init is not None


# --- rendering ---------------------------------------------------------------------------

def provision_files(dmz) -> dict[str, str]:
    vm = dmz.vm("web")
    files = {f"seed-{name}": text for name, text in seed_files(dmz, vm).items()}
    files["pool.xml"] = to_string(render_pool("dmzctl"))
    files["volume-root.xml"] = to_string(render_root_volume(vm))
    files["volume-seed.xml"] = to_string(render_seed_volume(vm, 69632))
    return files


def test_golden(regenerate):
    data = with_vm(volume=[{"name": "data", "size": "10GiB"}])
    files = provision_files(server(data))
    files["volume-data.xml"] = to_string(render_data_volume(server(data).vm("web"), server(data).vm("web").volumes[0]))
    if regenerate:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (GOLDEN / name).write_text(text)
    expected = {p.name: p.read_text() for p in GOLDEN.iterdir()} if GOLDEN.is_dir() else {}
    assert sorted(files) == sorted(expected), "set of rendered documents changed (run pytest --regenerate)"
    for name, text in files.items():
        assert text == expected[name], f"provision/{name} differs from golden (run pytest --regenerate)"


def test_root_volume_states_the_backing_format_and_the_domain_the_whole_chain():
    dmz = server(with_vm(image="/img/base.img", image_format="raw"))
    volume = render_root_volume(dmz.vm("web"))
    assert (volume.findtext("backingStore/path"), volume.find("backingStore/format").get("type")) == ("/img/base.img",
                                                                                                     "raw")
    disk = build(dmz).domains["web"].find("devices/disk")
    assert etree.tostring(disk.find("backingStore")).decode() == (
        '<backingStore type="file"><format type="raw"/><source file="/img/base.img">'
        '<seclabel model="dac" relabel="no"/></source><backingStore/></backingStore>')


def test_documents_pass_libvirts_schemas():
    dmz = server(with_vm(volume=[{"name": "data", "size": "10GiB"}]))
    vm = dmz.vm("web")
    checks = [("domain.rng", build(dmz).domains["web"]), ("storagepool.rng", render_pool("dmzctl")),
              ("storagevol.rng", render_root_volume(vm)), ("storagevol.rng", render_data_volume(vm, vm.volumes[0])),
              ("storagevol.rng", render_seed_volume(vm, 4096))]
    for schema, element in checks:
        relaxng = etree.RelaxNG(etree.parse(str(SCHEMAS / schema)))
        assert relaxng.validate(element), f"{schema}: {relaxng.error_log}"


def test_seed_digest_is_in_the_domain_metadata_and_follows_the_inputs():
    dmz = server()
    owned = build(dmz).domains["web"].find("metadata/*")
    assert owned.get("seed") == seed_digest(dmz, dmz.vm("web"))
    other = server(with_vm(cloud_init={"hostname": "www"}))
    assert seed_digest(other, other.vm("web")) != owned.get("seed")
    assert f"instance-id: web-{owned.get('seed')}" in seed_files(dmz, dmz.vm("web"))["meta-data"]


def test_network_config_static_or_dhcp():
    dmz = server()
    static = network_config(dmz, dmz.vm("web"))
    assert "- 10.215.0.10/24" in static and "via: 10.215.0.1" in static and "via: fdd0:215::1" in static
    assert "macaddress: " + dmz.vm("web").mac in static and "dhcp4" not in static
    dhcp = server(with_vm(ip=None, ip6=None))
    text = network_config(dhcp, dhcp.vm("web"))
    assert "dhcp4: true" in text and "addresses" not in text
    data = with_vm()
    data["dmz"]["dns"] = "10.216.0.53"
    with_dns = server(data)
    assert "- 10.216.0.53" in network_config(with_dns, with_dns.vm("web"))


def test_user_data_merge():
    base = {"users": ["default"], "ssh_authorized_keys": ["old"], "write_files": {"a": 1}, "hostname": "theirs"}
    ours = {"ssh_authorized_keys": ["new"], "write_files": {"b": 2}, "hostname": "ours"}
    assert merge(base, ours) == {"users": ["default"], "ssh_authorized_keys": ["old", "new"],
                                 "write_files": {"a": 1, "b": 2}, "hostname": "ours"}
    assert base["ssh_authorized_keys"] == ["old"]  # nothing changed in place


def test_seed_iso_reads_back_as_nocloud_expects_and_is_deterministic():
    dmz = server()
    files = seed_files(dmz, dmz.vm("web"))
    data = seed_iso(files)
    assert data == seed_iso(copy.deepcopy(files))
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(build(dmz).seeds["web"]).hexdigest()
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_joliet() and iso.has_rock_ridge()
        for name, text in files.items():
            for kind in ("rr_path", "joliet_path"):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{kind: f"/{name}"})
                assert out.getvalue().decode() == text
    finally:
        iso.close()


# --- what up decides (pure: from an observed state made up here) ---------------------------

def observed_with(pool: bool, volumes: dict, seed: bytes | None):
    from dmzctl.host.storage import PoolInfo
    from dmzctl.state import Observed, TableState, seed_hash

    pools = {"dmzctl": PoolInfo("dmzctl", "/var/lib/dmzctl/pool", True, True) if pool else None}
    seeds = {"web": seed_hash(seed) if seed is not None else None}
    return Observed(None, {}, TableState(None, None), {}, pools=pools, volumes=volumes, seeds=seeds)


def live_volume(name: str, backing: str | None = None, capacity: int = 20 << 30):
    from dmzctl.host.storage import VolumeInfo

    return VolumeInfo("dmzctl", name, f"/var/lib/dmzctl/pool/{name}", f"/var/lib/dmzctl/pool/{name}", capacity,
                      "qcow2", backing, "qcow2" if backing else None)


def test_up_decides_pool_volumes_and_seed_and_never_a_root_volume_anew():
    from dmzctl.ops.decide import decide_storage

    dmz = server()
    desired = build(dmz)
    image = str(dmz.vm("web").image.path)
    first = decide_storage(desired, observed_with(False, {}, None), "web")
    assert first.pool_action == "create" and "<path>/var/lib/dmzctl/pool</path>" in first.pool_xml
    assert [(v.kind, v.action) for v in first.volumes] == [("root", "create"), ("seed", "create")]
    assert first.volumes[1].data == desired.seeds["web"]
    root = live_volume("web-root.qcow2", image)
    seed = live_volume("web-cidata.iso")
    live = {("dmzctl", "web-root.qcow2"): root, ("dmzctl", "web-cidata.iso"): seed}
    same = decide_storage(desired, observed_with(True, live, desired.seeds["web"]), "web")
    assert (same.pool_action, same.volumes, same.notes) == (None, (), ())
    changed = decide_storage(desired, observed_with(True, live, b"an older seed"), "web")
    assert [(v.kind, v.action) for v in changed.volumes] == [("seed", "update")]
    live[("dmzctl", "web-root.qcow2")] = live_volume("web-root.qcow2", "/img/older.qcow2")
    other = decide_storage(desired, observed_with(True, live, desired.seeds["web"]), "web")
    assert other.volumes == () and "never makes a root volume anew" in other.notes[0], other.notes
