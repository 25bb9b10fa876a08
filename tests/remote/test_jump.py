"""deployments.remote.jump: nodes reached through a bastion (ProxyJump), one pooled session per bastion.

The suite's test sshd is both the bastion and the node behind it (it forwards to its own address): what is
checked here is the hop, the pinned key of each hop, the errors that name the hop, and the pool. The
testbed tests (tests/integration/test_jump_hosts.py) put the node where only the bastion can reach it.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from deployments.remote import HostKey, RemoteError, Target, scan_host_key
from deployments.remote import jump as jump_module
from deployments.remote.connection import MAX_JUMP_HOPS, Connection
from deployments.remote.jump import BastionPool
from deployments.remote.stream import read_output
from tests.support.keys import keygen
from tests.support.net import closing_server, refusing_address
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(120)

SOME_KEY = HostKey.parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAlM0yNmeVN1XCm8+N+f2E4mbSmTHcSWdHnGEB1qhlA")
# A node behind the bastion, for the error cases that never get past the bastion.
BEHIND = Target("192.0.2.1", 22, "root", SOME_KEY, password="pw", name="app-1")


@pytest.fixture
def pool(monkeypatch):
    """A pool of this test's own (the module's POOL is the process's)."""
    fresh = BastionPool(idle_seconds=30)
    monkeypatch.setattr(jump_module, "POOL", fresh)
    yield fresh
    fresh.close_idle()


def bastion_of(node, **kw):
    return node.target(name="web-gw", **kw)


def test_a_node_behind_a_bastion_runs_commands(node, pool):
    target = node.target(name="app-1", via=bastion_of(node))
    with Connection(target) as conn:
        assert read_output(conn, "echo through; id -un") == f"through\n{node.user}"
    assert pool.opened == 1


def test_connections_through_one_bastion_share_its_session(node, pool):
    target = node.target(name="app-1", via=bastion_of(node))
    for _ in range(5):
        with Connection(target) as conn:
            assert read_output(conn, "echo ok") == "ok"
    assert pool.opened == 1
    assert len(pool) == 1  # kept for the next one, until idle


