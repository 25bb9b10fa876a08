"""SSH transport to nodes: pinned host keys, key/password auth, fast streaming exec.

No Django here. Everything that can go wrong on the wire is reported as a
:class:`RemoteError` with a machine-readable ``kind`` and a human message that
names the cause and never contains a password, passphrase or private key.

Design points (see DESIGN.md "Running nixos-rebuild on the node"):

* Host keys are pinned: the only known key for a connection is
  ``Target.host_key``; anything else is rejected (``RejectPolicy``).
* Commands run without a PTY; stdout and stderr are read separately, in the
  order the SSH packets arrived, until EOF, and only then is the exit status
  taken (TESTBED.md read-loop pitfall).
* Every command runs in its own process group so a cancel can kill the whole
  tree (``kill -- -<pgid>``) through a second channel.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import os
import posixpath
import secrets
import shlex
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = [
    "Cancelled",
    "Connection",
    "HostKey",
    "RemoteError",
    "Target",
    "key_fingerprint",
    "load_private_key",
    "scan_host_key",
]

OutputCallback = Callable[[str, bytes], None]

REMOTE_ERROR_KINDS = (
    "unknown-host",
    "unreachable",
    "host-key-mismatch",
    "host-key-missing",
    "auth",
    "ship",
    "disconnected",
    "protocol",
    "sudo",
)

# Host key algorithms we accept/pin, in the order ssh-keyscan-like scanning prefers them.
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
_SCAN_ALGORITHM_ORDER = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
)

KEEPALIVE_SECONDS = 15
# Bytes per read from paramiko's buffers when not driven by the arrival log.
_CHUNK = 65536
# The wrapper's first stderr line; run() consumes it and never delivers it.
_PGID_MARK = b"__NIXOS_PANEL_PGID__ "
# After SIGTERM to the remote group, how long to wait before SIGKILL.
CANCEL_GRACE_SECONDS = 5.0


class RemoteError(Exception):
    """A problem reaching or talking to a node (not a non-zero exit of the command).

    ``kind`` is one of :data:`REMOTE_ERROR_KINDS`; ``message`` is for humans and
    never contains secrets.
    """

    def __init__(self, kind: str, message: str) -> None:
        if kind not in REMOTE_ERROR_KINDS:
            raise ValueError(f"unknown RemoteError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"RemoteError({self.kind!r}, {self.message!r})"


class Cancelled(Exception):
    """Raised by :meth:`Connection.run` after a requested cancel killed the remote command."""


# --------------------------------------------------------------------------- keys


def _sha256_fingerprint(blob: bytes) -> str:
    # Same as `ssh-keygen -lf`: SHA256 of the wire-format public key, base64 without padding.
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class HostKey:
    """A node's public host key, as pinned in the panel.

    ``key_type`` is the OpenSSH key type (``ssh-ed25519``, ``ecdsa-sha2-nistp256``,
    ``ssh-rsa``, ...), ``base64`` the wire-format key blob. Construction validates
    both and raises ``ValueError`` on junk.
    """

    key_type: str
    base64: str

    def __post_init__(self) -> None:
        if self.key_type not in HOST_KEY_TYPES:
            raise ValueError(f"unsupported host key type {self.key_type!r}")
        try:
            blob = base64.b64decode(self.base64.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise ValueError("host key is not valid base64") from None
        # The blob starts with the key type as an SSH string; a mismatch means a
        # copy/paste mix-up of type and key.
        if len(blob) < 4:
            raise ValueError("host key blob is too short")
        (n,) = struct.unpack(">I", blob[:4])
        if blob[4 : 4 + n] != self.key_type.encode():
            raise ValueError(f"host key data does not hold a {self.key_type} key")
        try:
            paramiko.PKey.from_type_string(self.key_type, blob)
        except Exception:
            raise ValueError(f"host key is not a valid {self.key_type} key") from None

    @property
    def openssh(self) -> str:
        """``"<type> <base64>"`` as in authorized_keys/known_hosts."""
        return f"{self.key_type} {self.base64}"

    @property
    def fingerprint(self) -> str:
        """``SHA256:<unpadded base64>``, identical to ``ssh-keygen -lf``."""
        return _sha256_fingerprint(base64.b64decode(self.base64))

    def to_pkey(self) -> paramiko.PKey:
        return paramiko.PKey.from_type_string(self.key_type, base64.b64decode(self.base64))

    @classmethod
    def from_pkey(cls, key: paramiko.PKey) -> HostKey:
        return cls(key.get_name(), key.get_base64())

    @classmethod
    def parse(cls, text: str) -> HostKey:
        """Parse ``"ssh-ed25519 AAAA... [comment]"``, an ssh-keyscan/known_hosts line
        (``"host ssh-ed25519 AAAA..."``) or a .pub file. Raises ``ValueError`` on junk."""
        if not isinstance(text, str):
            raise ValueError("host key must be text")
        for line in text.splitlines():
            tokens = line.split()
            if not tokens or tokens[0].startswith("#"):
                continue
            for i, tok in enumerate(tokens[:-1]):
                if tok in HOST_KEY_TYPES:
                    return cls(tok, tokens[i + 1])
            raise ValueError(
                "not an SSH public host key (expected e.g. 'ssh-ed25519 AAAA...'; "
                f"supported types: {', '.join(HOST_KEY_TYPES)})"
            )
        raise ValueError("no host key given")


def load_private_key(text: str, passphrase: str | None = None) -> paramiko.PKey:
    """Load an Ed25519, RSA or ECDSA private key (OpenSSH or PEM/PKCS#8 text).

    The type is detected from the key itself. Raises ``ValueError`` with a clear
    message (never containing the key or passphrase) when the key is encrypted and
    no passphrase was given, the passphrase is wrong, or the key is unsupported.
    """
    if not text or not isinstance(text, str):
        raise ValueError("no private key given")
    data = text.strip().encode() + b"\n"
    pw = passphrase.encode() if passphrase else None
    is_openssh = b"-----BEGIN OPENSSH PRIVATE KEY-----" in data
    loader = serialization.load_ssh_private_key if is_openssh else serialization.load_pem_private_key
    try:
        try:
            key = loader(data, password=pw)
        except TypeError as e:
            if pw is not None and "not encrypted" in str(e):
                # A passphrase stored for an unencrypted key is harmless: ignore it.
                key = loader(data, password=None)
            else:
                raise ValueError("the private key is encrypted: a passphrase is required") from None
    except ValueError as e:
        if str(e).startswith("the private key is encrypted"):
            raise
        if pw is not None:
            raise ValueError("could not decrypt the private key: wrong passphrase (or corrupt key)") from None
        raise ValueError("not a valid private key (expected an OpenSSH or PEM Ed25519, RSA or ECDSA key)") from None
    except UnsupportedAlgorithm:
        raise ValueError("unsupported private key algorithm (use Ed25519, RSA or ECDSA)") from None

    if isinstance(key, ed25519.Ed25519PrivateKey):
        cls: type[paramiko.PKey] = paramiko.Ed25519Key
    elif isinstance(key, rsa.RSAPrivateKey):
        cls = paramiko.RSAKey
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise ValueError(f"unsupported ECDSA curve {key.curve.name} (use P-256, P-384 or P-521)")
        cls = paramiko.ECDSAKey
    else:
        raise ValueError("unsupported private key type (use Ed25519, RSA or ECDSA)")
    # Re-serialise the decrypted key in memory as unencrypted OpenSSH so paramiko
    # reads every format cryptography understands (paramiko alone rejects PKCS#8)
    # and never sees the passphrase.
    plain = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return cls.from_private_key(io.StringIO(plain.decode()))


def key_fingerprint(text: str, passphrase: str | None = None) -> str:
    """SHA256 fingerprint (``SHA256:...``) of the public half of a private key."""
    return _sha256_fingerprint(load_private_key(text, passphrase).asbytes())


# --------------------------------------------------------------------------- target


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

    def __repr__(self) -> str:
        auth = []
        if self.private_key:
            auth.append("key")
        if self.password:
            auth.append("password")
        hk = self.host_key.fingerprint if self.host_key else None
        return (
            f"Target({self.user}@{self.host}:{self.port}, host_key={hk}, "
            f"auth={'+'.join(auth) or 'none'}, sudo={self.sudo})"
        )

    __str__ = __repr__

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

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


# --------------------------------------------------------------------------- sockets


def _open_socket(host: str, port: int, timeout: float) -> socket.socket:
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
    # Detect a silently vanished peer: SSH keepalives plus TCP_USER_TIMEOUT make
    # unacknowledged sends fail within about a minute instead of ~15 minutes.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 60_000)
    except OSError:
        pass
    return sock


def scan_host_key(host: str, port: int = 22, timeout: float = 10) -> HostKey:
    """Fetch a node's host key like ``ssh-keyscan`` (no authentication, nothing trusted).

    Prefers Ed25519, then ECDSA, then RSA. Raises RemoteError (unknown-host,
    unreachable, protocol). The caller must show the fingerprint to an admin
    before pinning it.
    """
    sock = _open_socket(host, port, timeout)
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = timeout
        opts = transport.get_security_options()
        available = list(opts.key_types)
        opts.key_types = [k for k in _SCAN_ALGORITHM_ORDER if k in available] + [
            k for k in available if k not in _SCAN_ALGORITHM_ORDER
        ]
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise RemoteError("protocol", f"SSH handshake with {host}:{port} failed: {e}") from None
        key = transport.get_remote_server_key()
        return HostKey.from_pkey(key)
    finally:
        transport.close()


# --------------------------------------------------------------------------- streaming


class _ArrivalLog:
    """Records which stream each SSH data packet went to, in arrival order.

    paramiko keeps stdout and stderr in two separate buffers, which loses their
    relative order. Wrapping the two buffers' ``feed`` (called by the transport
    thread, one packet at a time) gives us the exact SSH order, and a wake-up
    event so the reader never spins. This relies on ``Channel.in_buffer`` /
    ``in_stderr_buffer`` (stable since paramiko 1.x; checked by the tests).
    """

    def __init__(self, chan: paramiko.Channel) -> None:
        self.entries: collections.deque[tuple[str, int]] = collections.deque()
        self.wake = threading.Event()
        self.eof = False
        self._tap(chan.in_buffer, "out")
        self._tap(chan.in_stderr_buffer, "err")

    def _tap(self, buf, name: str) -> None:
        feed, close = buf.feed, buf.close
        entries, wake = self.entries, self.wake

        def tapped_feed(data):
            feed(data)
            if data:
                entries.append((name, len(data)))
                wake.set()

        def tapped_close():
            close()
            self.eof = True
            wake.set()

        buf.feed = tapped_feed
        buf.close = tapped_close

    def drain(self) -> list[tuple[str, int]]:
        """Pop all entries, merging consecutive ones of the same stream."""
        out: list[tuple[str, int]] = []
        entries = self.entries
        while entries:
            name, n = entries.popleft()
            if out and out[-1][0] == name:
                out[-1] = (name, out[-1][1] + n)
            else:
                out.append((name, n))
        return out


class _Reader:
    """Turns channel data into lines for ``on_output``; consumes the PGID line."""

    def __init__(self, chan: paramiko.Channel, on_output: OutputCallback) -> None:
        self.chan = chan
        self.on_output = on_output
        self.log = _ArrivalLog(chan)
        self.partial = {"out": b"", "err": b""}
        self.pgid: int | None = None
        self._looking_for_pgid = True
        self.done = False

    def pump(self, wait: float) -> bool:
        """Deliver what has arrived; if nothing has, wait up to ``wait`` seconds.

        Returns True once EOF was seen and everything before it was delivered.
        """
        if self.done:
            return True
        # Read the EOF flag before draining: every feed happens before the close
        # that sets it, so a drain after seeing it holds all remaining data.
        eof = self.log.eof
        batches = self.log.drain()
        if not batches:
            if eof:
                self.done = True
                return True
            self.log.wake.clear()
            if not self.log.entries and not self.log.eof:
                self.log.wake.wait(wait)
            return False
        for name, n in batches:
            self._consume(name, n)
        if eof:
            self.done = True
        return eof

    def _consume(self, name: str, n: int) -> None:
        recv = self.chan.recv if name == "out" else self.chan.recv_stderr
        chunks = []
        while n > 0:
            data = recv(min(n, 1 << 20))
            if not data:
                break
            chunks.append(data)
            n -= len(data)
        data = self.partial[name] + b"".join(chunks)
        lines = data.split(b"\n")
        self.partial[name] = lines.pop()
        if name == "err" and self._looking_for_pgid and lines:
            lines = self._take_pgid(lines)
        on_output = self.on_output
        for line in lines:
            on_output(name, line)

    def _take_pgid(self, lines: list[bytes]) -> list[bytes]:
        # The wrapper prints the marker before the user's command starts, so it is
        # the first line the command itself writes to stderr; login noise (e.g. a
        # .bashrc) may precede it and is delivered as usual.
        for i, line in enumerate(lines):
            if line.startswith(_PGID_MARK):
                self._looking_for_pgid = False
                try:
                    self.pgid = int(line[len(_PGID_MARK) :].strip())
                except ValueError:
                    pass
                return lines[:i] + lines[i + 1 :]
        return lines

    def flush(self) -> None:
        """Deliver final lines that had no trailing newline."""
        for name in ("out", "err"):
            if self.partial[name]:
                line, self.partial[name] = self.partial[name], b""
                self.on_output(name, line)


def _wrap_in_process_group(command: str) -> str:
    """Run ``command`` in a new session/process group and announce its pgid on stderr.

    ``setsid -w`` forks when needed and waits, so the exit status is the
    command's (128+N if killed by signal N). Inside the new session ``$$`` of the
    ``sh`` is the process group id. Without setsid (unusual), sshd's own session
    child already leads a process group, so ``$$`` is still right.
    """
    inner = shlex.quote('printf "__NIXOS_PANEL_PGID__ %s\\n" "$$" >&2; exec sh -c "$1"')
    cmd = shlex.quote(command)
    return (
        f"if command -v setsid >/dev/null 2>&1; then exec setsid -w sh -c {inner} sh {cmd}; "
        f"else exec sh -c {inner} sh {cmd}; fi"
    )


def _check_remote_dir(remote_dir: str) -> str:
    """Refuse paths that would make ``rm -rf``/``mkdir`` dangerous."""
    if not isinstance(remote_dir, str) or "\x00" in remote_dir or "\n" in remote_dir:
        raise ValueError("invalid remote directory")
    norm = posixpath.normpath(remote_dir)
    if not norm.startswith("/") or norm.startswith("//") or len([p for p in norm.split("/") if p]) < 2:
        raise ValueError(f"refusing remote directory {remote_dir!r}: must be absolute and at least two levels deep")
    return norm


# --------------------------------------------------------------------------- connection


class Connection:
    """An SSH session to one node. Use as a context manager or call open()/close().

    Not thread-safe: one thread drives a Connection.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self._client: paramiko.SSHClient | None = None

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

    # ---- open / close

    def open(self) -> None:
        """Connect and authenticate, trusting only ``target.host_key``.

        Raises RemoteError: host-key-missing, unknown-host, unreachable,
        host-key-mismatch (different key, or the server offers another key type),
        auth, protocol.
        """
        if self._client is not None:
            return  # already open
        t = self.target
        where = t.address
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

        sock = _open_socket(t.host, t.port, t.connect_timeout)
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        # Exactly one known key; OpenSSH's known_hosts naming so paramiko finds it.
        known_name = t.host if t.port == 22 else f"[{t.host}]:{t.port}"
        client.get_host_keys().add(known_name, t.host_key.key_type, t.host_key.to_pkey())
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
                f"host key mismatch for {where}: expected {t.host_key.key_type} {t.host_key.fingerprint}, "
                f"got {e.key.get_name()} {_sha256_fingerprint(e.key.asbytes())}. "
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
                got = ""
                tr = client.get_transport()
                if tr is not None and tr.get_remote_server_key() is not None:
                    k = tr.get_remote_server_key()
                    got = f", server offered {k.get_name()} {_sha256_fingerprint(k.asbytes())}"
                client.close()
                raise RemoteError(
                    "host-key-mismatch",
                    f"host key mismatch for {where}: expected {t.host_key.key_type} {t.host_key.fingerprint}{got}",
                ) from None
            client.close()
            if "No authentication methods" in msg:
                raise RemoteError("auth", f"authentication as {t.user!r} on {where} failed: {msg}") from None
            raise RemoteError("protocol", f"SSH handshake with {where} failed: {msg}") from None
        except TimeoutError:
            client.close()
            raise RemoteError("unreachable", f"{where} timed out during the SSH handshake") from None
        except EOFError:
            client.close()
            raise RemoteError("protocol", f"{where} closed the connection during the SSH handshake") from None
        except OSError as e:
            client.close()
            raise RemoteError("unreachable", f"connection to {where} failed: {e.strerror or e}") from None
        transport = client.get_transport()
        transport.set_keepalive(KEEPALIVE_SECONDS)
        self._client = client

    def close(self) -> None:
        """Close the connection (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # ---- exec

    def _alive_transport(self) -> paramiko.Transport:
        tr = self.transport
        if not tr.is_active():
            raise RemoteError("disconnected", f"connection to {self.target.address} was lost")
        return tr

    def _open_channel(self) -> paramiko.Channel:
        tr = self._alive_transport()
        try:
            return tr.open_session(timeout=self.target.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            if not tr.is_active():
                raise RemoteError("disconnected", f"connection to {self.target.address} was lost") from None
            raise RemoteError("protocol", f"cannot open an SSH session on {self.target.address}: {e}") from None

    def run(
        self,
        command: str,
        on_output: OutputCallback,
        *,
        stdin: bytes | None = None,
        should_cancel: Callable[[], bool] | None = None,
        poll: float = 0.2,
    ) -> int:
        """Run a shell command on the node and stream its output; return its exit code.

        * ``on_output(stream, line)`` gets ``"out"`` or ``"err"`` and one line as
          bytes without the newline, in SSH arrival order; a final line without
          newline is delivered too. It runs on the calling thread.
        * No PTY. ``stdin`` (e.g. a sudo password) is sent, then stdin is closed.
        * The command runs in its own process group. ``should_cancel`` is polled
          every ``poll`` seconds; when it returns True the group gets SIGTERM, then
          SIGKILL after CANCEL_GRACE_SECONDS, and :class:`Cancelled` is raised.
        * Both streams are read to EOF before the exit status is taken.
        * Raises RemoteError("disconnected") if the connection drops mid-run.
        """
        tr = self._alive_transport()
        chan = self._open_channel()
        try:
            reader = _Reader(chan, on_output)  # tap before exec: no data can be missed
            try:
                chan.exec_command(_wrap_in_process_group(command))
            except (paramiko.SSHException, EOFError, OSError) as e:
                if not tr.is_active():
                    raise RemoteError("disconnected", f"connection to {self.target.address} was lost") from None
                raise RemoteError("protocol", f"{self.target.address} refused to run a command: {e}") from None
            if stdin:
                try:
                    chan.sendall(stdin)
                except OSError:
                    pass  # the command exited without reading; its exit code tells
            try:
                chan.shutdown_write()
            except OSError:
                pass

            next_check = time.monotonic() + poll
            while not reader.pump(poll):
                if should_cancel is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + poll
                    if should_cancel():
                        self._cancel(chan, reader)
                if not tr.is_active() and not reader.log.entries and not reader.log.eof:
                    raise self._lost()
            reader.flush()

            # EOF on both streams; the process may still be running (it closed its
            # output), so wait for the exit status, still honouring cancel.
            while not chan.status_event.wait(poll):
                if should_cancel is not None and should_cancel():
                    self._cancel(chan, reader)
                if not tr.is_active():
                    raise self._lost()
            if chan.exit_status == -1:
                # Channel closed without exit-status: transport died or the session was torn down.
                raise self._lost()
            return chan.exit_status
        finally:
            chan.close()

    def _lost(self) -> RemoteError:
        return RemoteError(
            "disconnected",
            f"connection to {self.target.address} dropped while a command was running; "
            "its outcome on the node is unknown",
        )

    def _cancel(self, chan: paramiko.Channel, reader: _Reader) -> None:
        """Kill the remote process group (TERM, then KILL), drain output, raise Cancelled."""
        deadline = time.monotonic() + 2.0
        # The PGID line is the first thing the wrapper prints; give it a moment.
        while reader.pgid is None and not reader.done and time.monotonic() < deadline:
            reader.pump(0.05)

        def finished() -> bool:
            return reader.done and chan.status_event.is_set()

        if reader.pgid is not None and not finished():
            for sig in ("TERM", "KILL"):
                self._signal_group(reader.pgid, sig)
                deadline = time.monotonic() + CANCEL_GRACE_SECONDS
                while not finished() and time.monotonic() < deadline:
                    if not reader.done:
                        reader.pump(0.1)
                    else:
                        chan.status_event.wait(0.1)
                if finished():
                    break
        reader.flush()
        chan.close()
        raise Cancelled(f"command on {self.target.address} cancelled")

    def _signal_group(self, pgid: int, sig: str) -> None:
        # A second channel on the same connection. As the login user first: that
        # reaches the group including sudo (its real uid is ours), which relays
        # the signal; with sudo configured, root's kill also reaches root children.
        kill = f"kill -s {sig} -- -{int(pgid)}"
        cmd = kill
        prefix = self.target.privileged_prefix()
        if prefix:
            cmd = f"{prefix}{kill} 2>/dev/null || {kill}"
        try:
            self._run_plain(cmd, stdin=self.target.privileged_stdin(), timeout=10)
        except RemoteError:
            pass

    def _run_plain(self, command: str, *, stdin: bytes | None = None, timeout: float = 30) -> tuple[int, bytes, bytes]:
        """Run a small helper command without the process-group wrapper."""
        chan = self._open_channel()
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out = io.BytesIO()
            err = io.BytesIO()
            deadline = time.monotonic() + timeout
            while True:
                if time.monotonic() > deadline:
                    raise RemoteError("protocol", f"helper command timed out on {self.target.address}")
                got = False
                if chan.recv_ready():
                    out.write(chan.recv(_CHUNK))
                    got = True
                if chan.recv_stderr_ready():
                    err.write(chan.recv_stderr(_CHUNK))
                    got = True
                if not got:
                    if chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
                        break
                    time.sleep(0.01)
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())) or chan.exit_status == -1:
                raise self._lost()
            return chan.exit_status, out.getvalue(), err.getvalue()
        except (TimeoutError, paramiko.SSHException, EOFError, OSError) as e:
            if not self.transport.is_active():
                raise self._lost() from None
            raise RemoteError("protocol", f"helper command failed on {self.target.address}: {e}") from None
        finally:
            chan.close()

    def _collect(self, command: str, *, stdin: bytes | None = None) -> tuple[int, list[bytes], list[bytes]]:
        out: list[bytes] = []
        err: list[bytes] = []

        def collect(stream: str, line: bytes) -> None:
            (out if stream == "out" else err).append(line)

        code = self.run(command, collect, stdin=stdin)
        return code, out, err

    def read_output(self, command: str) -> str:
        """Run a small command and return its stdout (lines joined by ``\\n``).

        Raises RemoteError("protocol") on a non-zero exit, naming the command and
        the last stderr lines.
        """
        code, out, err = self._collect(command)
        if code != 0:
            raise RemoteError("protocol", f"`{command}` failed on {self.target.address} (exit {code}){_tail(err)}")
        return "\n".join(line.decode("utf-8", "replace") for line in out)

    # ---- files

    def put_archive(self, data_or_path: bytes | str | os.PathLike, remote_dir: str) -> None:
        """Unpack a tar archive (bytes or a local file path) into ``remote_dir``.

        ``remote_dir`` is replaced if it exists. Its parent is created (mode 700)
        and must be a real directory owned by the login user (guards against a
        pre-planted directory or symlink in a shared /tmp). The archive goes by
        SFTP to a temporary file next to it (or through stdin if the node has no
        SFTP subsystem). Raises RemoteError("ship") on failure.
        """
        remote_dir = _check_remote_dir(remote_dir)
        where = self.target.address
        parent = posixpath.dirname(remote_dir)
        tmp = f"{parent}/.upload-{secrets.token_hex(8)}.tar"
        qp, qd, qt = shlex.quote(parent), shlex.quote(remote_dir), shlex.quote(tmp)
        code, _, err = self._collect(f"mkdir -p -m 700 -- {qp} && test -d {qp} && test ! -h {qp} && test -O {qp}")
        if code != 0:
            raise RemoteError(
                "ship",
                f"cannot use {parent} on {where}: it must be a directory owned by {self.target.user!r}{_tail(err)}",
            )
        if isinstance(data_or_path, (bytes, bytearray, memoryview)):
            payload: bytes | None = bytes(data_or_path)
            local_path = None
        else:
            payload = None
            local_path = os.fspath(data_or_path)
            if not os.path.isfile(local_path):
                raise RemoteError("ship", f"source archive {local_path} does not exist")
        try:
            try:
                sftp = self._alive_transport().open_sftp_client()
            except paramiko.SSHException:
                sftp = None  # no SFTP subsystem: fall back to cat over stdin
            if sftp is not None:
                try:
                    if payload is not None:
                        sftp.putfo(io.BytesIO(payload), tmp, confirm=True)
                    else:
                        sftp.put(local_path, tmp, confirm=True)
                    sftp.chmod(tmp, 0o600)
                finally:
                    sftp.close()
            else:
                if payload is None:
                    with open(local_path, "rb") as f:
                        payload = f.read()
                code, _, err = self._collect(f"umask 077 && cat > {qt}", stdin=payload)
                if code != 0:
                    raise RemoteError("ship", f"copying the source to {where}:{tmp} failed{_tail(err)}")
        except (paramiko.SSHException, EOFError, OSError) as e:
            if not self.transport.is_active():
                raise RemoteError("disconnected", f"connection to {where} dropped while copying the source") from None
            raise RemoteError("ship", f"copying the source to {where}:{tmp} failed: {e}") from None
        code, _, err = self._collect(
            f"rm -rf -- {qd} && mkdir -m 700 -- {qd} && tar -x -f {qt} -C {qd}; rc=$?; rm -f -- {qt}; exit $rc"
        )
        if code != 0:
            raise RemoteError(
                "ship", f"unpacking the source into {where}:{remote_dir} failed (exit {code}){_tail(err)}"
            )

    def remove_dir(self, remote_dir: str) -> None:
        """``rm -rf`` a directory on the node (refuses shallow/relative paths)."""
        remote_dir = _check_remote_dir(remote_dir)
        code, _, err = self._collect(f"rm -rf -- {shlex.quote(remote_dir)}")
        if code != 0:
            raise RemoteError("protocol", f"cannot remove {remote_dir} on {self.target.address}{_tail(err)}")


def _tail(err_lines: list[bytes], n: int = 5) -> str:
    lines = [line.decode("utf-8", "replace") for line in err_lines[-n:] if line.strip()]
    return (": " + " | ".join(lines)) if lines else ""
