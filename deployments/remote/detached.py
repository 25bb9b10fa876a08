"""A run on the node that outlives the SSH session: started detached, followed by byte offset.

No Django here.

``nixos-rebuild`` is not a child of the SSH session: the session that ships
the source starts it in a session of its own (``setsid``; ``systemd-run``
where the node runs systemd and we are root there), with its stdout and
stderr going to files in the run's folder, and an exit-status file written
when it ends. The panel then follows the two files by byte offset over SSH.
A dropped connection loses nothing on the node: the panel reconnects (with
back-off, for up to ``Target.reconnect_for`` seconds) and resumes at the
offsets of the last whole line it delivered, so every line arrives exactly
once, and it takes the real exit status from the file. Only a node that stays
unreachable past that limit ends the follow (RemoteError ``disconnected``);
the folder stays on the node until the panel has read the outcome
(``reconcile_run``).

The run's folder ``W`` (``/tmp/nixos-panel-<user>/deploy-<id>-<nonce>``)::

    W.owner     the run's process group (the shipping session's until the run starts)
    W/src/      the flake source
    W/out       the run's stdout        W/err    its stderr
    W/pgid      its process group (it leads a session of its own)
    W/unit      its systemd unit, on a node where systemd-run started it
    W/status    its exit status, written (write, then rename) when it ends

A cancel (or the worker's timeout) sends SIGTERM to the run's process group
(and its unit), then SIGKILL after ``stream.CANCEL_GRACE_SECONDS``, and keeps
following until the run is gone.
"""

from __future__ import annotations

import posixpath
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko

from . import stream
from .connection import Cancelled, Connection, RemoteError, Target, keepalive_interval
from .system import parse_state, state_script

__all__ = [
    "FOLLOW_MARK",
    "OWNER_SUFFIX",
    "Link",
    "RunHandle",
    "RunReport",
    "check_remote_dir",
    "follow_lines",
    "follow_run",
    "inspect_run",
    "launch_script",
    "reconcile_run",
    "remove_script",
]

# Next to each run's folder: the process group of the run that owns it.
OWNER_SUFFIX = ".owner"
# Kinds of RemoteError after which reconnecting may help.
TRANSIENT_KINDS = ("disconnected", "unreachable", "unknown-host", "not-ssh", "protocol")
# First and longest pause between reconnect attempts (doubling in between).
RECONNECT_FIRST_DELAY = 1.0
RECONNECT_MAX_DELAY = 10.0
# The follow command's first line on each stream; what comes before it is login noise.
FOLLOW_MARK = b"__NIXOS_PANEL_FOLLOW__"
# The run did not write its process group within this long after it was started.
LAUNCH_WAIT_SECONDS = 10
# How often the node's tail looks whether the watcher (and so the run) has ended: a syscall, no process.
TAIL_INTERVAL = "0.01"
# Exit codes of the node-side scripts.
# What the follow command says, instead of its start mark, when it cannot follow.
_GONE_MARK = b"__NIXOS_PANEL_GONE__"  # the run's folder is not there
_NO_FOLLOW_MARK = b"__NIXOS_PANEL_NO_FOLLOW__"  # this tail cannot follow (--pid and -f are GNU's): poll instead
# The follow command's exit status once the run has ended: the run's, or this when it has none (or it is 255).
_NO_STATUS_EXIT = 255
_POLL_INTERVAL = 1.0  # seconds between reads when the node's tail cannot follow
_INSPECT_KEYS = ("exists", "status", "pgid", "alive", "unit", "toplevel", "removed", "magic")


def _q(path: str) -> str:
    return shlex.quote(path)


def check_remote_dir(remote_dir: str) -> str:
    """Refuse paths that would make ``rm -rf``/``mkdir`` dangerous; return the normalised path."""
    if not isinstance(remote_dir, str) or "\x00" in remote_dir or "\n" in remote_dir:
        raise ValueError("invalid remote directory")
    norm = posixpath.normpath(remote_dir)
    if not norm.startswith("/") or norm.startswith("//") or len([p for p in norm.split("/") if p]) < 2:
        raise ValueError(f"refusing remote directory {remote_dir!r}: must be absolute and at least two levels deep")
    return norm


@dataclass
class RunHandle:
    """A detached run on the node: its folder, process group and (systemd-run) unit."""

    workdir: str
    pgid: int
    unit: str = ""