def test_threads_at_once_log_in_to_the_bastion_once(node, pool):
    target = node.target(name="app-1", via=bastion_of(node))
    results, errors = [], []
    start = threading.Barrier(8)

    def one():
        try:
            start.wait()
            with Connection(target) as conn:
                results.append(read_output(conn, "echo ok"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == ["ok"] * 8
    assert pool.opened == 1


def test_an_idle_bastion_session_is_closed(node, pool):
    pool.idle_seconds = 0.2
    target = node.target(name="app-1", via=bastion_of(node))
    with Connection(target) as conn:
        read_output(conn, "true")
        hop = conn._hop
        assert hop.refs == 1
    assert hop.conn is not None  # not at once: the next node of a rollout takes it
    wait_for(lambda: len(pool) == 0 and hop.conn is None, timeout=10, what="the idle bastion session to close")
    with Connection(target) as conn:
        read_output(conn, "true")
    assert pool.opened == 2


def test_another_bastion_credential_is_another_session(node, pool):
    for key in ("ed25519", "rsa"):
        with Connection(node.target(via=node.target(key, name="web-gw"))) as conn:
            read_output(conn, "true")
    assert pool.opened == 2


def test_a_wrong_pinned_key_on_the_bastion_names_the_bastion(node, pool, tmp_path):
    _, other = keygen(tmp_path / "other", "ed25519")
    target = node.target(name="app-1", via=bastion_of(node, host_key=HostKey.parse(other)))
    with pytest.raises(RemoteError) as e:
        Connection(target).open()
    assert e.value.kind == "host-key-mismatch"
    assert e.value.message.startswith(f"bastion web-gw: host key mismatch for {node.host}:{node.port}")
    assert len(pool) == 0  # a failed bastion is not kept


def test_a_wrong_pinned_key_on_the_node_behind_names_the_node_and_its_bastion(node, pool, tmp_path):
    _, other = keygen(tmp_path / "other", "ed25519")
    target = node.target(name="app-1", host_key=HostKey.parse(other), via=bastion_of(node))
    with pytest.raises(RemoteError) as e:
        Connection(target).open()
    assert e.value.kind == "host-key-mismatch"
    assert e.value.message.startswith(
        f"host key mismatch for {node.host}:{node.port} (through bastion web-gw): expected ssh-ed25519"
    )
    assert node.host_key.fingerprint in e.value.message
    # The bastion was fine: its session stays for the next connection, and nothing is held.
    assert len(pool) == 1 and all(h.refs == 0 for h in pool._hops.values())


def test_a_bastion_that_is_down_is_named(pool):
    with refusing_address() as (host, port):
        bastion = replace(BEHIND, host=host, port=port, name="web-gw")  # nothing listens there
        with pytest.raises(RemoteError) as e:
            Connection(replace(BEHIND, via=bastion)).open()
    assert e.value.kind == "unreachable"
    assert e.value.message.startswith(f"bastion web-gw: connection to {host}:{port} refused")


def test_a_node_the_bastion_cannot_reach_is_unreachable_through_it(node, pool):
    with refusing_address() as (host, port):
        target = replace(node.target(name="app-1", via=bastion_of(node)), host=host, port=port)
        with pytest.raises(RemoteError) as e:
            Connection(target).open()
    assert e.value.kind == "unreachable"
    assert e.value.message.startswith(f"{host}:{port} unreachable through bastion web-gw: ")
    assert "the bastion could not connect to it" in e.value.message
    assert len(pool) == 1  # the bastion answered: its session stays


def test_a_port_behind_the_bastion_that_does_not_speak_ssh_is_said(node, pool):
    with closing_server() as (host, port):
        target = replace(node.target(name="app-1", via=bastion_of(node)), host=host, port=port)
        with pytest.raises(RemoteError) as e:
            Connection(target).open()
    assert e.value.kind == "not-ssh"
    assert f"{host}:{port} (through bastion web-gw)" in e.value.message


def test_a_chain_of_two_bastions(node, pool):
    inner = node.target("rsa", name="inner-gw", via=bastion_of(node))
    target = node.target(name="app-1", via=inner)
    with Connection(target) as conn:
        assert read_output(conn, "echo two hops") == "two hops"
    assert pool.opened == 2
    assert [h.label for h in target.hops()] == ["web-gw", "inner-gw"]


def test_a_chain_longer_than_the_limit_is_refused(node):
    target = node.target(name="n0")
    for i in range(MAX_JUMP_HOPS + 1):
        target = node.target(name=f"n{i + 1}", via=target)
    with pytest.raises(ValueError, match=f"more than {MAX_JUMP_HOPS} bastions"):
        target.hops()


def test_scan_through_a_bastion(node, pool):
    assert scan_host_key(node.host, node.port, timeout=5, via=bastion_of(node)) == node.host_key
    assert pool.opened == 1


def test_a_dead_session_in_the_pool_is_replaced(node, pool):
    target = node.target(name="app-1", via=bastion_of(node))
    with Connection(target) as conn:
        read_output(conn, "true")
        hop = conn._hop
    hop.conn.transport.close()  # as a link that died while it sat idle
    with Connection(target) as conn:
        assert read_output(conn, "echo again") == "again"
        assert conn._hop is not hop
    assert pool.opened == 2


def test_the_bastion_is_shown_in_the_target_repr_without_secrets(node):
    target = node.target(name="app-1", via=bastion_of(node, password="s3cret-pw"))
    text = repr(target)
    assert "via=Target(" in text and "s3cret-pw" not in text and "PRIVATE" not in text


def test_a_close_waits_for_a_send_in_progress_so_no_data_follows_the_channels_close():
    """paramiko hands a data message to the transport after releasing the channel's lock; a CLOSE sent in
    between makes OpenSSH drop the whole bastion session. The channel socket orders them."""
    from deployments.remote.jump import _ChannelSocket

    order: list[str] = []
    sending, release = threading.Event(), threading.Event()

    class Channel:  # records what reaches the wire, and holds a send midway
        def send(self, data):
            sending.set()
            release.wait(5)
            order.append("data")
            return len(data)

        def close(self):
            order.append("close")

    sock = _ChannelSocket(Channel())
    sender = threading.Thread(target=sock.send, args=(b"x",))
    sender.start()
    sending.wait(5)
    closer = threading.Thread(target=sock.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "the close did not wait for the send"
    release.set()
    sender.join(5)
    closer.join(5)
    assert order == ["data", "close"]
    with pytest.raises(OSError):
        sock.send(b"late")


def test_the_answer_to_the_bastions_close_waits_for_a_send_in_progress(monkeypatch):
    """When the node's sshd goes away the bastion closes the channel, and paramiko's transport thread
    answers with a CLOSE at once: not before a data message already on its way."""
    import paramiko

    from deployments.remote.jump import _ChannelSocket, _ordered_close

    order: list[str] = []
    sending, release = threading.Event(), threading.Event()

    class Channel:
        def send(self, data):
            sending.set()
            release.wait(5)
            order.append("data")
            return len(data)

    monkeypatch.setattr(paramiko.Channel, "_handle_close", lambda chan, m: order.append("close"))
    channel = Channel()
    channel._panel_socket = sock = _ChannelSocket(channel)
    sender = threading.Thread(target=sock.send, args=(b"x",))
    sender.start()
    sending.wait(5)
    handler = threading.Thread(target=_ordered_close, args=(channel, None))
    handler.start()
    handler.join(0.2)
    assert handler.is_alive(), "the CLOSE did not wait for the send"
    release.set()
    sender.join(5)
    handler.join(5)
    assert order == ["data", "close"]
