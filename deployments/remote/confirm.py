"""Magic rollback: an activation the panel must confirm over a new SSH connection, or the node reverts.

No Django here.

As deploy-rs does it (``activate.rs``: the activation waits for a confirmation
file, and without it by the deadline the profile is rolled back and the old
system activated), but inside the panel's detached run
(``detached.launch_script``), so it needs no panel to stay connected. When a
deployment is *armed*, the detached run's command is not ``nixos-rebuild
<action>`` alone but ``armed_command``: it notes the profile generation and
the current system, runs nixos-rebuild, and if that exited 0 it prints
``ARMED_MARK`` on stdout and waits, in the run's folder ``W``:

* for ``W/alive`` (the panel reached the node over a **new** connection) for
  ``contact_seconds``; then for the verdict for ``verdict_seconds`` more;
* ``W/confirm`` → the new system is kept: ``W/magic`` = ``confirmed``;
* ``W/reject`` (its first line is the reason: a health check failed with
  policy rollback) → the node goes back at once;
* neither by the deadline → with ``revert_on_timeout`` the node goes back by
  itself (``W/magic`` = ``rolled-back timeout <exit code>``); without it
  (health checks but no magic rollback) it keeps the system
  (``kept timeout``).

Going back is what ``nixos-rebuild --rollback`` does: for ``switch``, when the
run made a new generation, ``nix-env -p <profile> --rollback`` and the
profile's ``bin/switch-to-configuration switch``; otherwise (``test``, or the
same system again) the system that was running before, activated with the
same action. ``W/magic`` is written (write, then rename) before the run's exit
status, so whoever reads the status reads the decision too
(``detached.inspect``: the ``magic`` key).

The panel sees ``ARMED_MARK`` in the run's output as it follows it, and hands
an :class:`ArmedRun` to ``Arming.on_armed`` on a thread of its own: that opens
its own connection (never the followed one: the point is to prove that a new
login still works after the switch), runs the health checks, and confirms or
rejects. Every answer it gets is the node's own ``W/magic``.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import stream
from .connection import Connection, RemoteError, Target
from .detached import check_remote_dir
from .system import CURRENT_SYSTEM, SYSTEM_PROFILE

__all__ = [
    "ARMED_MARK",
    "RunEnded",
    "ArmedRun",
    "Arming",
    "MagicState",
    "armed_command",
    "parse_magic",
]

# The armed run's line on stdout once nixos-rebuild has exited 0: "<contact seconds> <verdict seconds>".
ARMED_MARK = b"__NIXOS_PANEL_ARMED__ "
# The actions that activate a system now, and so may cut the node off.
ARMABLE_ACTIONS = ("switch", "test")
# The armed run waits on a FIFO, ``W/wake``: the panel writes a line to it after each file it leaves
# (alive, confirm, reject), so the node looks at once; without a wake-up it looks again within _NAP
# seconds (and at its deadline). A look costs the node about three programs (`timeout`, `sh`, `date`):
# polling every 20 ms cost ~125 ms of the node's CPU a second. Where the FIFO cannot be made, or there
# is no `timeout`, it polls every _POLL seconds. The panel polls for the node's decision every
# _FAST_POLL seconds.
_FAST_POLL, _POLL, _NAP = "0.02", "0.1", 1
_WAKE = "wake"
# How long the panel waits for the node to write its decision after confirming or rejecting.
_DECISION_WAIT_SECONDS = 15


@dataclass
class MagicState:
    """What the node decided (``W/magic``): ``confirmed``, ``rolled-back`` or ``kept``."""

    outcome: str
    reason: str = ""  # rolled-back / kept: "timeout" or "rejected"
    exit_code: int | None = None  # the rollback activation's exit status

    @property
    def rolled_back(self) -> bool:
        return self.outcome == "rolled-back"


def parse_magic(text: str) -> MagicState | None:
    """``W/magic``'s first line, or None when there is none (not armed, or not decided yet)."""
    words = (text or "").strip().split()
    if not words or words[0] not in ("confirmed", "rolled-back", "kept"):
        return None
    code = words[2] if len(words) > 2 else ""
    return MagicState(words[0], words[1] if len(words) > 1 else "", int(code) if code.isdigit() else None)


