"""Running a command on a node: stdout and stderr streamed apart, line by line, cancellable.

No Django here.

* Commands run without a PTY; stdout and stderr are read separately, in the
  order the SSH packets arrived, until EOF, and only then is the exit status
  taken (a loop that stops at ``exit_status_ready()`` loses the last lines).
* Every command runs in its own process group so a cancel can kill the whole
  tree (``kill -- -<pgid>``) through a second channel.
"""

from __future__ import annotations

import collections
import shlex
import threading
import time
from collections.abc import Callable

import paramiko

from .connection import Cancelled, Connection, RemoteError

__all__ = ["CANCEL_GRACE_SECONDS", "OutputCallback", "read_output", "run_command", "signal_group", "stderr_tail"]

# on_output(stream, line): stream is "out" or "err" ("sys" for the panel's own progress lines).
OutputCallback = Callable[[str, bytes], None]

# The wrapper's first stderr line; run_command() consumes it and never delivers it.
_PGID_MARK = PGID_MARK = b"__NIXOS_PANEL_PGID__ "
# After SIGTERM to the remote group, how long to wait before SIGKILL.
CANCEL_GRACE_SECONDS = 5.0
# How long the kill command itself may take on the node.
_SIGNAL_TIMEOUT_SECONDS = 10.0


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
    """Turns channel data into lines for ``on_output``; consumes the PGID line.

    ``raw``: ``on_output`` gets the data as it arrived, in chunks of any size
    (the PGID line included), and nothing is split or held back.
    """

    def __init__(self, chan: paramiko.Channel, on_output: OutputCallback, raw: bool = False) -> None:
        self.chan = chan
        self.on_output = on_output
        self.raw = raw
        self.log = _ArrivalLog(chan)
        self.partial = {"out": b"", "err": b""}
        self.pgid: int | None = None
        self._looking_for_pgid = not raw
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
        if self.raw:
            if chunks:
                self.on_output(name, b"".join(chunks))
            return
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
    command's (util-linux's setsid exits with the raw wait status of a child
    killed by a signal: N for signal N). Inside the new session ``$$`` of the
    ``sh`` is the process group id. Without setsid (unusual), sshd's own session
    child already leads a process group, so ``$$`` is still right.

    The setsid process costs a fork and an exec per command, but it is what
    stays outside the group when the group is killed: without it a command
    whose last program dies of a signal has no exit status at all (sshd sends
    the signal instead, which paramiko does not read), and the connection
    would look lost.
    """
    inner = shlex.quote(f'printf "{_PGID_MARK.decode()}%s\\n" "$$" >&2; exec sh -c "$1"')
    cmd = shlex.quote(command)
    return (
        f"if command -v setsid >/dev/null 2>&1; then exec setsid -w sh -c {inner} sh {cmd}; "
        f"else exec sh -c {inner} sh {cmd}; fi"
    )


def run_command(
    conn: Connection,
    command: str,
    on_output: OutputCallback,
    *,
    stdin: bytes | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_tick: Callable[[], None] | None = None,
    raw: bool = False,
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
    * ``on_tick()`` (if given) is called about every ``poll`` seconds on the
      calling thread, whatever arrives; it may raise to end the command (the
      channel is closed; the remote command is left to itself).
    * ``raw``: ``on_output(stream, data)`` gets the bytes as they arrived, in
      chunks, not split into lines (the wrapper's PGID line is left in).
    * Both streams are read to EOF before the exit status is taken.
    * Raises RemoteError("disconnected") if the connection drops mid-run.
    """
    chan = conn.open_channel()
    tr = conn.transport
    try:
        reader = _Reader(chan, on_output, raw)  # tap before exec: no data can be missed
        try:
            chan.exec_command(_wrap_in_process_group(command))
        except (paramiko.SSHException, EOFError, OSError) as e:
            if not tr.is_active():
                raise conn.lost() from None
            raise RemoteError("protocol", f"{conn.target.address} refused to run a command: {e}") from None
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
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + poll
                if on_tick is not None:
                    on_tick()
                if should_cancel is not None and should_cancel():
                    _cancel(conn, chan, reader)
            if not tr.is_active() and not reader.log.entries and not reader.log.eof:
                raise conn.lost()
        reader.flush()

        # EOF on both streams; the process may still be running (it closed its
        # output), so wait for the exit status, still honouring cancel.
        while not chan.status_event.wait(poll):
            if on_tick is not None:
                on_tick()
            if should_cancel is not None and should_cancel():
                _cancel(conn, chan, reader)
            if not tr.is_active():
                raise conn.lost()
        if chan.exit_status == -1:
            # Channel closed without exit-status: transport died or the session was torn down.
            raise conn.lost()
        return chan.exit_status
    finally:
        chan.close()


