"""deployments.remote.connection: scanning, the pinned host key, login, and errors that name the cause."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import replace

import pytest

from deployments.remote import HostKey, RemoteError, Target, scan_host_key
from deployments.remote.connection import Connection
from deployments.remote.stream import read_output
from tests.support.keys import keygen, ssh_keygen_fingerprint
from tests.support.net import closing_server, refusing_address

from .server import IS_ROOT

pytestmark = pytest.mark.timeout(120)

SOME_KEY = HostKey.parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAlM0yNmeVN1XCm8+N+f2E4mbSmTHcSWdHnGEB1qhlA")


def test_scan_host_key_matches_ssh_keygen(node):
    key = scan_host_key(node.host, node.port, timeout=5)
    assert key == node.host_key
    assert key.key_type == "ssh-ed25519"
    assert key.openssh == " ".join(node.host_key_pub.read_text().split()[:2])
    assert key.fingerprint == ssh_keygen_fingerprint(node.host_key_pub)


def test_scan_errors_name_the_cause():
    with pytest.raises(RemoteError) as e:
        scan_host_key("nonexistent.invalid", 22, timeout=5)
    assert e.value.kind == "unknown-host"
    with refusing_address() as (host, port), pytest.raises(RemoteError) as e:
        scan_host_key(host, port, timeout=5)
    assert e.value.kind == "unreachable"


@pytest.mark.parametrize("key", ["ed25519", "rsa", "ecdsa", "ed25519-enc"])
def test_pinned_key_login_with_each_key_type(node, key):
    t0 = time.monotonic()
    with Connection(node.target(key)) as conn:
        connect_s = time.monotonic() - t0
        assert read_output(conn, "echo hello; id -un") == f"hello\n{node.user}"
    assert connect_s < 5


def test_the_socket_sends_each_packet_at_once_and_notices_a_dead_peer(node):
    """TCP_NODELAY: without it a small SSH packet waited for the node's delayed ACK (40 ms) and every
    command took ~45 ms longer (bench/node_bench.py); keepalives and TCP_USER_TIMEOUT notice a dead link."""
    with Connection(node.target()) as conn:
        sock = conn.transport.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) > 0
        assert read_output(conn, "echo ok") == "ok"


# The server has only an ed25519 key: another ed25519 key, or a key of a type
# it does not offer at all, must not be accepted.
@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_another_pinned_key_is_a_mismatch_naming_both_fingerprints(node, tmp_path, kind):
    _, other_pub = keygen(tmp_path / "other", kind)
    pinned = HostKey.parse(other_pub)
    with pytest.raises(RemoteError) as e:
        Connection(node.target(host_key=pinned)).open()
    assert e.value.kind == "host-key-mismatch"
    assert pinned.fingerprint in e.value.message
    assert node.host_key.fingerprint in e.value.message
    assert f"{node.host}:{node.port}" in e.value.message


def test_missing_pinned_key(node):
    with pytest.raises(RemoteError) as e:
        Connection(node.target(host_key=None)).open()
    assert e.value.kind == "host-key-missing"


def test_refused_login_is_auth(node):
    t = Target(node.host, node.port, node.user, node.host_key, private_key=node.unauthorized_key)
    with pytest.raises(RemoteError) as e:
        Connection(t).open()
    assert e.value.kind == "auth"
    assert node.user in e.value.message


def test_unknown_host_and_closed_port():
    with pytest.raises(RemoteError) as e:
        Connection(Target("nonexistent.invalid", 22, "root", SOME_KEY, password="x")).open()
    assert e.value.kind == "unknown-host"
    assert "nonexistent.invalid" in e.value.message
    with refusing_address() as (host, port), pytest.raises(RemoteError) as e:
        Connection(Target(host, port, "root", SOME_KEY, password="x", connect_timeout=3)).open()
    assert e.value.kind == "unreachable"
    assert str(port) in e.value.message


@pytest.mark.skipif(not IS_ROOT, reason="password login needs a throwaway user (root only)")
def test_password_login_and_secret_hygiene(node):
    t = Target(node.host, node.port, node.password_user, node.host_key, password=node.password)
    with Connection(t) as conn:
        assert read_output(conn, "id -un") == node.password_user

    bad = replace(t, password="wrong-" + node.password)
    with pytest.raises(RemoteError) as e:
        Connection(bad).open()
    assert e.value.kind == "auth"
    assert bad.password not in e.value.message and bad.password not in repr(e.value)


def test_secrets_absent_from_repr_and_errors(node):
    t = node.target("ed25519-enc", password="s3cret-pw", sudo=True, sudo_password="sudo-s3cret")
    for text in (repr(t), str(t), repr(Connection(t))):
        assert "s3cret" not in text
        assert node.passphrase not in text
        assert "PRIVATE KEY" not in text and t.private_key.splitlines()[1][:20] not in text
    wrong = replace(t, passphrase="wrong-passphrase-xyz", host_key=node.host_key)
    with pytest.raises(RemoteError) as e:
        Connection(wrong).open()
    assert e.value.kind == "auth"
    assert "wrong-passphrase-xyz" not in e.value.message and "s3cret" not in e.value.message
    assert "passphrase" in e.value.message


@contextlib.contextmanager
def answering_server(reply: bytes | None, *, read_first: bool = True, hang_up: bool = True):
    """(host, port) of a TCP server that is not sshd: per connection it reads what the client
    sends first (``read_first``), sends ``reply`` and hangs up (or, ``hang_up=False``, falls
    silent); with ``reply=None`` it says nothing at all."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            if reply is None:
                held.append(conn)  # silent: neither answer nor hang up
                continue
            if not hang_up:
                conn.sendall(reply)
                held.append(conn)
                continue
            with conn:
                conn.settimeout(2)
                if read_first:
                    with contextlib.suppress(OSError):
                        conn.recv(4096)
                with contextlib.suppress(OSError):
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[:2]
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        srv.close()