class RunEnded(Exception):
    """The run's folder is gone: the run ended and the panel has read its outcome (the decision with it)."""


@dataclass
class Arming:
    """How an activation is armed, and what the panel does once the node says it is."""

    contact_seconds: int  # the node reverts (or keeps) unless a new connection touched W/alive by then
    verdict_seconds: int  # after contact, how long the node waits for confirm or reject
    revert_on_timeout: bool  # magic rollback on: no verdict in time → go back
    on_armed: Callable[[ArmedRun], None]  # runs on its own thread once the run prints ARMED_MARK

    def __post_init__(self) -> None:
        for name in ("contact_seconds", "verdict_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 3600:
                raise ValueError(f"{name} must be 1-3600 seconds, not {value!r}")


def armed_command(invocation: str, workdir: str, action: str, arming: Arming) -> str:
    """The detached run's command for an armed ``invocation`` (``nixos-rebuild <action> …`` without sudo):
    ``sh -c '<script>'`` (see the module docstring). The caller puts the sudo prefix in front, so the
    whole wait and any rollback run as root. Every value is validated or quoted."""
    if action not in ARMABLE_ACTIONS:
        raise ValueError(f"only {', '.join(ARMABLE_ACTIONS)} can be armed, not {action!r}")
    w = shlex.quote(check_remote_dir(workdir))
    p, c = shlex.quote(SYSTEM_PROFILE), shlex.quote(CURRENT_SYSTEM)
    contact, verdict = int(arming.contact_seconds), int(arming.verdict_seconds)
    on_timeout = "revert timeout" if arming.revert_on_timeout else "keep timeout"
    script = f"""
say() {{ echo "magic rollback: $*" >&2; }}
decide() {{ echo "$*" > {w}/magic.new && mv -f {w}/magic.new {w}/magic; }}
g0=$(readlink {p} 2>/dev/null); s0=$(cd -P {c} 2>/dev/null && echo "$PWD" || {{ [ -e {c} ] && readlink -f {c} 2>/dev/null; }})
{invocation}
rc=$?
[ "$rc" -eq 0 ] || exit "$rc"
revert() {{
  say "$2: going back to the system that ran before ($s0)"
  if [ {action} = switch ] && [ -n "$g0" ] && [ "$(readlink {p} 2>/dev/null)" != "$g0" ]; then
    nix-env -p {p} --rollback >&2 && {p}/bin/switch-to-configuration switch
  elif [ -n "$s0" ]; then
    "$s0/bin/switch-to-configuration" {action}
  else
    say "there is no earlier system to go back to"; false
  fi
  x=$?
  decide "rolled-back $1 $x"
  if [ "$x" -eq 0 ]; then say "the node runs $(readlink -f {c} 2>/dev/null) again"
  else say "going back failed (exit $x)"; fi
}}
# now: milliseconds on the node's monotonic clock, read by a builtin from /proc/uptime (centiseconds);
# GNU date where that cannot be read (the wall clock: a clock step moves the deadline).
now() {{
  if read -r u x < /proc/uptime 2>/dev/null && [ -n "$u" ]; then u=${{u%.*}}${{u#*.}}; u=${{u#"${{u%%[!0]*}}"}}; ms=$(( ${{u:-0}} * 10 ))
  else ms=$(( $(date +%s%N) / 1000000 )); fi
}}
# The panel wakes the wait through the FIFO (held open read-write: no writer ever blocks, no wake-up is lost).
if command -v timeout >/dev/null 2>&1 && mkfifo -m 666 {w}/{_WAKE} 2>/dev/null && exec 4<>{w}/{_WAKE}; then
  nap() {{ if [ "$1" -ge {_NAP}000 ]; then t={_NAP}; else t=$(printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000))); fi
    timeout "$t" sh -c 'read -r x' <&4; }}
else
  nap() {{ sleep {_POLL}; }}
fi
echo "{ARMED_MARK.decode()}{contact} {verdict}"
say "armed: waiting up to {contact} s for the panel to confirm over a new connection"
now; d=$(( ms + {contact}000 )); seen=
while :; do
  if [ -e {w}/reject ]; then r=$(head -c 500 {w}/reject | head -n 1); revert rejected "the panel rejected the new system: $r"; break; fi
  if [ -e {w}/confirm ]; then decide confirmed; say "confirmed by the panel: keeping the new system"; break; fi
  if [ -z "$seen" ] && [ -e {w}/alive ]; then
    seen=1; now; d=$(( ms + {verdict}000 )); say "the panel reached the node again; waiting up to {verdict} s for its verdict"
  fi
  now; left=$(( d - ms ))
  if [ "$left" -le 0 ]; then
    set -- {on_timeout}
    if [ "$1" = revert ]; then revert timeout "no confirmation from the panel in time"
    else decide kept timeout; say "no verdict from the panel in time: keeping the new system"; fi
    break
  fi
  nap "$left"
done
exit 0
"""
    return f"sh -c {shlex.quote(script)}"


class ArmedRun:
    """The panel's side of an armed run: its own connection to the node (opened anew, never the one the
    run is followed on), the contact, commands for the health checks, and the verdict.

    Each method raises RemoteError when the node cannot be reached; ``connect`` keeps trying until
    ``deadline`` (monotonic seconds: past the node's own deadline there is nobody left to answer)."""

    def __init__(self, target: Target, workdir: str, note: Callable[[str], None], deadline: float) -> None:
        self.target = target
        self.workdir = check_remote_dir(workdir)
        self.note = note
        self.deadline = deadline
        self.conn: Connection | None = None
        self.connected_after: float | None = None  # seconds from arming to the new connection

    def connect(self) -> Connection:
        if self.conn is not None:
            return self.conn
        start = time.monotonic()
        attempt, last = 0, None
        while True:
            attempt += 1
            try:
                conn = Connection(self.target)
                conn.open()
            except RemoteError as e:
                if e.kind in ("host-key-mismatch", "auth"):
                    raise
                last = e
                if time.monotonic() + 1.0 >= self.deadline:
                    raise RemoteError(
                        "unreachable",
                        f"no new connection to {self.target.address} within the deadline "
                        f"({attempt} attempts; last: {last.message})",
                    ) from None
                time.sleep(1.0)
                continue
            self.conn = conn
            self.connected_after = time.monotonic() - start
            return conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _wake(self) -> str:
        """Shell that wakes the node's wait (a line into its FIFO, opened read-write: it never blocks, even
        once nobody reads); nothing where the node polls instead."""
        f = shlex.quote(f"{self.workdir}/{_WAKE}")
        return f"{{ [ -p {f} ] && exec 3<>{f} && printf '\\n' >&3; }} 2>/dev/null; true"

    def _decided(self) -> str:
        w = shlex.quote(self.workdir)
        return f"[ -f {w}/magic ] && {{ head -n 1 {w}/magic; exit 0; }}"

    def contact(self) -> MagicState | None:
        """Tell the node a new login works (``W/alive``); the node's decision if it has made one already."""
        w = shlex.quote(self.workdir)
        out: list[bytes] = []
        err: list[bytes] = []
        script = f"[ -d {w} ] || exit 3; {self._decided()}; : > {w}/alive; {self._wake()}"
        code = stream.run_command(self.connect(), script, lambda s, line: (out if s == "out" else err).append(line))
        if code == 3:
            raise RunEnded()
        if code != 0:
            raise RemoteError("protocol", f"could not reach the armed run (exit {code}){stream.stderr_tail(err)}")
        return parse_magic(b"\n".join(out).decode("utf-8", "replace"))

    def run(self, command: str, timeout: int) -> tuple[int | None, str]:
        """Run ``command`` with ``sh -c`` on the node as the login user, stopped after ``timeout`` seconds;
        (exit status, output: stdout then stderr, the first 4,000 characters). Exit None: timed out."""
        out: list[bytes] = []
        err: list[bytes] = []
        give_up = time.monotonic() + timeout + 5

        def too_long() -> bool:
            return time.monotonic() > give_up

        wrapped = f"timeout -k 2 {int(timeout)} sh -c {shlex.quote(command)} </dev/null"
        try:
            code = stream.run_command(
                self.connect(),
                wrapped,
                lambda s, line: (out if s == "out" else err).append(line),
                should_cancel=too_long,
            )
        except stream.Cancelled:
            code = 124
        text = b"\n".join(out + err).decode("utf-8", "replace")[:4000]
        return (None if code == 124 else code), text

    def _verdict(self, command: str, stdin: bytes | None = None) -> MagicState:
        w = shlex.quote(self.workdir)
        waits = int(_DECISION_WAIT_SECONDS / float(_FAST_POLL))
        script = (
            f"[ -d {w} ] || exit 3; {self._decided()}; {command}; {self._wake()}; "
            f"i=0; while [ ! -f {w}/magic ] && [ $i -lt {waits} ]; do sleep {_FAST_POLL}; i=$((i + 1)); done; "
            f"head -n 1 {w}/magic"
        )
        out: list[bytes] = []
        err: list[bytes] = []
        code = stream.run_command(
            self.connect(), script, lambda s, line: (out if s == "out" else err).append(line), stdin=stdin
        )
        if code == 3:
            raise RunEnded()
        state = parse_magic(b"\n".join(out).decode("utf-8", "replace"))
        if code != 0 or state is None:
            raise RemoteError(
                "protocol",
                f"the node did not record a decision (exit {code}){stream.stderr_tail(err)}",
            )
        return state

    def contact_and_confirm(self) -> MagicState:
        """``contact`` and ``confirm`` in one command, for a run without health checks: a new login works,
        and there is nothing else to wait for. The node's decision (``confirmed``, unless it had gone back
        already)."""
        w = shlex.quote(self.workdir)
        return self._verdict(f": > {w}/alive; : > {w}/confirm")

    def confirm(self) -> MagicState:
        """Touch ``W/confirm``; the node's decision (``confirmed``, unless it had gone back already)."""
        return self._verdict(f": > {shlex.quote(self.workdir)}/confirm")

    def reject(self, reason: str) -> MagicState:
        """Write ``W/reject`` with ``reason`` (on stdin, never a command line); the node goes back at once."""
        w = shlex.quote(self.workdir)
        line = " ".join(reason.split())[:400].encode("utf-8", "replace") + b"\n"
        return self._verdict(f"head -c 500 > {w}/reject.new && mv -f {w}/reject.new {w}/reject", stdin=line)


class ArmedWatch:
    """An output filter for the followed run: takes ``ARMED_MARK`` out of the log and starts
    ``arming.on_armed`` on a thread with a fresh :class:`ArmedRun`; ``join`` waits for it."""

    def __init__(self, target: Target, workdir: str, arming: Arming, on_output: stream.OutputCallback) -> None:
        self.target = target
        self.workdir = workdir
        self.arming = arming
        self.on_output = on_output
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def note(self, msg: str) -> None:
        self.on_output("sys", msg.encode())

    def __call__(self, name: str, line: bytes) -> None:
        if name == "out" and line.startswith(ARMED_MARK) and self.thread is None:
            parts = line[len(ARMED_MARK) :].split()
            seconds = [int(p) for p in parts if p.isdigit()] + [self.arming.contact_seconds]
            # The node counts from when it printed the mark; a mark read late (after a drop) leaves less.
            run = ArmedRun(self.target, self.workdir, self.note, time.monotonic() + seconds[0])
            self.note(f"activation done: the node waits up to {seconds[0]} s for a confirmation over a new connection")
            self.thread = threading.Thread(target=self._run, args=(run,), name="magic-rollback", daemon=True)
            self.thread.start()
            return
        self.on_output(name, line)

    def _run(self, run: ArmedRun) -> None:
        try:
            self.arming.on_armed(run)
        except RunEnded:
            self.note("the run had ended before the panel could confirm it: its decision is read from the node")
        except BaseException as e:  # noqa: BLE001 - said in the log; the node decides by itself anyway
            self.error = e
            try:
                self.note(f"confirming failed: {e}; the node decides by itself at its deadline")
            except Exception:  # noqa: BLE001 - the log writer is gone: nothing left to tell
                return
        finally:
            run.close()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
