"""Bastions (OpenSSH's ``ProxyJump``): one pooled SSH session per bastion per worker process.

No Django here. A node whose :class:`~.connection.Target` has ``via`` is
reached through that bastion: the panel logs in to the bastion (its own
credential, its own pinned host key, ``RejectPolicy``, keepalives), opens a
``direct-tcpip`` channel from it to the node's address, and runs the node's
own SSH handshake over that channel (``sock=``). A chain of bastions is the
same, one hop after the other (at most ``MAX_JUMP_HOPS``).

The bastion's session is shared: every connection through it in this process
(the nodes of a rollout a worker runs one after the other, the threads of an
in-process worker) opens a channel on one transport instead of a TCP
connection and a login each. Sessions are counted (``Hop.refs``); one nobody
has used for ``POOL.idle_seconds`` is closed. A session that stops answering
(a channel open timed out, its transport died) is taken out of the pool at
once, so the next connection, such as a detached run's reconnect, logs in to
the bastion afresh; those still on it keep it until they let go.

Errors name the hop: ``bastion web-gw: host key mismatch for …`` when the
bastion itself fails, ``10.0.0.5:22 unreachable through bastion web-gw: …``
when the bastion cannot reach the node.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading

import paramiko

from .connection import Connection, RemoteError, Target

__all__ = ["BASTION_IDLE_SECONDS", "POOL", "BastionPool", "Hop"]

# A bastion session nobody has used for this long is closed. Long enough to carry a rollout's worker from
# one node to the next; short enough that an idle worker holds no session open.
BASTION_IDLE_SECONDS = 30.0
# What a channel opened through a bastion says it comes from (sshd only logs it).
_ORIGIN = ("127.0.0.1", 0)


def _key(target: Target) -> tuple:
    """What makes two bastion targets one session: address, login, pinned key, credential, and its own way."""
    secret = hashlib.sha256(
        "\0".join(x or "" for x in (target.private_key, target.passphrase, target.password)).encode()
    ).hexdigest()
    pinned = target.host_key.openssh if target.host_key is not None else ""
    via = _key(target.via) if target.via is not None else None
    return (target.host, target.port, target.user, pinned, secret, via)


class _ChannelSocket:
    """A ``direct-tcpip`` channel as the next hop's socket, keeping the first bytes the node sent
    (``first``, ``hung_up``) as ``connection._RecordingSocket`` does, so a port that does not speak SSH
    behind a bastion is said as such.

    Sending and closing are serialised. paramiko's ``Channel.send`` builds a data message under the
    channel's lock but hands it to the transport after releasing it, so a close from another thread (the
    next hop's transport shutting down while its thread still answers the node) could put the channel's
    CLOSE on the wire before that data. OpenSSH then finds data for a channel it has freed and drops the
    whole session ("data packet referred to nonexistent channel"): with a shared bastion session, every
    node behind it at once (seen here under load, one rollout in three). The same holds for the CLOSE
    paramiko sends back when the bastion closes the channel (the node's sshd went away):
    ``_ordered_close`` waits for a send in progress too.
    """

    # How long a close waits for a send in progress (a send blocked on a dead link's window must not
    # keep the close waiting: the session is lost then anyway).
    CLOSE_WAIT_SECONDS = 5.0

    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel
        self._lock = threading.RLock()
        self._closed = False
        self.first = b""
        self.hung_up = False

    def send(self, data: bytes) -> int:
        with self._lock:
            if self._closed:
                raise OSError("the channel through the bastion is closed")
            return self._channel.send(data)

    def sendall(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                raise OSError("the channel through the bastion is closed")
            self._channel.sendall(data)

    def close(self) -> None:
        with self.quiet():
            self._closed = True
            self._channel.close()

    @contextlib.contextmanager
    def quiet(self):
        """No send in progress while in here (given up after ``CLOSE_WAIT_SECONDS``)."""
        locked = self._lock.acquire(timeout=self.CLOSE_WAIT_SECONDS)
        try:
            yield
        finally:
            if locked:
                self._lock.release()

    def recv(self, bufsize: int) -> bytes:
        data = self._channel.recv(bufsize)
        if not data and bufsize:
            self.hung_up = True
        elif len(self.first) < 512:
            self.first += data[: 512 - len(self.first)]
        return data

    def __getattr__(self, name: str):
        return getattr(self._channel, name)


def _ordered_close(channel: paramiko.Channel, message) -> None:
    """The bastion transport's handler of the server's CLOSE for a channel: paramiko answers with our CLOSE
    at once, so it waits for a send in progress on that channel to reach the wire first (see
    ``_ChannelSocket``: the node's sshd going away must not drop the bastion session of every other node)."""
    sock = getattr(channel, "_panel_socket", None)
    if sock is None:
        paramiko.Channel._handle_close(channel, message)
        return
    with sock.quiet():
        paramiko.Channel._handle_close(channel, message)


def _order_closes(transport: paramiko.Transport) -> None:
    table = dict(type(transport)._channel_handler_table)
    table[paramiko.common.MSG_CHANNEL_CLOSE] = _ordered_close
    transport._channel_handler_table = table  # this transport's own: looked up on the instance


class Hop:
    """One bastion's session in the pool, shared by every connection through it."""

    def __init__(self, pool: BastionPool, key: tuple, target: Target) -> None:
        self.pool = pool
        self.key = key
        self.target = target
        self.refs = 0
        self.conn: Connection | None = None
        self.error: RemoteError | None = None  # why it could not be opened (said to every waiter)
        self.broken = False  # out of the pool: the next acquire opens a new session
        self.lock = threading.Lock()  # one login per bastion: the others wait for its session
        self.timer: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"<Hop {self.target.label} refs={self.refs}{' broken' if self.broken else ''}>"

    def _open(self) -> None:
        with self.lock:
            if self.error is not None:
                raise self.error
            if self.conn is not None:
                return
            conn = Connection(self.target)
            try:
                conn.open()
            except RemoteError as e:
                self.error = RemoteError(
                    e.kind, f"bastion {self.target.label}: {e.message}", e.hop or self.target.label
                )
                raise self.error from None
            _order_closes(conn.transport)
            self.conn = conn
            self.pool.opened += 1

    def alive(self) -> bool:
        conn = self.conn
        try:
            return conn is not None and conn.transport.is_active()
        except RuntimeError:  # closed meanwhile
            return False

    def open_socket(self, target: Target) -> _ChannelSocket:
        """A channel from the bastion to ``target``'s address, to run ``target``'s handshake over."""
        label = self.target.label
        try:
            transport = self.conn.transport
            channel = transport.open_channel(
                "direct-tcpip", (target.host, target.port), _ORIGIN, timeout=target.connect_timeout
            )
        except paramiko.ChannelException as e:
            # The bastion answered: its sshd could not connect (2), or will not forward (1).
            if e.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
                why = f"the bastion's sshd does not allow TCP forwarding ({e.text})"
            elif e.code == paramiko.common.OPEN_FAILED_CONNECT_FAILED:
                why = "the bastion could not connect to it (refused, no route, or timed out there)"
            else:
                why = e.text or f"channel open failed (code {e.code})"
            raise RemoteError("unreachable", f"{target.address} unreachable through bastion {label}: {why}") from None
        except (paramiko.SSHException, EOFError, OSError, RuntimeError) as e:
            # No answer from the bastion: its session is in doubt; the next connection logs in afresh.
            self.pool.discard(self)
            raise RemoteError(
                "unreachable",
                f"{target.address} unreachable through bastion {label}: the bastion did not answer ({e or 'closed'})",
            ) from None
        sock = _ChannelSocket(channel)
        channel._panel_socket = sock  # for _ordered_close
        return sock

    def release(self) -> None:
        self.pool.release(self)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class BastionPool:
    """The bastion sessions of this process, by bastion (address, login, pinned key, credential, way).

    Thread-safe. ``acquire`` gives a :class:`Hop` with an open session (raising RemoteError, prefixed
    ``bastion <name>:``, when it cannot be opened); each acquire is matched by one ``release``.
    ``opened`` counts the logins this pool made (for tests and benchmarks).
    """

    def __init__(self, idle_seconds: float = BASTION_IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self.opened = 0
        self._lock = threading.Lock()
        self._hops: dict[tuple, Hop] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._hops)

    def _take(self, target: Target) -> Hop:
        key = _key(target)
        with self._lock:
            hop = self._hops.get(key)
            if hop is None or hop.broken:
                hop = self._hops[key] = Hop(self, key, target)
            hop.refs += 1
            if hop.timer is not None:
                hop.timer.cancel()
                hop.timer = None
            return hop

    def acquire(self, target: Target) -> Hop:
        for _ in range(2):
            hop = self._take(target)
            try:
                hop._open()
            except BaseException:
                self.discard(hop)
                self.release(hop)
                raise
            if hop.alive():
                return hop
            # It died while idle in the pool (the link dropped): log in again once.
            self.discard(hop)
            self.release(hop)
        raise RemoteError("disconnected", f"bastion {target.label}: the session dropped as soon as it was opened")

    def discard(self, hop: Hop) -> None:
        """Take ``hop`` out of the pool: the next acquire opens a new session (this one closes when let go)."""
        with self._lock:
            hop.broken = True
            if self._hops.get(hop.key) is hop:
                del self._hops[hop.key]

    def release(self, hop: Hop) -> None:
        with self._lock:
            hop.refs -= 1
            if hop.refs > 0:
                return
            if hop.broken:
                close = True
            else:
                close = False
                hop.timer = threading.Timer(self.idle_seconds, self._expire, args=(hop,))
                hop.timer.daemon = True
                hop.timer.start()
        if close:
            hop.close()

    def _expire(self, hop: Hop) -> None:
        with self._lock:
            if hop.refs > 0 or hop.timer is None:
                return  # taken again meanwhile
            hop.timer = None
            hop.broken = True
            if self._hops.get(hop.key) is hop:
                del self._hops[hop.key]
        hop.close()

    def close_idle(self) -> None:
        """Close every session nobody uses now (tests; a worker that winds down)."""
        with self._lock:
            idle = [h for h in self._hops.values() if h.refs == 0]
            for hop in idle:
                if hop.timer is not None:
                    hop.timer.cancel()
                    hop.timer = None
                hop.broken = True
                del self._hops[hop.key]
        for hop in idle:
            hop.close()


# The pool of this process (a qcluster worker process, or a test).
POOL = BastionPool()
