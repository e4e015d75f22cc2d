"""Listening sockets: Nagle off on every accepted connection (no 40 ms delayed-ACK stall),
port 0 resolved, SO_REUSEPORT spreading one port over several listeners."""

from __future__ import annotations

import socket

from cloud_sync.listen import listen


def test_accepted_connections_have_nagle_off() -> None:
    srv = listen("127.0.0.1", 0)
    try:
        port = srv.getsockname()[1]
        assert port > 0
        srv.setblocking(True)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = srv.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        srv.close()


def test_reuse_port_lets_two_listeners_share_a_port() -> None:
    a = listen("127.0.0.1", 0, reuse_port=True)
    try:
        b = listen("127.0.0.1", a.getsockname()[1], reuse_port=True)
        b.close()
    finally:
        a.close()
    taken = listen("127.0.0.1", 0)
    try:
        try:
            listen("127.0.0.1", taken.getsockname()[1]).close()
        except OSError:
            pass
        else:
            raise AssertionError("a port in use must be refused without reuse_port")
    finally:
        taken.close()
