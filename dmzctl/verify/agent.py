"""The probe agent: what runs inside a network namespace, standard library only.

`python -m dmzctl.verify.agent` reads {"probes": [spec, ...]} on stdin, sends
every probe at once and writes {"results": [...]} on stdout, in the same order.
A spec names the protocol, the destination (and port, ICMP type, source), a
timeout and optionally a token to send. A result says what came back:
  connected | refused | reply | unreachable  (an answer: the firewall let it pass)
  timeout                                     (nothing within the timeout)
  error                                       (the probe could not be sent)

It runs in a fresh interpreter in the namespace: it imports nothing of dmzctl
(and dmzctl.verify's package imports nothing heavy), and reads no environment.
The tests send their probes with the same agent.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import random
import select
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

ICMP4_ERRORS = {3: "destination unreachable", 11: "time exceeded", 12: "parameter problem"}
ICMP6_ERRORS = {1: "destination unreachable", 2: "packet too big", 3: "time exceeded", 4: "parameter problem"}


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _sockaddr(address: str, port: int = 0):
    return (address, port, 0, 0) if ":" in address else (address, port)


def dns_query(qid: int) -> bytes:
    """A CHAOS TXT query for version.bind: a DNS server answers it itself, it is never forwarded."""
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"\x07version\x04bind\x00" + struct.pack("!HH", 16, 3)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def sctp_init(sport: int, dport: int, extra: bytes = b"") -> bytes:
    """An SCTP packet holding one INIT chunk (and, for the tests, a token after it)."""
    init = struct.pack("!BBHIIHHI", 1, 0, 20, random.randrange(1, 2**32), 65535, 1, 1, random.randrange(2**32))
    if extra:
        extra += b"\0" * (-len(extra) % 4)
        extra = struct.pack("!BBH", 0xFE, 0, 4 + len(extra)) + extra
    packet = struct.pack("!HHII", sport, dport, 0, 0) + init + extra
    crc = _crc32c(packet)
    return packet[:8] + struct.pack("<I", crc) + packet[12:]


def _result(spec: dict, observed: str, detail: str, began: float) -> dict:
    return {"id": spec["id"], "observed": observed, "detail": detail,
            "elapsed": round(time.monotonic() - began, 3)}


def _os_error(spec: dict, error: OSError, began: float) -> dict:
    if error.errno == errno.ECONNREFUSED:
        return _result(spec, "refused", "connection refused (RST or ICMP port unreachable)", began)
    if error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPROTO, errno.ECONNRESET):
        return _result(spec, "unreachable", os.strerror(error.errno), began)
    if error.errno in (errno.EACCES, errno.EPERM):
        return _result(spec, "error", f"sending refused locally: {os.strerror(error.errno)}", began)
    return _result(spec, "error", str(error), began)


def _connect(sock, spec: dict, began: float) -> Optional[dict]:
    """Connect a stream socket (TCP, SCTP) from the spec's source: None once connected, else the result."""
    sock.settimeout(spec["timeout"])
    if spec.get("src"):
        sock.bind(_sockaddr(spec["src"]))
    try:
        sock.connect(_sockaddr(spec["dst"], spec["port"]))
    except socket.timeout:
        return _result(spec, "timeout", "no answer", began)
    except OSError as error:
        return _os_error(spec, error, began)
    return None


def probe_tcp(spec: dict) -> dict:
    began = time.monotonic()
    with socket.socket(_family(spec["dst"]), socket.SOCK_STREAM) as sock:
        failed = _connect(sock, spec, began)
        if failed is not None:
            return failed
        detail = "connected"
        if spec.get("token"):
            try:
                sock.sendall(spec["token"].encode() + b"\n")
                sock.settimeout(min(spec["timeout"], 1.0))
                answer = sock.recv(256)
                detail = f"connected, answered {answer[:40]!r}"
            except OSError:
                pass
        return _result(spec, "connected", detail, began)


def probe_udp(spec: dict) -> dict:
    began = time.monotonic()
    with socket.socket(_family(spec["dst"]), socket.SOCK_DGRAM) as sock:
        if spec.get("src"):
            sock.bind(_sockaddr(spec["src"]))
        payload = dns_query(random.randrange(65536)) if spec.get("payload") == "dns" else \
            (spec.get("token") or "dmzctl verify probe").encode()
        try:
            sock.connect(_sockaddr(spec["dst"], spec["port"]))
            sock.send(payload)
        except OSError as error:
            return _os_error(spec, error, began)
        remaining = began + spec["timeout"] - time.monotonic()
        if remaining <= 0:
            return _result(spec, "timeout", "no answer", began)
        sock.settimeout(remaining)
        try:
            answer = sock.recv(2048)
        except socket.timeout:
            return _result(spec, "timeout", "no answer", began)
        except OSError as error:
            return _os_error(spec, error, began)
        return _result(spec, "reply", f"{len(answer)} bytes back", began)