@dataclass
class RunReport:
    """What the node says about a detached run (``inspect``)."""

    exists: bool  # its folder is there
    running: bool  # its process group is alive
    exit_status: int | None  # from the status file; None while running, or if it was killed
    ended_at: int | None  # the status file's time (seconds since the epoch)
    out_size: int
    err_size: int
    pgid: int | None
    unit: str
    toplevel: str  # what ``resolve`` points at ('' if nothing, or not asked)
    generation: int | None
    profile_path: str
    current_system: str
    removed: bool = False  # the folder was removed after this was read (``finish_script``)
    magic: str = ""  # an armed run's decision (``confirm``: confirmed, rolled-back …), '' if none

    @property
    def ended(self) -> bool:
        return self.exists and (self.exit_status is not None or not self.running)


# -- node-side scripts --------------------------------------------------------------------


def launch_script(target: Target, workdir: str, invocation: str, plain_invocation: str, unit: str, pw_var: str) -> str:
    """Shell (run from inside ``workdir``) that starts the run detached and returns once ``pgid`` holds its
    process group.

    ``invocation`` is the command as the login user runs it (with the sudo
    prefix, if any); ``plain_invocation`` the same without it, for a
    systemd-run unit that already runs as root. The sudo password, if any, is
    in shell variable ``pw_var`` and reaches sudo (or systemd-run's sudo) on a
    pipe, never on a command line. Started with ``setsid``, the run is the
    background job ``$!`` (a background job of a shell without job control
    leads no group, so setsid does not fork: ``$!`` leads the new session).
    Under systemd-run the unit's shell writes ``pgid`` itself (exit 95 if it
    does not within ``LAUNCH_WAIT_SECONDS``; 94 if systemd-run refused). When
    the run ends it writes ``status``, then wakes its followers through the
    FIFO ``end`` (opened read-write, so it never blocks without one; a line
    for each of up to eight followers).
    """
    w = workdir
    secret = target.privileged_stdin() is not None

    def inner(command: str, stdin: str, own_pgid: bool) -> str:
        # Runs detached: runs the command into the files, then writes the status and wakes the followers.
        return (
            f"cd {_q(w)} || exit 1; "
            + ("echo $$ > pgid.new && mv -f pgid.new pgid || exit 1; " if own_pgid else "")
            + f"cd src || exit 1; {command} >{_q(w + '/out')} 2>{_q(w + '/err')} {stdin}; "
            f"c=$?; echo $c > {_q(w + '/status.new')} && mv -f {_q(w + '/status.new')} {_q(w + '/status')}; "
            f"{{ exec 3<>{_q(w + '/end')} && printf '\\n\\n\\n\\n\\n\\n\\n\\n' >&3; }} 2>/dev/null; exit $c"
        )

    feed = f"printf '%s\\n' \"${pw_var}\" | " if secret else ""
    setsid_start = (
        f"{feed}setsid sh -c {_q(inner(invocation, '' if secret else '</dev/null', False))} "
        f"{'' if secret else '</dev/null '}>/dev/null 2>&1 & echo $! > pgid"
    )
    # systemd-run: where the node runs systemd and we are root there (or may become root with sudo).
    root = "true" if target.sudo else '[ "$(id -u)" = 0 ]'
    systemd_start = (
        f"echo {_q(unit)} > unit && "
        f"{feed}{target.privileged_prefix()}systemd-run --unit={_q(unit)} --quiet --collect "
        f'--setenv=PATH="$PATH" --setenv=HOME="${{HOME:-/root}}" '
        f"sh -c {_q(inner(plain_invocation, '</dev/null', True))} </dev/null >/dev/null 2>launch.err "
        "|| { cat launch.err >&2; exit 94; }"
    )
    return "\n".join(
        [
            "mkfifo -m 600 end || exit",
            "if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1 && "
            f"{root}; then {systemd_start}; else {setsid_start}; fi",
            "i=0; while [ ! -s pgid ]; do i=$((i + 1)); "
            f"if [ $i -gt {LAUNCH_WAIT_SECONDS * 50} ]; then "
            f"echo 'the detached run did not start within {LAUNCH_WAIT_SECONDS} s' >&2; exit 95; fi; sleep 0.02; done",
        ]
    )


