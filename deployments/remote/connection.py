"""Reaching a node: TCP, the SSH handshake against the pinned host key, login.

No Django here. Everything that can go wrong on the wire is reported as a
:class:`RemoteError` with a machine-readable ``kind`` and a human message that
names the cause and never contains a password, passphrase or private key.

Host keys are pinned: the only known key for a connection is
``Target.host_key``; anything else is rejected (``RejectPolicy``).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import paramiko

from .keys import HOST_KEY_TYPES, HostKey, load_private_key, openssh_fingerprint

__all__ = ["REMOTE_ERROR_KINDS", "Cancelled", "Connection", "RemoteError", "Target", "scan_host_key"]

# The most bastions a node may be reached through, one after the other (the panel refuses longer chains).
MAX_JUMP_HOPS = 3

REMOTE_ERROR_KINDS = (
    "unknown-host",
    "unreachable",
    "host-key-mismatch",
    "host-key-missing",
    "auth",
    "ship",
    "disconnected",
    "not-ssh",
    "protocol",
    "sudo",
    "killed",  # a detached run ended without an exit status, and nobody here asked for it
    "no-generation",  # a rollback's generation is not on the node: nothing was changed
    "build-host",  # the build host could not build: unreachable, refused, changed key (remote.build)
    "copy",  # the closure could not be copied to the node (remote.closure)
    "diff",  # the node could not compare the systems (remote.closure)
    "gone",  # a built system waiting to be activated is no longer in the node's store
)

# Host key algorithms in the order scanning asks for them: the pinnable types in
# their order, an RSA key under its SHA-2 signature algorithms first.
_SCAN_ALGORITHM_ORDER = (
    *(t for t in HOST_KEY_TYPES if t != "ssh-rsa"),
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
)

# A link that has answered nothing for this long is taken for dead (Target.link_timeout's default).
# The SSH session sends a keepalive after a third of it without traffic, and the kernel gives up on
# data left unacknowledged for that long (TCP_USER_TIMEOUT), so a cut link is noticed within about
# 1.3 times this, instead of the 15 minutes of TCP's own retries; the follower of a detached run
# also asks the node for an answer after a third of it without output (``detached``).
LINK_TIMEOUT_SECONDS = 15.0
# How long a dropped node may stay unreachable while its detached run is followed (Target.reconnect_for).
RECONNECT_FOR_SECONDS = 120.0


def keepalive_interval(link_timeout: float) -> float:
    """Seconds without traffic after which the session sends a keepalive."""
    return max(1.0, link_timeout / 3)


# paramiko logs every exception of its transport thread at ERROR, traceback
# included, and then hands the same exception to the caller. During the
# handshake we turn each one into a RemoteError whose message says it all, so
# the transport logs to this channel until the handshake is over, and the
# channel passes its records on at DEBUG only. Afterwards it logs to paramiko's
# usual channel again: a link lost mid-run is worth an ERROR line there.
_HANDSHAKE_LOG = "paramiko.transport.handshake"


class _DemoteToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger(_HANDSHAKE_LOG).addFilter(_DemoteToDebug())

# How much of what a server sent first is kept, to say what answered when it was not SSH.
_FIRST_BYTES = 512


class RemoteError(Exception):
    """A problem reaching or talking to a node (not a non-zero exit of the command).

    ``kind`` is one of :data:`REMOTE_ERROR_KINDS`; ``message`` is for humans and
    never contains secrets. ``hop`` names the bastion (``Target.label``) at fault
    when the error is a bastion's on the way, not the node's own.
    """

    def __init__(self, kind: str, message: str, hop: str = "") -> None:
        if kind not in REMOTE_ERROR_KINDS:
            raise ValueError(f"unknown RemoteError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.hop = hop

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"RemoteError({self.kind!r}, {self.message!r})"


class Cancelled(Exception):
    """A requested cancel killed the remote command (raised by ``stream.run_command``)."""


@dataclass
class Target:
    """Where and how to log in. Secrets are excluded from ``repr``.

    ``sudo=True``: privileged commands are prefixed with ``sudo -S -p ''`` and the
    password (``sudo_password`` or else ``password``) is fed on stdin; with no
    password, ``sudo -n`` (must be NOPASSWD).
    """

    host: str
    port: int
    user: str
    host_key: HostKey | None
    private_key: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sudo: bool = False
    sudo_password: str | None = field(default=None, repr=False)
    connect_timeout: float = 10
    # A link silent for this long is dead (keepalives, TCP_USER_TIMEOUT, the follower's probe).
    link_timeout: float = LINK_TIMEOUT_SECONDS
    # How long a detached run's follower keeps reconnecting before it gives up on the node.
    reconnect_for: float = RECONNECT_FOR_SECONDS
    # The bastion this node is reached through (OpenSSH's ProxyJump): its own login and pinned key.
    via: Target | None = None
    # What messages call the node (its name in the panel); its address when empty.
    name: str = ""

    def __repr__(self) -> str:
        auth = []
        if self.private_key:
            auth.append("key")
        if self.password:
            auth.append("password")
        hk = self.host_key.fingerprint if self.host_key else None
        via = f", via={self.via!r}" if self.via is not None else ""
        return (
            f"Target({self.user}@{self.host}:{self.port}, host_key={hk}, "
            f"auth={'+'.join(auth) or 'none'}, sudo={self.sudo}{via})"
        )

    __str__ = __repr__

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        """The node as messages name it: its name, else its address."""
        return self.name or self.address

    @property
    def where(self) -> str:
        """The address for messages, with the bastion it is reached through."""
        if self.via is None:
            return self.address
        return f"{self.address} (through bastion {self.via.label})"

    def hops(self) -> list[Target]:
        """The bastions on the way to this node, the first one the panel connects to first."""
        chain, hop = [], self.via
        while hop is not None:
            if len(chain) >= MAX_JUMP_HOPS:
                raise ValueError(f"more than {MAX_JUMP_HOPS} bastions on the way to {self.label}")
            chain.append(hop)
            hop = hop.via
        return chain[::-1]

    def sudo_secret(self) -> str | None:
        """The password sudo will read on stdin, if any."""
        if not self.sudo:
            return None
        return self.sudo_password or self.password or None

    def privileged_prefix(self) -> str:
        """Shell prefix for commands that need root ('' when not using sudo)."""
        if not self.sudo:
            return ""
        if self.sudo_secret():
            return "sudo -S -p '' "
        return "sudo -n "

    def privileged_stdin(self) -> bytes | None:
        secret = self.sudo_secret()
        return (secret + "\n").encode() if secret else None


class _RecordingSocket(socket.socket):
    """A connected socket that keeps the first bytes the server sent (``first``).

    paramiko reads the server's identification line itself and drops what is
    not one, so a web server on the port would only be "Error reading SSH
    protocol banner"; with these bytes the error can say what answered.
    """

    @classmethod
    def wrap(cls, sock: socket.socket) -> _RecordingSocket:
        timeout = sock.gettimeout()
        wrapped = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        wrapped.settimeout(timeout)
        wrapped.first = b""
        wrapped.hung_up = False  # the server closed its side
        return wrapped

    def recv(self, bufsize: int, *flags) -> bytes:
        try:
            data = super().recv(bufsize, *flags)
        except ConnectionResetError:
            # A server that hangs up without reading our identification line resets the connection.
            self.hung_up = True
            raise
        if not data and bufsize:
            self.hung_up = True
        elif len(self.first) < _FIRST_BYTES:
            self.first += data[: _FIRST_BYTES - len(self.first)]
        return data


def _shown(data: bytes, limit: int = 60) -> str:
    """The first line of ``data`` for a message: printable ASCII as is, anything else escaped, cut with '…'."""
    line, _, rest = data.partition(b"\n")
    line = line.rstrip(b"\r")
    text = ""
    for b in line:
        if len(text) >= limit:
            return f"'{text}…'"
        text += chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}"
    return f"'{text}{'…' if rest.strip() else ''}'"


def _not_ssh(sock: _RecordingSocket, where: str, timeout: float) -> RemoteError | None:
    """The error for a server that did not answer with an SSH identification line, or None if it did."""
    first = sock.first
    if first.startswith(b"SSH-") or b"\nSSH-" in first:
        return None  # it spoke SSH (possibly after a few lines of text, which RFC 4253 allows)
    if first:
        return RemoteError("not-ssh", f"{where} did not speak SSH: it sent {_shown(first)}")
    if not sock.hung_up:
        return RemoteError(
            "not-ssh", f"{where} accepted the connection but sent no SSH identification within {timeout:g} s"
        )
    return RemoteError(
        "not-ssh",
        f"{where} closed the connection without a word: not an SSH server, "
        "or sshd turned the connection away (MaxStartups, TCP wrappers)",
    )


def _open_socket(host: str, port: int, timeout: float, link_timeout: float = LINK_TIMEOUT_SECONDS) -> _RecordingSocket:
    """TCP connect, mapping failures to RemoteError unknown-host / unreachable."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise RemoteError("unknown-host", f"cannot resolve host name {host!r}: {e.strerror or e}") from None
    except TimeoutError:
        raise RemoteError("unreachable", f"connection to {host}:{port} timed out after {timeout:g} s") from None
    except ConnectionRefusedError:
        raise RemoteError(
            "unreachable", f"connection to {host}:{port} refused (is sshd running on that port?)"
        ) from None
    except OSError as e:
        raise RemoteError("unreachable", f"cannot connect to {host}:{port}: {e.strerror or e}") from None
    # Detect a silently vanished peer: SSH keepalives (a third of link_timeout) plus
    # TCP_USER_TIMEOUT make unacknowledged sends fail within link_timeout of being sent,
    # instead of after ~15 minutes of retransmissions.
    # TCP_NODELAY: every write is a whole SSH packet, and a small one held back by Nagle's algorithm until
    # the node's delayed ACK (40 ms on Linux) cost each command ~45 ms (an exec of `true`: 49 ms, 4.6 ms with
    # it; bench/node_bench.py). OpenSSH sets it for interactive sessions.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(link_timeout * 1000))
    except OSError:
        pass
    return _RecordingSocket.wrap(sock)