def connect_and_scan(host: str, port: int, timeout: float = 3) -> list[RemoteError]:
    """The errors of a host key scan and of a login attempt on (host, port)."""
    errors = []
    for attempt in (
        lambda: scan_host_key(host, port, timeout=timeout),
        lambda: Connection(Target(host, port, "root", SOME_KEY, password="x", connect_timeout=timeout)).open(),
    ):
        with pytest.raises(RemoteError) as e:
            attempt()
        errors.append(e.value)
    return errors


def test_a_web_server_on_the_port_is_named_by_what_it_sent(caplog):
    caplog.set_level(logging.DEBUG)
    with answering_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n") as (h, p):
        errors = connect_and_scan(h, p)
    for e in errors:
        assert e.kind == "not-ssh"
        assert e.message == f"{h}:{p} did not speak SSH: it sent 'HTTP/1.1 400 Bad Request…'"
    # paramiko's own report of the same failure (with its traceback) is debug output only.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_garbage_on_the_port_is_shown_escaped_and_short():
    with answering_server(bytes(range(256)) * 4, read_first=False) as (h, p):
        errors = connect_and_scan(h, p)
    for e in errors:
        assert e.kind == "not-ssh"
        assert e.message.startswith(f"{h}:{p} did not speak SSH: it sent '\\x00\\x01\\x02")
        assert e.message.endswith("…'") and len(e.message) < 120
        assert all(c.isprintable() for c in e.message)


def test_a_port_that_hangs_up_at_once_or_says_nothing_is_not_ssh():
    with closing_server() as (h, p):
        errors = connect_and_scan(h, p)
    for e in errors:
        assert e.kind == "not-ssh" and "closed the connection without a word" in e.message
    with answering_server(None) as (h, p):
        errors = connect_and_scan(h, p, timeout=1)
    for e in errors:
        assert (
            e.kind == "not-ssh"
            and e.message == f"{h}:{p} accepted the connection but sent no SSH identification within 1 s"
        )


def test_a_server_that_starts_ssh_and_falls_silent_is_a_protocol_error_not_a_traceback():
    with answering_server(b"SSH-2.0-OpenSSH_9.2\r\n", read_first=False, hang_up=False) as (h, p):
        errors = connect_and_scan(h, p, timeout=1)
    assert [e.kind for e in errors] == ["protocol", "protocol"]
    for e in errors:
        assert e.message == f"SSH handshake with {h}:{p} did not finish within 1 s"
