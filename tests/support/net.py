"""Addresses for network tests: a free port, one that refuses, a server that hangs up at once."""

from __future__ import annotations

import contextlib
import socket
import threading


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refusing_address(host: str = "127.0.0.1"):
    """Yield (host, port) where connecting is refused at once: for 'unreachable node' tests.

    The port stays bound (never listening) until the block ends, so nothing
    else on the machine can start listening there meanwhile.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield host, s.getsockname()[1]


@contextlib.contextmanager
def closing_server(host: str = "127.0.0.1"):
    """Yield (host, port) of a TCP server that accepts and closes at once (no SSH banner)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, name="closing-server", daemon=True)
    thread.start()
    try:
        yield host, srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        srv.close()
