"""Listening TCP sockets for the edge's dashboard and the hub, made the same way.

We bind ourselves (a busy port is an ``OSError`` the caller handles, port 0 works, the bound
port is known before the first request) and switch Nagle's algorithm off: a socket from
``socket.create_server`` has protocol 0, so asyncio does not set TCP_NODELAY on the
connections it accepts, and a response written in two parts (headers, body) then waits for
the client's delayed acknowledgement, about 40 ms on Linux. Accepted sockets inherit it.
"""

from __future__ import annotations

import socket

__all__ = ("listen",)


def listen(host: str, port: int, *, backlog: int = 128, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (port 0: a free one).

    ``reuse_port``: several processes may each listen on the same port, and the kernel
    spreads new connections over them (SO_REUSEPORT).
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr[:2])
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
