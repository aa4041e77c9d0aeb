"""Bounded floods of new flows and small TCP clients, run inside a test namespace.

    ip netns exec NS python tests/flood.py flood --kind udp|tcp|icmp --dst ADDR [--dst ADDR]
        [--src ADDR]... [--ports A-B] --count N --seconds S
    ip netns exec NS python tests/flood.py connect --dst ADDR --port P --every S --seconds S
    ip netns exec NS python tests/flood.py hold --dst ADDR --port P --wait S --token T

Every command prints one JSON object. A flood stops at N packets or S seconds, whichever
comes first, and refuses destinations outside the test subnets of tests/test_conntrack_flood.py
(the machine's own link is never a destination).

  udp   one datagram per (destination, port): each a new conntrack entry (30 s unreplied);
        with --new-socket each from a new socket (a new source port), for floods of one port
  tcp   a non-blocking connect per port, the socket closed at once: one SYN, one entry
  icmp  echo requests with a new identifier each: one entry per identifier (30 s)

--src sends from forged source addresses (IP_TRANSPARENT lets a socket use an address the
namespace does not own), one after the other.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import socket
import struct
import sys
import time

ALLOWED = [ipaddress.ip_network(n) for n in ("10.244.0.0/16", "198.18.44.0/23", "fdd0:244::/32", "2001:db8:45::/64",
                                              "2001:db8:44::/64")]
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _checked(address: str) -> str:
    addr = ipaddress.ip_address(address)
    if not any(addr.version == net.version and addr in net for net in ALLOWED):
        sys.exit(f"flood.py: {address} is not a test address; refusing")
    return address


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _udp_socket(dst: str, src: str | None) -> socket.socket:
    family = _family(dst)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if src:
        level, option = (socket.IPPROTO_IP, IP_TRANSPARENT) if family == socket.AF_INET else \
            (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
        sock.setsockopt(level, option, 1)
        sock.bind((src, 0))
    sock.setblocking(False)
    return sock


def flood(kind: str, dsts: list[str], srcs: list[str], ports: tuple[int, int], count: int, seconds: float,
          new_socket: bool = False) -> dict:
    dsts = [_checked(d) for d in dsts]
    sent = errors = 0
    began = time.monotonic()
    deadline = began + seconds
    span = ports[1] - ports[0] + 1
    sockets = {}
    if kind == "udp":
        for dst in dsts:
            for src in srcs or [None]:
                sockets[(dst, src)] = _udp_socket(dst, src)
    elif kind == "icmp":
        for dst in dsts:
            family = _family(dst)
            sockets[dst] = socket.socket(family, socket.SOCK_RAW,
                                         socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6)
            sockets[dst].setblocking(False)
    payload = b"ctk-flood"
    for i in range(count):
        if i % 64 == 0 and time.monotonic() > deadline:
            break
        dst = dsts[i % len(dsts)]
        port = ports[0] + (i // len(dsts)) % span
        try:
            if kind == "udp" and new_socket:
                with _udp_socket(dst, srcs[(i // len(dsts)) % len(srcs)] if srcs else None) as sock:
                    sock.sendto(payload, (dst, port))
            elif kind == "udp":
                src = srcs[(i // len(dsts)) % len(srcs)] if srcs else None
                sockets[(dst, src)].sendto(payload, (dst, port))
            elif kind == "tcp":
                sock = socket.socket(_family(dst), socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.connect((dst, port))
                except BlockingIOError:
                    pass
                finally:
                    sock.close()
            else:  # icmp: echo request, identifier i (16 bits), sequence 1
                ident = i & 0xFFFF
                v4 = _family(dst) == socket.AF_INET
                header = struct.pack("!BBHHH", 8 if v4 else 128, 0, 0, ident, 1)
                checksum = _checksum(header + payload) if v4 else 0  # the kernel sums ICMPv6
                sockets[dst].sendto(struct.pack("!BBHHH", 8 if v4 else 128, 0, checksum, ident, 1) + payload,
                                    (dst, 0))
            sent += 1
        except OSError as error:
            errors += 1
            if error.errno == errno.ENOBUFS:
                time.sleep(0.001)
    for sock in sockets.values():
        sock.close()
    ended = time.monotonic()
    # CLOCK_MONOTONIC is the machine's, the same in every namespace: the caller lines up processes by it.
    return {"sent": sent, "errors": errors, "seconds": round(ended - began, 3), "began": began, "ended": ended}


def connect(dst: str, port: int, every: float, seconds: float, timeout: float = 1.0) -> dict:
    """New TCP connections, one every `every` s for `seconds`: which were accepted, and when each began."""
    _checked(dst)
    results, times = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.monotonic()
        times.append(began)
        sock = socket.socket(_family(dst), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((dst, port))
            results.append("connected")
        except ConnectionRefusedError:
            results.append("refused")
        except OSError:
            results.append("timeout")
        finally:
            sock.close()
        time.sleep(max(0.0, every - (time.monotonic() - began)))
    return {"results": results, "at": times}


def hold(dst: str, port: int, wait: float, token: str) -> dict:
    """Connect now, send a token after `wait` s on the open connection, read the answer."""
    _checked(dst)
    sock = socket.socket(_family(dst), socket.SOCK_STREAM)
    sock.settimeout(3)
    try:
        sock.connect((dst, port))
    except OSError as error:
        return {"connected": False, "reply": None, "detail": str(error)}
    time.sleep(wait)
    sent_at = time.monotonic()
    try:
        sock.sendall(token.encode() + b"\n")
        reply = sock.recv(64).decode(errors="replace")
    except OSError as error:
        return {"connected": True, "reply": None, "detail": str(error)}
    finally:
        sock.close()
    return {"connected": True, "reply": reply, "detail": "", "at": sent_at}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="flood.py")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flood")
    f.add_argument("--kind", choices=("udp", "tcp", "icmp"), required=True)
    f.add_argument("--dst", action="append", required=True)
    f.add_argument("--src", action="append", default=[])
    f.add_argument("--ports", default="20000-59999")
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--seconds", type=float, required=True)
    f.add_argument("--new-socket", action="store_true")
    c = sub.add_parser("connect")
    c.add_argument("--dst", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--every", type=float, default=0.25)
    c.add_argument("--seconds", type=float, required=True)
    h = sub.add_parser("hold")
    h.add_argument("--dst", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--wait", type=float, required=True)
    h.add_argument("--token", required=True)
    args = parser.parse_args(argv)
    if args.command == "flood":
        if args.count > 100_000 or args.seconds > 30:
            sys.exit("flood.py: at most 100000 packets and 30 s")
        low, high = (int(p) for p in args.ports.split("-"))
        result = flood(args.kind, args.dst, args.src, (low, high), args.count, args.seconds, args.new_socket)
    elif args.command == "connect":
        result = connect(args.dst, args.port, args.every, args.seconds)
    else:
        result = hold(args.dst, args.port, args.wait, args.token)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