def _alive_test(pgid_expr: str) -> str:
    """Shell: true while process group ``pgid_expr`` has a process that is not a zombie (a killed run's
    processes stay zombies until init reaps them). The group's leader (its pid is the group's id) running
    answers at once, read from ``/proc`` by a builtin: the follower asks every second of a run, and
    ``ps -e`` reads every process of the node (~10 ms). Only when the leader is gone or a zombie does it
    look for the group's other processes with ``ps``; without ``ps``: ``kill -0``, where another user's
    group answers EPERM (alive)."""
    return (
        f'{{ __s=; {{ read -r __s < "/proc/{pgid_expr}/stat"; }} 2>/dev/null; case ${{__s##*") "}} in [!Z]*) true ;; *) '
        "if l=$(ps -e -o pgid= -o stat= 2>/dev/null); then "
        f"printf '%s\\n' \"$l\" | awk -v g=\"{pgid_expr}\" '$1 == g && $2 !~ /^Z/ {{ f = 1 }} END {{ exit !f }}'; "
        f'else e=$(LC_ALL=C kill -0 "-{pgid_expr}" 2>&1) || case $e in *"No such process"*) false ;; *) true ;; esac; '
        "fi ;; esac; }"
    )


def follow_script(run: RunHandle, out_offset: int, err_offset: int, *, live: bool = True) -> str:
    """Shell that writes the run's stdout file from byte ``out_offset`` on stdout and its stderr file from
    ``err_offset`` on stderr, each after a ``FOLLOW_MARK`` line, and (``live``) keeps following both until
    the run has ended (status file written, or its process group gone), then exits."""
    return follow_lines(run.workdir, str(int(run.pgid)), out_offset, err_offset, live=live)


def follow_lines(workdir: str, pgid: str, out_offset: int, err_offset: int, *, live: bool = True) -> str:
    """``follow_script`` for process group ``pgid`` (a number, or a shell expression such as ``$g``)."""
    w = _q(workdir)
    o, e = int(out_offset) + 1, int(err_offset) + 1
    mark = FOLLOW_MARK.decode()
    lines = [f"cd {w} || {{ echo {_GONE_MARK.decode()}; exit 1; }}"]
    if not live:
        lines += [
            f"echo {mark}; echo {mark} >&2",
            f"tail -c +{o} out 2>/dev/null; tail -c +{e} err >&2 2>/dev/null; exit {_NO_STATUS_EXIT}",
        ]
        return "\n".join(lines)
    lines += [
        # GNU tail (every NixOS has it) follows with -f until --pid's process is gone, then reads once more.
        f"tail -s {TAIL_INTERVAL} --pid=$$ -c +1 /dev/null >/dev/null 2>&1 || "
        f"{{ echo {_NO_FOLLOW_MARK.decode()}; exit 1; }}",
        f"echo {mark}; echo {mark} >&2",
        # The watcher: until the status file is there, or the run's group is gone. The run wakes it
        # through the FIFO when it ends; without a wake-up it looks again every second.
        # It holds the FIFO open itself before it looks at the status, so no wake-up is lost in between.
        "( if [ -p end ] && command -v timeout >/dev/null 2>&1 && exec 3<>end; then "
        "nap() { timeout 1 sh -c 'read x' <&3; }; else nap() { sleep 1; }; fi; "
        f"while [ ! -e status ]; do nap; [ -e status ] || {_alive_test(pgid)} || break; done ) "
        "</dev/null >/dev/null 2>&1 &",
        "w=$!",
        f"tail -s {TAIL_INTERVAL} --pid=$w -c +{o} -f out 2>/dev/null &",
        f"tail -s {TAIL_INTERVAL} --pid=$w -c +{e} -f err >&2 2>/dev/null &",
        # Once both tails are done the run has ended: its exit status is this command's.
        "wait; s=; [ -f status ] && read -r s < status",
        f"case $s in ''|*[!0-9]*) exit {_NO_STATUS_EXIT} ;; esac; "
        f'[ "$s" -lt {_NO_STATUS_EXIT} ] && exit "$s"; exit {_NO_STATUS_EXIT}',
    ]
    return "\n".join(lines)


