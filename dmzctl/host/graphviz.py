"""Graphviz's `dot`, run on DOT text the pure core wrote (dmzctl/report/dot.py): the one place a
diagram becomes SVG or PNG. A PNG records the digest of the DOT it was drawn from in a tEXt chunk,
so that a committed picture can be checked against the DOT without comparing pixels."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import zlib
from typing import Optional

from ..errors import HostError

FORMATS = ("svg", "png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIGEST_KEY = b"dmzctl-dot-sha256"


def draw(dot_text: str, fmt: str, timeout: float = 60) -> bytes:
    """The picture, as `dot -T<fmt>` draws it; HostError in one line when Graphviz is missing or fails."""
    if fmt not in FORMATS:
        raise HostError(f"diagram format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    binary = shutil.which("dot")
    if binary is None:
        raise HostError("Graphviz's dot is not installed (Debian package graphviz; scripts/setup.sh installs it)")
    try:
        result = subprocess.run([binary, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HostError(f"dot -T{fmt} took more than {timeout:g} s") from None
    if result.returncode != 0 or not result.stdout:
        first = (result.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[0]
        raise HostError(f"dot -T{fmt} failed: {first}")
    if fmt == "png":
        return stamp_png(result.stdout, dot_digest(dot_text))
    return result.stdout


def dot_digest(dot_text: str) -> str:
    return hashlib.sha256(dot_text.encode()).hexdigest()


def stamp_png(png: bytes, digest: str) -> bytes:
    """The PNG with a tEXt chunk `dmzctl-dot-sha256` = digest, right before IEND."""
    if not png.startswith(PNG_SIGNATURE) or png[-12:-8] != b"\x00\x00\x00\x00" or png[-8:-4] != b"IEND":
        raise HostError("dot wrote something that is not a PNG")
    data = DIGEST_KEY + b"\x00" + digest.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:-12] + chunk + png[-12:]


def png_digest(png: bytes) -> Optional[str]:
    """The DOT digest a PNG was stamped with, if any."""
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[position:position + 8])
        body = png[position + 8:position + 8 + length]
        if kind == b"tEXt" and body.startswith(DIGEST_KEY + b"\x00"):
            return body[len(DIGEST_KEY) + 1:].decode()
        position += 12 + length
    return None


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk."""
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])