def read_output(conn: Connection, command: str) -> str:
    """Run a small command and return its stdout (lines joined by ``\\n``).

    Raises RemoteError("protocol") on a non-zero exit, naming the command and
    the last stderr lines.
    """
    out: list[bytes] = []
    err: list[bytes] = []
    code = run_command(conn, command, lambda stream, line: (out if stream == "out" else err).append(line))
    if code != 0:
        raise RemoteError("protocol", f"`{command}` failed on {conn.target.address} (exit {code}){stderr_tail(err)}")
    return "\n".join(line.decode("utf-8", "replace") for line in out)


def stderr_tail(err_lines: list[bytes], n: int = 5) -> str:
    """``": line | line"`` of the last ``n`` non-blank lines, to end an error message ('' if none)."""
    lines = [line.decode("utf-8", "replace") for line in err_lines[-n:] if line.strip()]
    return (": " + " | ".join(lines)) if lines else ""


def _cancel(conn: Connection, chan: paramiko.Channel, reader: _Reader) -> None:
    """Kill the remote process group (TERM, then KILL), drain output, raise Cancelled."""
    deadline = time.monotonic() + 2.0
    # The PGID line is the first thing the wrapper prints; give it a moment.
    while reader.pgid is None and not reader.done and time.monotonic() < deadline:
        reader.pump(0.05)

    def finished() -> bool:
        return reader.done and chan.status_event.is_set()

    if reader.pgid is not None and not finished():
        for sig in ("TERM", "KILL"):
            _signal_group(conn, reader.pgid, sig)
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
    raise Cancelled(f"command on {conn.target.address} cancelled")


def _signal_group(conn: Connection, pgid: int, sig: str) -> None:
    """Send ``sig`` to the remote process group through a second channel (best effort)."""
    signal_group(conn, pgid, sig)


def signal_group(conn: Connection, pgid: int, sig: str, unit: str | None = None) -> None:
    """Send ``sig`` (TERM, KILL) to remote process group ``pgid`` and, if given, every process of
    systemd ``unit``, through a channel of its own (best effort: a link that is gone says so elsewhere)."""
    if sig not in ("TERM", "KILL", "INT", "HUP"):
        raise ValueError(f"unexpected signal {sig!r}")
    # With sudo, as root first: that also reaches children running as root. If
    # sudo refuses, as the login user: that still reaches sudo itself (its real
    # uid is ours), which relays the signal to its child.
    kill = f"kill -s {sig} -- -{int(pgid)}"
    if unit:
        kill = f"{kill}; systemctl kill --signal={sig} -- {shlex.quote(unit)}"
    prefix = conn.target.privileged_prefix()
    command = f"{prefix}sh -c {shlex.quote(kill)} 2>/dev/null || {{ {kill}; }} 2>/dev/null" if prefix else kill
    try:
        chan = conn.open_channel()
    except RemoteError:
        return  # the link is gone; run_command reports that
    try:
        chan.exec_command(command)
        secret = conn.target.privileged_stdin()
        if secret:
            chan.sendall(secret)
        chan.shutdown_write()
        chan.status_event.wait(_SIGNAL_TIMEOUT_SECONDS)
    except (paramiko.SSHException, EOFError, OSError):
        pass  # the grace period and SIGKILL follow either way
    finally:
        chan.close()