def inspect_script(workdir: str, resolve: str | None) -> str:
    """Shell that prints ``<key> <value>`` lines about the run in ``workdir`` (see ``_INSPECT_KEYS``; the
    sizes and times of its files as ``file <path> <bytes> <mtime>``), the target of ``resolve``
    (``toplevel``), then the node's system state (three ``state`` lines). Few processes: it runs at the
    end of every deployment."""
    w = _q(check_remote_dir(workdir))
    # A system is a directory: ``cd -P`` (a builtin, in a subshell) resolves it as ``readlink -f`` would.
    t = (
        f't=; if [ -e {_q(resolve)} ]; then t=$(cd -P {_q(resolve)} 2>/dev/null && echo "$PWD" || '
        f"readlink -f {_q(resolve)} 2>/dev/null); fi; "
        if resolve
        else "t=; "
    )
    return (
        f"if [ -d {w} ]; then echo 'exists 1'; else echo 'exists 0'; fi; "
        f's=; [ -f {w}/status ] && read -r s < {w}/status; echo "status $s"; '
        f"stat -c 'file %n %s %Y' {w}/status {w}/out {w}/err 2>/dev/null; "
        f'g=; [ -f {w}/pgid ] && read -r g < {w}/pgid; echo "pgid $g"; '
        # Only a run without a status needs the process table.
        f"case $s$g in ''|*[!0-9]*) a=0 ;; *) if [ -z \"$s\" ] && {_alive_test('$g')}; then a=1; else a=0; fi ;; esac; "
        'echo "alive $a"; '
        f'u=; [ -f {w}/unit ] && read -r u < {w}/unit; echo "unit $u"; '
        f'm=; [ -f {w}/magic ] && read -r m < {w}/magic; echo "magic $m"; '
        f"{t}" + 'echo "toplevel $t"; ' + state_script("state ")
    )


def finish_script(workdir: str, resolve: str | None, out_size: int, err_size: int) -> str:
    """``inspect_script``, then the run's folder removed if its files hold exactly ``out_size`` and
    ``err_size`` bytes (all of it was received); ``removed 1`` or ``removed 0``. For a run whose exit
    status the panel already has (the follow command's own): it reads the rest and clears up at once."""
    w = _q(check_remote_dir(workdir))
    return (
        inspect_script(workdir, resolve)
        + f'; if [ -d {w} ] && [ "$(stat -c %s {w}/out {w}/err 2>/dev/null)" = "{int(out_size)}\n{int(err_size)}" ] '
        f"&& {{ {remove_script(workdir)}; }}; "
        "then echo 'removed 1'; else echo 'removed 0'; fi"
    )


def remove_script(workdir: str) -> str:
    """Shell that removes a run's folder, then its owner file (so a folder never outlives its owner file)."""
    workdir = check_remote_dir(workdir)
    return f"rm -rf -- {_q(workdir)} && rm -f -- {_q(workdir + OWNER_SUFFIX)}"


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def _parse_report(text: str) -> RunReport:
    values: dict[str, str] = {}
    files: dict[str, tuple[int | None, int | None]] = {}
    state: list[str] = []
    for line in text.split("\n"):
        key, _, value = line.partition(" ")
        if key == "state":
            state.append(value)
        elif key == "file":
            path, size, mtime = (value.rsplit(" ", 2) + ["", ""])[:3]
            files[path.rsplit("/", 1)[-1]] = (_int(size), _int(mtime))
        elif key in _INSPECT_KEYS and key not in values:
            values[key] = value
    system = parse_state(state)
    return RunReport(
        exists=values.get("exists") == "1",
        running=values.get("alive") == "1",
        exit_status=_int(values.get("status", "")),
        ended_at=files.get("status", (None, None))[1],
        out_size=files.get("out", (0, None))[0] or 0,
        err_size=files.get("err", (0, None))[0] or 0,
        pgid=_int(values.get("pgid", "")),
        unit=values.get("unit", "").strip(),
        toplevel=values.get("toplevel", "").strip(),
        generation=system.generation,
        profile_path=system.profile_path,
        current_system=system.current_system,
        removed=values.get("removed") == "1",
        magic=values.get("magic", "").strip(),
    )


def inspect(conn: Connection, workdir: str, resolve: str | None = None) -> RunReport:
    """What the node says about the run in ``workdir`` and about its system, in one command."""
    return _parse_report(stream.read_output(conn, inspect_script(workdir, resolve)))


def finish(conn: Connection, workdir: str, resolve: str | None, out_size: int, err_size: int) -> RunReport:
    """``inspect``, and the folder removed in the same command if all its output was received."""
    return _parse_report(stream.read_output(conn, finish_script(workdir, resolve, out_size, err_size)))


# -- the connection, re-opened when it drops ------------------------------------------------