def _icmp_socket(dst: str, proto: Optional[int] = None):
    if ":" in dst:
        return socket.socket(socket.AF_INET6, socket.SOCK_RAW, proto or socket.IPPROTO_ICMPV6)
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, proto or socket.IPPROTO_ICMP)


def _icmp_message(data: bytes, v6: bool) -> tuple[str, bytes]:
    """(source, ICMP message) from what a raw ICMP socket received."""
    if v6:
        return "", data  # IPv6 raw sockets deliver no IP header; the source comes from recvfrom
    header_length = (data[0] & 0x0F) * 4
    return socket.inet_ntoa(data[12:16]), data[header_length:]


def _embedded(message: bytes, v6: bool) -> Optional[tuple[str, int, bytes]]:
    """(destination, protocol, payload) of the packet an ICMP error quotes."""
    inner = message[8:]
    if v6:
        if len(inner) < 40:
            return None
        return socket.inet_ntop(socket.AF_INET6, inner[24:40]), inner[6], inner[40:]
    if len(inner) < 20:
        return None
    length = (inner[0] & 0x0F) * 4
    return socket.inet_ntoa(inner[16:20]), inner[9], inner[length:]


def _packets(sockets: list, deadline: float):
    """(socket, data, peer) for each packet that arrives on `sockets` before the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        ready, _, _ = select.select(sockets, [], [], remaining)
        if not ready:
            return
        for handle in ready:
            data, peer = handle.recvfrom(4096)
            yield handle, data, peer


def _send(spec: dict, began: float, sock, payload: bytes, *others) -> Optional[dict]:
    """Bind the sockets to the spec's source and send payload to its destination: None when sent,
    else the result."""
    if spec.get("src"):
        for handle in (sock, *others):
            handle.bind(_sockaddr(spec["src"]))
    try:
        sock.sendto(payload, _sockaddr(spec["dst"]))
    except OSError as error:
        return _os_error(spec, error, began)
    return None


def _icmp_error(data: bytes, peer, v6: bool, dst: str, proto: int) -> Optional[tuple[str, bytes]]:
    """(what and from whom, the quoted payload) when data is an ICMP error quoting a `proto` packet to dst."""
    source, message = _icmp_message(data, v6)
    errors = ICMP6_ERRORS if v6 else ICMP4_ERRORS
    if len(message) < 8 or message[0] not in errors:
        return None
    quoted = _embedded(message, v6)
    if not quoted or quoted[1] != proto or ipaddress.ip_address(quoted[0]) != ipaddress.ip_address(dst):
        return None
    return f"{errors[message[0]]} (code {message[1]}) from {source or peer[0]}", quoted[2]


def _echo_message(kind: int, ident: int, v6: bool, token: str) -> bytes:
    body = struct.pack("!HH", ident, 1)
    if kind == 13 and not v6:
        now = int(time.time() % 86400 * 1000)
        body += struct.pack("!III", now, 0, 0)
    body += token.encode()
    message = struct.pack("!BBH", kind, 0, 0) + body
    if not v6:
        message = struct.pack("!BBH", kind, 0, _checksum(message)) + body
    return message


def probe_icmp(spec: dict) -> dict:
    """An ICMP/ICMPv6 message with an identifier; waits for the matching reply or an error quoting it."""
    began = time.monotonic()
    dst = spec["dst"]
    v6 = ":" in dst
    kind = spec.get("icmp_type") if spec.get("icmp_type") is not None else (128 if v6 else 8)
    ident = spec["ident"] & 0xFFFF
    tag = struct.pack("!H", ident)
    errors = ICMP6_ERRORS if v6 else ICMP4_ERRORS
    with _icmp_socket(dst) as sock:
        failed = _send(spec, began, sock, _echo_message(kind, ident, v6, spec.get("token") or "dmzctl verify"))
        if failed is not None:
            return failed
        for _handle, data, peer in _packets([sock], began + spec["timeout"]):
            error = _icmp_error(data, peer, v6, dst, 58 if v6 else 1)
            if error is not None and error[1][4:6] == tag:
                return _result(spec, "unreachable", error[0], began)
            source, reply = _icmp_message(data, v6)
            if len(reply) < 8 or reply[0] in errors or ipaddress.ip_address(source or peer[0]) != \
                    ipaddress.ip_address(dst):
                continue
            if reply[0] == kind:
                continue  # our own request, looped back on the loopback or seen by the raw socket
            if reply[4:6] == tag:
                return _result(spec, "reply", f"ICMP type {reply[0]} back", began)
        return _result(spec, "timeout", "no answer", began)


def _raw_payload(proto: int, port: Optional[int], token: bytes) -> bytes:
    if proto == 132:
        return sctp_init(random.randrange(1024, 65536), port or 9, token)
    if proto == 47:
        return struct.pack("!HH", 0, 0x88B5) + token  # GRE, local experimental ethertype
    return token or b"dmzctl verify"


def probe_raw(spec: dict) -> dict:
    """Another IP protocol (GRE, SCTP without the kernel's SCTP, ...): any packet back or an ICMP error."""
    began = time.monotonic()
    dst = spec["dst"]
    v6 = ":" in dst
    proto = spec["ipproto"]
    token = (spec.get("token") or "").encode()
    payload = _raw_payload(proto, spec.get("port"), token)
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, proto) as sock, \
            _icmp_socket(dst) as icmp:
        failed = _send(spec, began, sock, payload, icmp)
        if failed is not None:
            return failed
        for handle, data, peer in _packets([sock, icmp], began + spec["timeout"]):
            if handle is sock:
                source = peer[0] if v6 else socket.inet_ntoa(data[12:16])
                if ipaddress.ip_address(source) == ipaddress.ip_address(dst):
                    return _result(spec, "reply", f"protocol {proto} packet back", began)
                continue
            error = _icmp_error(data, peer, v6, dst, proto)
            if error is not None and (not token or token in error[1] or len(error[1]) < len(payload)):
                return _result(spec, "unreachable", error[0], began)
        return _result(spec, "timeout", "no answer", began)