def scan_host_key(host: str, port: int = 22, timeout: float = 10, via: Target | None = None) -> HostKey:
    """Fetch a node's host key like ``ssh-keyscan`` (no authentication, nothing trusted).

    Prefers Ed25519, then ECDSA, then RSA. Raises RemoteError (unknown-host,
    unreachable, not-ssh, protocol). The caller must show the fingerprint to an
    admin before pinning it. ``via``: the bastion the node is reached through
    (logged in to with its own credential, against its own pinned key).
    """
    hop = None
    if via is None:
        sock = _open_socket(host, port, timeout)
    else:
        hop, sock = _through_bastion(Target(host=host, port=port, user="", host_key=None, via=via,
                                             connect_timeout=timeout))  # fmt: skip
    try:
        return _scan(sock, host, port, timeout)
    finally:
        if hop is not None:
            hop.release()


def _scan(sock, host: str, port: int, timeout: float) -> HostKey:
    transport = paramiko.Transport(sock)
    try:
        transport.set_log_channel(_HANDSHAKE_LOG)
        transport.banner_timeout = timeout
        opts = transport.get_security_options()
        available = list(opts.key_types)
        opts.key_types = [k for k in _SCAN_ALGORITHM_ORDER if k in available] + [
            k for k in available if k not in _SCAN_ALGORITHM_ORDER
        ]
        where = f"{host}:{port}"
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise _not_ssh(sock, where, timeout) or RemoteError(
                "protocol", f"SSH handshake with {where} failed: {e}"
            ) from None
        try:
            key = transport.get_remote_server_key()
        except paramiko.SSHException:
            # start_client returns quietly when its timeout passes; then there is no key.
            raise _not_ssh(sock, where, timeout) or RemoteError(
                "protocol", f"SSH handshake with {where} did not finish within {timeout:g} s"
            ) from None
        return HostKey.from_pkey(key)
    finally:
        transport.close()