class Link:
    """The connection to one node, re-opened with back-off when it drops.

    ``conn`` is the current connection. ``reconnect(error)`` closes it and
    tries again, first after ``RECONNECT_FIRST_DELAY`` seconds, doubling up to
    ``RECONNECT_MAX_DELAY``; once the node has been unreachable for
    ``target.reconnect_for`` seconds it raises RemoteError ``disconnected``. A
    reconnect that meets another host key, or a refused login, raises that at
    once: it is not a link problem.
    """

    def __init__(
        self,
        target: Target,
        note: Callable[[str], None],
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.note = note
        self.conn: Connection | None = None
        self._sleep = sleep
        self._clock = clock
        self.reconnects = 0

    def open(self) -> Connection:
        conn = Connection(self.target)
        conn.open()
        self.conn = conn
        return conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def reconnect(self, error: RemoteError, what: str = "") -> Connection:
        if error.kind not in TRANSIENT_KINDS:
            raise error
        self.close()
        t = self.target
        lost_at = self._clock()
        self.note(
            f"lost the connection to {t.address}{what}: {error.message}; "
            f"reconnecting for up to {t.reconnect_for:g} s (the run goes on on the node)"
        )
        delay = RECONNECT_FIRST_DELAY
        attempt = 0
        last = error
        while True:
            self._sleep(delay)
            attempt += 1
            try:
                conn = self.open()
            except RemoteError as e:
                if e.kind not in TRANSIENT_KINDS:
                    raise
                last = e
            else:
                self.reconnects += 1
                self.note(f"reconnected to {t.address} after {self._clock() - lost_at:.1f} s (attempt {attempt})")
                return conn
            elapsed = self._clock() - lost_at
            if elapsed + delay >= t.reconnect_for:
                raise RemoteError(
                    "disconnected",
                    f"{t.address} stayed unreachable for {elapsed:.0f} s after the connection dropped "
                    f"(last attempt: {last.message}); the run may still be going on on the node: "
                    "reconcile the deployment once the node is back",
                )
            delay = min(delay * 2, RECONNECT_MAX_DELAY)


# -- following -----------------------------------------------------------------------------


@dataclass
class _Stream:
    """One of the run's two files as delivered so far: ``offset`` bytes as whole lines, then ``partial``."""

    offset: int = 0
    partial: bytes = b""
    prelude: bytes | None = b""  # before FOLLOW_MARK in this pass (None: the mark was seen)


@dataclass
class _Follow:
    link: Link
    run: RunHandle | None  # None until the start command has started it
    on_output: stream.OutputCallback
    note: Callable[[str], None]
    should_cancel: Callable[[], bool] | None
    resolve: str | None
    clock: Callable[[], float] = time.monotonic
    streams: dict[str, _Stream] = field(default_factory=lambda: {"out": _Stream(), "err": _Stream()})
    kill_stage: int = 0  # 0 none, 1 TERM sent, 2 KILL sent
    kill_at: float = 0.0
    last_heard: float = 0.0
    live: bool = True
    on_prelude: stream.OutputCallback | None = None  # the start command's lines before the follow mark
    gone: bool = False  # the follow command found no folder
    no_follow: bool = False  # the follow command's tail cannot follow

    # The pass's data, in arrival order; whole lines are delivered, the offsets move with them.
    def data(self, name: str, chunk: bytes) -> None:
        self.last_heard = self.clock()
        s = self.streams[name]
        if s.prelude is not None:
            s.prelude += chunk
            while s.prelude is not None and (nl := s.prelude.find(b"\n")) >= 0:
                line, s.prelude = s.prelude[:nl], s.prelude[nl + 1 :]
                if line == FOLLOW_MARK:
                    chunk, s.prelude = s.prelude, None
                elif line == _GONE_MARK and self.run is not None:
                    self.gone = True
                elif line == _NO_FOLLOW_MARK and self.run is not None:
                    self.no_follow = True
                elif self.on_prelude is not None and not line.startswith(stream.PGID_MARK):
                    self.on_prelude(name, line)
            if s.prelude is not None:
                s.prelude = s.prelude[-65536:]
                return
        data = s.partial + chunk
        lines = data.split(b"\n")
        s.partial = lines.pop()
        on_output = self.on_output
        for line in lines:
            on_output(name, line)
            s.offset += len(line) + 1

    def tick(self) -> None:
        now = self.clock()
        conn = self.link.conn
        if self.run is None:
            pass  # still shipping: a cancel waits until there is a run to stop
        elif self.kill_stage == 0 and self.should_cancel is not None and self.should_cancel():
            self.note(f"stopping the run on the node: SIGTERM to its process group {self.run.pgid}")
            stream.signal_group(conn, self.run.pgid, "TERM", self.run.unit or None)
            self.kill_stage, self.kill_at = 1, now
        elif self.kill_stage == 1 and now - self.kill_at >= stream.CANCEL_GRACE_SECONDS:
            self.note(f"the run outlived SIGTERM by {stream.CANCEL_GRACE_SECONDS:g} s: SIGKILL")
            stream.signal_group(conn, self.run.pgid, "KILL", self.run.unit or None)
            self.kill_stage = 2
        # A read timeout: a node silent for a third of link_timeout must answer a channel open (no
        # process starts on the node for it) within the rest, or the link is taken for dead.
        quiet = keepalive_interval(conn.target.link_timeout)
        if now - self.last_heard >= quiet:
            wait = max(1.0, conn.target.link_timeout - quiet)
            try:
                conn.transport.open_session(timeout=wait).close()
            except (paramiko.SSHException, EOFError, OSError):
                raise RemoteError(
                    "disconnected", f"{conn.target.address} did not answer for {self.clock() - self.last_heard:.0f} s"
                ) from None
            self.last_heard = self.clock()

    def one_pass(self, start: tuple[str, bytes] | None = None) -> int:
        """Stream the files from the offsets until the run has ended (live), or once (polling). With
        ``start``, run that command (it starts the run, then follows it) instead."""
        for s in self.streams.values():
            s.partial, s.prelude = b"", b""
        self.last_heard = self.clock()
        conn = self.link.conn
        if not self.live:
            self.tick()
        if start is not None:
            command, stdin = start
        else:
            command, stdin = follow_script(self.run, *self.offsets(), live=self.live), None
        self.gone = self.no_follow = False
        code = stream.run_command(conn, command, self.data, stdin=stdin, on_tick=self.tick, raw=True)
        if start is not None and self.run is None:
            return code  # it started nothing: the caller says why
        if self.gone:
            raise _Gone()
        if self.no_follow:
            self.note("the node's tail cannot follow a file (needs GNU coreutils): reading every second instead")
            self.live = False
            return _NO_STATUS_EXIT
        if any(s.prelude is not None for s in self.streams.values()):
            raise RemoteError(
                "protocol", f"the follow command on {conn.target.address} printed no start mark (exit {code})"
            )
        return code

    def received(self) -> tuple[int, int]:
        """Bytes of each file received (delivered as lines, or held as the last, unfinished one)."""
        out, err = self.streams["out"], self.streams["err"]
        return out.offset + len(out.partial), err.offset + len(err.partial)

    def offsets(self) -> tuple[int, int]:
        return self.streams["out"].offset, self.streams["err"].offset

    def received_all(self, report: RunReport) -> bool:
        return (report.out_size, report.err_size) == self.received()

    def finish_lines(self) -> None:
        """The run has ended: its last line without a newline is a line too."""
        for name, s in self.streams.items():
            if s.partial:
                line, s.partial = s.partial, b""
                self.on_output(name, line)
                s.offset += len(line)


class _Gone(Exception):
    """The run's folder is not on the node."""


class NotStarted(Exception):
    """The start command ended without starting the run; ``code`` is its exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exit {code}")
        self.code = code


def follow_run(
    link: Link,
    run: RunHandle,
    *,
    on_output: stream.OutputCallback,
    note: Callable[[str], None],
    should_cancel: Callable[[], bool] | None = None,
    resolve: str | None = None,
    offsets: tuple[int, int] = (0, 0),
    start: tuple[str, bytes] | None = None,
    on_prelude: stream.OutputCallback | None = None,
    launched: Callable[[], RunHandle | None] | None = None,
    before_finish: Callable[[], None] | None = None,
) -> RunReport:
    """Follow ``run`` until it ends; deliver its lines exactly once; return the node's report.

    With ``start`` = (command, stdin) and ``run`` None, first run ``command``:
    it starts the run and goes on as ``follow_script`` from offset 0 (the
    ship-and-launch command). Its lines before the follow mark go to
    ``on_prelude``; ``launched()`` gives the run once the prelude said it
    started. If the link drops before that, the command is run again (it must
    start nothing twice); if it ends without starting the run,
    :class:`NotStarted` is raised with its exit status.

    * Lines go to ``on_output("out"|"err", line)`` in arrival order, from byte
      ``offsets`` of the two files; a drop of the link resumes at the last
      whole line delivered (``link.reconnect``).
    * ``should_cancel`` is polled; when it says so the run's process group gets
      SIGTERM, then SIGKILL after ``stream.CANCEL_GRACE_SECONDS``; once the run
      is gone :class:`Cancelled` is raised (unless it had ended by itself first).
    * Raises RemoteError ``disconnected`` when the node stays unreachable past
      ``target.reconnect_for``, ``killed`` when the run ended without an exit
      status nobody here asked for, ``protocol`` when its folder is gone.
    """
    f = _Follow(link, run, on_output, note, should_cancel, resolve)
    f.streams["out"].offset, f.streams["err"].offset = offsets
    if start is not None:

        def prelude(name: str, line: bytes) -> None:
            on_prelude(name, line)
            if f.run is None and launched is not None:
                f.run = launched()

        f.on_prelude = prelude
    status: int | None = None  # the run's exit status, as the follow command said it
    while True:
        try:
            if status is None:
                if f.run is None:
                    code = f.one_pass(start)
                    if f.run is None:
                        raise NotStarted(code)
                else:
                    code = f.one_pass()
                f.on_prelude = None
                if f.live and code != _NO_STATUS_EXIT:
                    status = code
            if status is not None:
                if before_finish is not None:
                    # Whoever still reads the run's folder (an armed run's confirmation) is done before it goes.
                    before_finish()
                    before_finish = None
                # Ended with a status: read the rest and clear up in one command, if all output is in.
                report = finish(link.conn, f.run.workdir, resolve, *f.received())
                if report.exists and not report.removed:
                    status = None
                    continue  # written after the follower's last read: catch up from the offsets
                report.exit_status, report.removed = status, True
                f.finish_lines()
                return report
            report = inspect(link.conn, f.run.workdir, resolve)
        except _Gone:
            raise RemoteError(
                "protocol", f"the run's folder {f.run.workdir} is gone from {link.target.address}"
            ) from None
        except RemoteError as e:
            if e.kind != "disconnected":
                raise
            if f.run is None:
                link.reconnect(e, " while shipping the source")
                continue
            f.on_prelude = None
            link.reconnect(e, " while following the run")
            if status is None:
                out, err = f.streams["out"], f.streams["err"]
                note(f"resuming the run's output at byte {out.offset} of stdout and {err.offset} of stderr")
            continue
        if not report.exists:
            raise RemoteError("protocol", f"the run's folder {f.run.workdir} is gone from {link.target.address}")
        if not f.received_all(report):
            continue  # written after the follower's last read: catch up from the offsets
        if report.ended:
            f.finish_lines()
            if report.exit_status is None:
                if f.kill_stage:
                    raise Cancelled(f"the run on {link.target.address} was stopped")
                raise RemoteError(
                    "killed",
                    f"the run on {link.target.address} ended without an exit status: "
                    "something on the node killed it before it finished",
                )
            return report
        if not f.live:
            time.sleep(_POLL_INTERVAL)


def remove_run(conn: Connection, workdir: str) -> None:
    """Remove the run's folder (the panel has read its outcome)."""
    stream.read_output(conn, remove_script(workdir))


def inspect_run(target: Target, workdir: str, resolve: str | None = None) -> RunReport:
    """Connect and ask the node about the run in ``workdir`` (nothing is changed)."""
    with Connection(target) as conn:
        return inspect(conn, workdir, resolve)


def reconcile_run(
    target: Target, workdir: str, record: Callable[[RunReport], bool], resolve: str | None = None
) -> RunReport:
    """Ask the node about the run in ``workdir``, hand the report to ``record``, and if it returns True
    (the outcome is stored for good) remove the run's folder. Returns the report.

    The folder is removed only after ``record`` returned, so an outcome is
    never lost between the node and the panel; a removal that fails is left
    to the next run's sweep (best effort).
    """
    with Connection(target) as conn:
        report = inspect(conn, workdir, resolve)
        if record(report) and report.exists and report.ended:
            try:
                remove_run(conn, workdir)
            except RemoteError:
                pass
        return report
