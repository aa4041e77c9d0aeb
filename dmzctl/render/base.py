"""Where the static XML lives, dmzctl's metadata namespace, and small lxml helpers."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from lxml import etree

# dmzctl marks what it owns with this namespace in <metadata> (as Nova does).
NS = "http://dmzctl.org/xmlns/dmzctl/1.0"
NS_PREFIX = "dmzctl"
OWNED_PREFIX = "dmzctl-"  # nwfilters and nft tables carry no metadata: the name marks them
UUID_NAMESPACE = uuid.UUID("6f1c9a64-5d0b-4f53-9a0e-2f1c1d0e7a11")


def shipped_dir(name: str) -> Path:
    """A directory of data shipped with dmzctl (xml, systemd): inside an installed package
    (dmzctl/_data/, see setup.py), else in the source tree, else /usr/share/dmzctl."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_data" / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    return Path("/usr/share/dmzctl") / name


def xml_dir() -> Path:
    """The shipped base documents: $DMZCTL_XML_DIR, or where shipped_dir finds them."""
    override = os.environ.get("DMZCTL_XML_DIR")
    if override:
        return Path(override)
    return shipped_dir("xml")


def load_base(path: Path) -> etree._Element:
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    return etree.parse(str(path), parser).getroot()


def stable_uuid(*parts: str) -> str:
    return str(uuid.uuid5(UUID_NAMESPACE, "/".join(parts)))


def sub(parent: etree._Element, tag: str, text: str | None = None, **attrib: str) -> etree._Element:
    element = etree.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrib.items()})
    if text is not None:
        element.text = text
    return element


def replace_child(parent: etree._Element, tag: str, before: tuple[str, ...] = ()) -> etree._Element:
    """Drop any existing <tag> under parent and insert a fresh one, placed before the first of `before`."""
    for old in parent.findall(tag):
        parent.remove(old)
    return place_before(parent, etree.Element(tag), before)


def place_before(parent: etree._Element, element: etree._Element, before: tuple[str, ...] = ()) -> etree._Element:
    """Insert element under parent before the first child named in `before` that exists, else last."""
    for name in before:
        anchor = parent.find(name)
        if anchor is not None:
            anchor.addprevious(element)
            return element
    parent.append(element)
    return element


def metadata_element(parent: etree._Element, kind: str, **values: str) -> etree._Element:
    metadata = parent.find("metadata")
    if metadata is None:
        metadata = etree.SubElement(parent, "metadata")
    for old in metadata.findall(f"{{{NS}}}{kind}"):
        metadata.remove(old)
    owned = etree.SubElement(metadata, f"{{{NS}}}{kind}", nsmap={NS_PREFIX: NS})
    for key, value in values.items():
        owned.set(key, value)
    return owned


def to_string(element: etree._Element) -> str:
    return etree.tostring(element, pretty_print=True, encoding="unicode")