def probe_sctp(spec: dict) -> dict:
    """The kernel's SCTP when it has it (a real association attempt), else a crafted INIT."""
    began = time.monotonic()
    if not spec.get("token"):
        try:
            sock = socket.socket(_family(spec["dst"]), socket.SOCK_STREAM, 132)
        except OSError:
            sock = None
        if sock is not None:
            with sock:
                failed = _connect(sock, spec, began)
                return failed or _result(spec, "connected", "SCTP association established", began)
    return probe_raw(dict(spec, ipproto=132))


def _skip_name(data: bytes, offset: int) -> int:
    while data[offset]:
        if data[offset] & 0xC0 == 0xC0:
            return offset + 2
        offset += data[offset] + 1
    return offset + 1


def resolve(spec: dict) -> dict:
    """A DNS query for spec["name"] (A, or AAAA with qtype 28) to spec["dst"]: the addresses answered."""
    began = time.monotonic()
    qid = random.randrange(65536)
    question = b"".join(bytes([len(label)]) + label.encode() for label in spec["name"].split(".")) + b"\0"
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", spec["qtype"], 1)
    with socket.socket(_family(spec["dst"]), socket.SOCK_DGRAM) as sock:
        sock.settimeout(spec["timeout"])
        sock.sendto(query, _sockaddr(spec["dst"], 53))
        try:
            data = sock.recv(4096)
        except OSError:
            return dict(_result(spec, "timeout", "no answer", began), addresses=[])
    count, offset, found = struct.unpack("!H", data[6:8])[0], _skip_name(data, 12) + 4, []
    for _ in range(count):
        offset = _skip_name(data, offset)
        rtype, _cls, _ttl, length = struct.unpack("!HHIH", data[offset:offset + 10])
        rdata = data[offset + 10:offset + 10 + length]
        if rtype in (1, 28):
            found.append(socket.inet_ntop(socket.AF_INET if rtype == 1 else socket.AF_INET6, rdata))
        offset += 10 + length
    return dict(_result(spec, "reply", f"{len(found)} address(es)", began), addresses=found)


PROBES = {"resolve": resolve, "tcp": probe_tcp, "udp": probe_udp, "icmp": probe_icmp, "icmpv6": probe_icmp,
          "sctp": probe_sctp, "raw": probe_raw}


def run_probe(spec: dict) -> dict:
    try:
        if spec.get("delay"):
            time.sleep(spec["delay"])
        return PROBES[spec["proto"]](spec)
    except Exception as error:  # one broken probe must not hide the others' results
        return {"id": spec["id"], "observed": "error", "detail": f"{type(error).__name__}: {error}", "elapsed": 0}


def run_probes(specs: Sequence[dict], workers: int = 64) -> list[dict]:
    """All probes at once (each waits at most its timeout), results in the same order."""
    base = random.randrange(65536)
    specs = [dict(spec, ident=(base + index) & 0xFFFF) for index, spec in enumerate(specs)]
    if not specs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(specs))) as pool:
        return list(pool.map(run_probe, specs))


def main() -> None:
    """{"probes": [...]} on stdin, {"results": [...]} on stdout."""
    request = json.load(sys.stdin)
    json.dump({"results": run_probes(request["probes"])}, sys.stdout)
    sys.stdout.write("\n")




if __name__ == "__main__":
    main()