def _through_bastion(target: Target):
    """(the pooled bastion session, a ``direct-tcpip`` channel through it to ``target``, as a socket)."""
    from .jump import POOL  # jump opens its bastions with Connection: imported when first needed

    hop = POOL.acquire(target.via)
    try:
        return hop, hop.open_socket(target)
    except BaseException:
        hop.release()
        raise


def _offered(key: paramiko.PKey) -> str:
    """``"<type> SHA256:..."`` of a key a server presented, for error messages."""
    return f"{key.get_name()} {openssh_fingerprint(f'{key.get_name()} {key.get_base64()}')}"


class Connection:
    """An SSH session to one node. Use as a context manager or call open()/close().

    Commands run through :mod:`.stream`. Not thread-safe: one thread drives a Connection.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self._client: paramiko.SSHClient | None = None
        self._hop = None  # the pooled bastion session this connection goes through (``jump``)

    def __enter__(self) -> Connection:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._client is not None else "closed"
        return f"<Connection {self.target!r} {state}>"

    @property
    def transport(self) -> paramiko.Transport:
        if self._client is None or self._client.get_transport() is None:
            raise RuntimeError("connection is not open")
        return self._client.get_transport()

    def open(self) -> None:
        """Connect and authenticate, trusting only ``target.host_key``.

        Raises RemoteError: host-key-missing, unknown-host, unreachable,
        not-ssh (something else answers on the port), host-key-mismatch
        (different key, or the server offers another key type), auth, protocol.
        """
        if self._client is not None:
            return  # already open
        t = self.target
        where = t.where
        if t.host_key is None:
            raise RemoteError(
                "host-key-missing", f"no pinned host key for {where}: scan the node and pin its key first"
            )
        pkey = None
        if t.private_key:
            try:
                pkey = load_private_key(t.private_key, t.passphrase)
            except ValueError as e:
                raise RemoteError("auth", f"cannot use the private key for {t.user}@{where}: {e}") from None
        if pkey is None and not t.password:
            raise RemoteError("auth", f"no private key or password configured for {t.user}@{where}")

        hop = None
        if t.via is None:
            sock = _open_socket(t.host, t.port, t.connect_timeout, t.link_timeout)
        else:
            hop, sock = _through_bastion(t)
        try:
            self._open(t, where, sock, pkey)
        except BaseException:
            if hop is not None:
                hop.release()
            raise
        self._hop = hop

    def _open(self, t: Target, where: str, sock, pkey) -> None:
        client = paramiko.SSHClient()
        client.set_log_channel(_HANDSHAKE_LOG)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        # Exactly one known key; OpenSSH's known_hosts naming so paramiko finds it.
        known_name = t.host if t.port == 22 else f"[{t.host}]:{t.port}"
        client.get_host_keys().add(known_name, t.host_key.key_type, t.host_key.to_pkey())
        expected = f"{t.host_key.key_type} {t.host_key.fingerprint}"
        try:
            client.connect(
                t.host,
                port=t.port,
                username=t.user,
                pkey=pkey,
                password=t.password or None,
                sock=sock,
                timeout=t.connect_timeout,
                banner_timeout=t.connect_timeout,
                auth_timeout=t.connect_timeout,
                channel_timeout=t.connect_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as e:
            client.close()
            raise RemoteError(
                "host-key-mismatch",
                f"host key mismatch for {where}: expected {expected}, got {_offered(e.key)}. "
                "If the node was reinstalled, re-scan and re-pin its key; otherwise this may be an attack.",
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            methods = " and ".join(
                m for m, on in (("public key", pkey is not None), ("password", bool(t.password))) if on
            )
            raise RemoteError("auth", f"authentication as {t.user!r} on {where} failed (tried {methods})") from None
        except paramiko.SSHException as e:
            msg = str(e)
            if "not found in known_hosts" in msg:
                # The server offered only key types other than the pinned one.
                tr = client.get_transport()
                offered = tr.get_remote_server_key() if tr is not None else None
                got = f", server offered {_offered(offered)}" if offered is not None else ""
                client.close()
                raise RemoteError(
                    "host-key-mismatch", f"host key mismatch for {where}: expected {expected}{got}"
                ) from None
            client.close()
            if "No authentication methods" in msg:
                raise RemoteError("auth", f"authentication as {t.user!r} on {where} failed: {msg}") from None
            if msg == "No existing session":  # start_client gave up quietly at its timeout
                msg = f"did not finish within {t.connect_timeout:g} s"
            else:
                msg = f"failed: {msg}"
            raise _not_ssh(sock, where, t.connect_timeout) or RemoteError(
                "protocol", f"SSH handshake with {where} {msg}"
            ) from None
        except TimeoutError:
            client.close()
            raise _not_ssh(sock, where, t.connect_timeout) or RemoteError(
                "unreachable", f"{where} timed out during the SSH handshake"
            ) from None
        except EOFError:
            client.close()
            raise _not_ssh(sock, where, t.connect_timeout) or RemoteError(
                "protocol", f"{where} closed the connection during the SSH handshake"
            ) from None
        except OSError as e:
            client.close()
            raise RemoteError("unreachable", f"connection to {where} failed: {e.strerror or e}") from None
        transport = client.get_transport()
        transport.set_log_channel("paramiko.transport")  # the handshake is over: see _HANDSHAKE_LOG
        transport.set_keepalive(int(keepalive_interval(t.link_timeout)))
        self._client = client

    def close(self) -> None:
        """Close the connection (idempotent); a pooled bastion it went through is released."""
        client, self._client = self._client, None
        hop, self._hop = self._hop, None
        try:
            if client is not None:
                client.close()
        finally:
            if hop is not None:
                hop.release()

    def open_channel(self) -> paramiko.Channel:
        """A new session channel. Raises RemoteError disconnected (link lost) or protocol."""
        tr = self.transport
        try:
            if tr.is_active():
                return tr.open_session(timeout=self.target.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            if tr.is_active():
                raise RemoteError("protocol", f"cannot open an SSH session on {self.target.address}: {e}") from None
        raise RemoteError("disconnected", f"connection to {self.target.address} was lost")

    def lost(self) -> RemoteError:
        """The error for a link that dropped while a command was running."""
        return RemoteError(
            "disconnected",
            f"connection to {self.target.address} dropped while a command was running; "
            "its outcome on the node is unknown",
        )
