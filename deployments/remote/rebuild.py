"""Run ``nixos-rebuild`` on a node from a shipped flake source archive, detached from the SSH session.

No Django here. The worker gives a :class:`~.connection.Target`, the ``git
archive`` bytes of the pinned commit, the flake attribute and the nixos-rebuild
action; this module connects, records the system generation before and after,
streams the source to the node on stdin, starts ``nixos-rebuild <action>
--flake 'path:<dir>/src#<attr>'`` detached from the session (``detached``:
``setsid``, or ``systemd-run`` on a systemd node), follows its output by byte
offset across dropped connections, and removes the folder once it has read
the outcome.

A folder that outlives its run is handled by the next run on that node, by
what its process group says. Each run writes the id of its process group to
``<folder>.owner`` before it makes the folder (the shipping session's, then the
detached run's). The next run's first command goes over every ``deploy-*``
folder of the same login user: one whose owner group is alive is left (a run
that lost its panel may still be activating; a run of another panel, or of a
second worker, may be using its folder right now: the panel's one-active-
deployment-per-node lock covers neither); one whose group is gone is removed,
unless it holds a detached run whose outcome no panel has read yet (it has a
``pgid`` file): that one stays for ``reconcile`` for ``UNCOLLECTED_KEEP_DAYS``.
A folder without an owner file is never touched. A reused process id can
only keep a folder longer, never remove one in use.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from .confirm import ArmedWatch, Arming, MagicState, armed_command, parse_magic
from .connection import Cancelled, Connection, RemoteError, Target
from .detached import (
    OWNER_SUFFIX,
    Link,
    NotStarted,
    RunHandle,
    check_remote_dir,
    follow_lines,
    follow_run,
    launch_script,
    remove_script,
)
from .stream import OutputCallback, read_output, run_command, stderr_tail
from .system import CURRENT_SYSTEM, SYSTEM_PROFILE, SystemState, parse_state, state_script

__all__ = [
    "COMMIT_SHA_RE",
    "CURRENT_SYSTEM",
    "FLAKE_ATTR_RE",
    "OWNER_SUFFIX",
    "REBUILD_ACTIONS",
    "SYSTEM_PROFILE",
    "RebuildResult",
    "SystemState",
    "resolve_path",
    "run_rebuild",
]

# The nixos-rebuild actions the panel runs ("action" means only this, everywhere in the panel).
REBUILD_ACTIONS = ("switch", "boot", "test", "dry-activate", "build")
# A flake attribute under nixosConfigurations: it reaches a remote shell, so nothing
# but these characters. \A and \Z so that match() and fullmatch() agree (no "$" before "\n").
FLAKE_ATTR_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\Z")
# A full git commit id as a deployment pins it (branch and tag names are resolved to one first).
COMMIT_SHA_RE = re.compile(r"\A[0-9a-f]{40}\Z")
WORKDIR_ROOT = "/tmp/nixos-panel"
# A detached run's folder whose outcome no panel has read is kept this long after its last change.
UNCOLLECTED_KEEP_DAYS = 14
_USER_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")
_DEPLOY_FOLDER_RE = re.compile(r"/deploy-(\d+)-[^/]+$")


def _check_attr(attr: str) -> None:
    if not isinstance(attr, str) or not FLAKE_ATTR_RE.match(attr):
        raise ValueError(
            f"invalid flake attribute {attr!r}: use 1-100 characters from A-Z a-z 0-9 _ . -, not starting with . or -"
        )


def _check_action(action: str) -> None:
    if not isinstance(action, str) or action not in REBUILD_ACTIONS:
        raise ValueError(f"invalid nixos-rebuild action {action!r}: must be one of {', '.join(REBUILD_ACTIONS)}")


@dataclass
class RebuildResult:
    """Outcome of a nixos-rebuild run that started. Non-zero ``exit_code`` is a failed deploy."""

    exit_code: int
    before: SystemState
    after: SystemState
    toplevel: str | None
    magic: MagicState | None = None  # an armed run's decision (``confirm``); None when not armed
    failure: str = ""  # what failed, when it was not nixos-rebuild (an off-target build: ``remote.build``)


def _new_workdir(deployment_id: int, user: str) -> str:
    """A fresh folder on the node for one run: ``/tmp/nixos-panel-<user>/deploy-<id>-<nonce>``.

    Per login user, so a non-root sudo user can create and own it. The random
    nonce keeps two panels (or test databases) that reuse an id from ever
    cleaning up each other's folder on a shared node.
    """
    if isinstance(deployment_id, bool) or not isinstance(deployment_id, int) or deployment_id < 0:
        raise ValueError(f"invalid deployment id {deployment_id!r}")
    safe_user = _USER_SAFE_RE.sub("_", user or "unknown")
    return f"{WORKDIR_ROOT}-{safe_user}/deploy-{deployment_id}-{secrets.token_hex(4)}"


def resolve_path(action: str, workdir: str) -> str | None:
    """What names the system an action made, once it exited 0 (None: dry-activate records nothing)."""
    if action == "build":
        return f"{workdir}/src/result"
    if action in ("switch", "test"):
        return CURRENT_SYSTEM
    if action == "boot":
        return SYSTEM_PROFILE
    return None


def _invocation(target: Target, action: str, workdir: str, attr: str, *, privileged: bool = True) -> str:
    """The nixos-rebuild command line, run from ``<workdir>/src`` (where ``./result`` lands for ``build``).

    The flake ref is ``path:<workdir>/src#<attr>`` so Nix treats the shipped
    plain folder (no .git) as is, and the run's output files beside it are not
    part of the source; every value is validated and shell-quoted.
    """
    _check_action(action)
    _check_attr(attr)
    workdir = check_remote_dir(workdir)
    if "#" in workdir or "?" in workdir:
        raise ValueError(f"workdir {workdir!r} cannot be used in a flake reference")
    ref = f"path:{workdir}/src#{attr}"
    prefix = target.privileged_prefix() if privileged else ""
    return f"{prefix}nixos-rebuild {shlex.quote(action)} --flake {shlex.quote(ref)}"


# Marker lines of the ship-and-launch script on stdout; run_rebuild consumes them.
_STATE_MARK = b"__NIXOS_PANEL_STATE__ "
_SHIPPED_MARK = b"__NIXOS_PANEL_SHIPPED__"
_LAUNCHED_MARK = b"__NIXOS_PANEL_LAUNCHED__ "  # "<pgid> <unit or nothing>": the run started detached
_STALE_MARK = b"__NIXOS_PANEL_STALE__ "  # "<folder>": removed, its run is gone
_IN_USE_MARK = b"__NIXOS_PANEL_IN_USE__ "  # "<pgid> <folder>": left, its run's process group is alive
_UNCOLLECTED_MARK = b"__NIXOS_PANEL_UNCOLLECTED__ "  # "<folder>": left, its run ended unread
# Exit code of the script when the parent of the workdir cannot be used.
_PARENT_EXIT = 97
_PW_VAR = "__nixos_panel_pw"


def _sweep_script(parent: str) -> str:
    """Shell that removes the ``deploy-*`` folders in ``parent`` whose owner process group is gone.

    One ``_STALE_MARK`` line per folder removed, one ``_IN_USE_MARK`` line per
    folder left because its owner group is alive, one ``_UNCOLLECTED_MARK``
    line per folder left because it holds a detached run's outcome no panel has
    read (younger than ``UNCOLLECTED_KEEP_DAYS``). ``kill -0 -<pgid>`` sends
    nothing; only its "No such process" (LC_ALL=C) counts as gone: a group of
    another user's processes answers "Operation not permitted" and is kept.
    ``kill -0 -- -<pgid>`` would be clearer, but dash's kill refuses ``--``.
    """
    q = shlex.quote(parent)
    stale, in_use, unread = _STALE_MARK.decode(), _IN_USE_MARK.decode(), _UNCOLLECTED_MARK.decode()
    return (
        f"for o in {q}/deploy-*{OWNER_SUFFIX}; do "
        '[ -f "$o" ] && [ ! -h "$o" ] || continue; '
        'g=$(head -c 20 -- "$o" 2>/dev/null); '
        "case $g in ''|*[!0-9]*|0|1) continue ;; esac; "
        'if e=$(LC_ALL=C kill -0 "-$g" 2>&1); then '
        f'printf \'{in_use}%s %s\\n\' "$g" "${{o%{OWNER_SUFFIX}}}"; continue; fi; '
        'case $e in *"No such process"*) ;; *) continue ;; esac; '
        f"d=${{o%{OWNER_SUFFIX}}}; "
        f'if [ -f "$d/pgid" ] && [ -z "$(find "$d" -maxdepth 0 -mtime +{UNCOLLECTED_KEEP_DAYS - 1} 2>/dev/null)" ]; '
        f"then printf '{unread}%s\\n' \"$d\"; continue; fi; "
        f'rm -rf -- "$d" && rm -f -- "$o" && printf \'{stale}%s\\n\' "$d"; '
        "done"
    )


def _ship_and_launch_script(target: Target, workdir: str, invocation: str, plain_invocation: str) -> str:
    """One remote command: read the state before, sweep stale folders, unpack the source from stdin into
    ``<workdir>/src``, start ``invocation`` detached (``detached.launch_script``), say so, and follow its
    output from the start (``detached.follow_lines``: it ends when the run has).

    stdin carries the sudo password line first (if any), then the tar archive.
    stdout starts with three ``_STATE_MARK`` lines, ``_STALE_MARK``,
    ``_IN_USE_MARK`` and ``_UNCOLLECTED_MARK`` lines of the sweep (see the
    module docstring), then ``_SHIPPED_MARK`` once the source is unpacked, and
    ``_LAUNCHED_MARK <pgid> <unit>`` once the run has started; then the
    follower's start mark and the run's output. The script exits
    ``_PARENT_EXIT`` if the parent folder is unusable and with tar's status if
    unpacking failed (both before the shipped mark), 94/95 if the run did not
    start. Run again for the same folder (after a drop) it starts nothing
    twice: a folder whose run started only repeats the launched mark. ``$$``
    is the id of the command's own process group (``stream.run_command``
    starts it in one).
    """
    workdir = check_remote_dir(workdir)
    parent = os.path.dirname(workdir)
    qp, qd, qo = shlex.quote(parent), shlex.quote(workdir), shlex.quote(workdir + OWNER_SUFFIX)
    qn = shlex.quote(workdir + OWNER_SUFFIX + ".new")
    secret = target.privileged_stdin() is not None
    unit = "nixos-panel-" + os.path.basename(workdir)
    # Says the run started: its process group and unit (read into g and u first).
    launched = f'printf \'{_LAUNCHED_MARK.decode()}%s %s\\n\' "$g" "$u"'
    read_run = f"g=; read -r g < {qd}/pgid; u=; [ -f {qd}/unit ] && read -r u < {qd}/unit"
    lines = [
        # `read` takes stdin byte by byte, so tar gets exactly what follows the line.
        f"IFS= read -r {_PW_VAR} || exit {_PARENT_EXIT - 1}" if secret else "",
        # Started already (this is a second try after a drop)? Then only say so and follow.
        f"if [ -s {qd}/pgid ]; then cat >/dev/null; {read_run}; {launched}; else",
        f"{{ {state_script(_STATE_MARK.decode())}; }} </dev/null",
        f"mkdir -p -m 700 -- {qp} && test -d {qp} && test ! -h {qp} && test -O {qp} || exit {_PARENT_EXIT}",
        _sweep_script(parent),
        # The owner file first: whenever the folder exists, its owner can be checked.
        f"echo $$ > {qo} || exit",
        # (A folder of that name is left only by an earlier try: rm starts only then.)
        f"{{ {{ [ ! -e {qd} ] && [ ! -h {qd} ]; }} || rm -rf -- {qd}; }} && "
        f"mkdir -m 700 -- {qd} {qd}/src && tar -x -f - -C {qd}/src || exit",
        f"echo {_SHIPPED_MARK.decode()}",
        f"cd {qd} && : > out && : > err || exit",
        launch_script(target, workdir, invocation, plain_invocation, unit, _PW_VAR),
        # From now on the folder belongs to the detached run's process group.
        read_run,
        f'echo "$g" > {qn} && mv -f {qn} {qo} || exit',
        launched,
        "fi",
        follow_lines(workdir, "$g", 0, 0),
    ]
    return "\n".join(line for line in lines if line)


class _Prelude:
    """Filters the ship-and-launch output: takes the state lines and the marks.

    Lines before the shipped mark are held back: on success they are delivered
    (login noise); on a shipping failure their stderr ends the error message.
    """

    def __init__(
        self,
        on_output: OutputCallback,
        on_state: Callable[[list[str]], None],
        on_shipped: Callable[[], None],
        note: Callable[[str], None],
    ) -> None:
        self.on_output = on_output
        self.on_state = on_state
        self.on_shipped = on_shipped
        self.note = note
        self.state: list[str] = []
        self.shipped = False
        self.launched: tuple[int, str] | None = None
        self.held: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=1000)

    def handle(self, workdir: str) -> RunHandle | None:
        """The detached run, once the launched mark was read (said in the log); None before."""
        if self.launched is None:
            return None
        pgid, unit = self.launched
        self.note(
            f"started on the node, detached from this connection (process group {pgid}"
            + (f", unit {unit}" if unit else "")
            + f"); its output goes to {workdir}/out and /err"
        )
        return RunHandle(workdir, pgid, unit)

    def __call__(self, stream: str, line: bytes) -> None:
        if stream == "out" and line.startswith(_LAUNCHED_MARK):
            pgid, _, unit = line[len(_LAUNCHED_MARK) :].decode("utf-8", "replace").partition(" ")
            if pgid.strip().isdigit():
                self.launched = (int(pgid), unit.strip())
        elif self.shipped:
            self.on_output(stream, line)
        elif stream == "out" and line.startswith(_STATE_MARK) and len(self.state) < 3:
            self.state.append(line[len(_STATE_MARK) :].decode("utf-8", "replace"))
            if len(self.state) == 3:
                self.on_state(self.state)
        elif stream == "out" and line.startswith(_STALE_MARK):
            folder = line[len(_STALE_MARK) :].decode("utf-8", "replace")
            self.note(f"removed {folder}, left behind by an earlier run that is no longer running")
        elif stream == "out" and line.startswith(_IN_USE_MARK):
            pgid, _, folder = line[len(_IN_USE_MARK) :].decode("utf-8", "replace").partition(" ")
            self.note(
                f"left {folder} in place: its run is still going on the node (process group {pgid}); "
                "an earlier run that lost its connection may still be activating"
            )
        elif stream == "out" and line.startswith(_UNCOLLECTED_MARK):
            folder = line[len(_UNCOLLECTED_MARK) :].decode("utf-8", "replace")
            m = _DEPLOY_FOLDER_RE.search(folder)
            which = f"deployment #{m.group(1)}" if m else "an earlier deployment"
            self.note(
                f"left {folder} in place: its run ended, and no panel has read its outcome yet "
                f"(reconcile {which}; it goes after {UNCOLLECTED_KEEP_DAYS} days)"
            )
        elif stream == "out" and line == _SHIPPED_MARK:
            self.shipped = True
            self.on_shipped()
            held, self.held = list(self.held), collections.deque()
            for s, held_line in held:
                self.on_output(s, held_line)
        else:
            self.held.append((stream, line))

    def again(self) -> None:
        """The script is run again after a drop: what it says next replaces what was held."""
        self.state, self.held = [], collections.deque(maxlen=1000)


def run_rebuild(
    target: Target,
    *,
    deployment_id: int,
    archive: bytes,
    attr: str,
    action: str,
    on_output: OutputCallback,
    should_cancel: Callable[[], bool] | None = None,
    on_workdir: Callable[[str], None] | None = None,
    arm: Arming | None = None,
    command: Callable[[str, bool], str] | None = None,
    resolve: Callable[[str], str | None] | None = None,
) -> RebuildResult:
    """Deploy a flake source archive (``git archive`` tar bytes) to one node with nixos-rebuild.

    ``command(workdir, privileged)``, if given, is the shell command run detached instead of
    nixos-rebuild (with or without the sudo prefix), and ``resolve(workdir)`` names what it makes
    (``remote.build``: a ``nix build`` on a build host, an activation of a copied system).

    Contract:
    * ValueError for an invalid attr/action/id (before any connection).
    * ``on_workdir(folder)`` is told the run's folder on the node before anything
      is shipped (a later ``reconcile`` asks the node about it).
    * RemoteError for anything that stops us running or finishing the command
      (connect, host key, auth, sudo, shipping; ``disconnected`` when the node
      stayed unreachable for ``target.reconnect_for`` seconds after a drop: the
      run may go on, and its folder stays for reconcile; ``killed`` when the run
      ended without an exit status nobody here asked for).
    * A non-zero nixos-rebuild exit is *returned* in ``RebuildResult.exit_code``.
    * :class:`Cancelled` propagates after the run's process group on the node
      was killed (``should_cancel`` said so: a user's cancel or a timeout).
    * Once its outcome is read (or nothing started), the folder is removed (best effort).
    * Panel progress lines go to ``on_output("sys", b"...")``.
    * ``arm`` (switch and test only): the activation must be confirmed over a new
      connection or the node goes back by itself (``confirm``: magic rollback);
      the node's decision is ``RebuildResult.magic``.

    Each remote command costs a round trip and a process start on the node
    (about 50-60 ms on the testbed), so there are two after connecting (three
    with sudo): one reads the state before, unpacks the source streamed on its
    stdin, starts nixos-rebuild detached and follows its output until it ends,
    exiting with the run's exit status; one reads the state after and the built
    system and removes the folder if all of its output was received. A dropped
    link adds a follow command per reconnect; a run without an exit status (a
    cancel) one more, to remove the folder once that is known.
    """
    workdir = _new_workdir(deployment_id, target.user)
    if command is None:

        def command(folder: str, privileged: bool) -> str:
            return _invocation(target, action, folder, attr, privileged=privileged)

    invocation, plain_invocation = command(workdir, True), command(workdir, False)
    shown = invocation + (" (armed: magic rollback)" if arm is not None else "")
    watch = None
    if arm is not None:
        # The whole armed run (the wait, and any rollback) runs as root: the sudo prefix goes in front.
        plain_invocation = armed_command(plain_invocation, workdir, action, arm)
        invocation = target.privileged_prefix() + plain_invocation
        watch = ArmedWatch(target, workdir, arm, on_output)
        on_output = watch
    script = _ship_and_launch_script(target, workdir, invocation, plain_invocation)

    def note(msg: str) -> None:
        on_output("sys", msg.encode())

    size = len(archive)
    digest = hashlib.sha256(archive).hexdigest()

    note(f"connecting to {target.user}@{target.address}")
    link = Link(target, note)
    conn = link.open()
    if on_workdir is not None:
        on_workdir(workdir)
    prelude: _Prelude | None = None
    collected = False  # the run's outcome is read: its folder may go
    removed = False  # and it is gone already
    try:
        note(f"host key verified ({target.host_key.fingerprint})")
        if target.sudo:
            _check_sudo(conn, target)
        note(f"shipping source ({size} bytes, sha256 {digest}) to {workdir}")
        states: list[SystemState] = []

        def on_state(lines: list[str]) -> None:
            states.append(parse_state(lines))
            note(states[-1].describe("before"))

        prelude = _Prelude(on_output, on_state, lambda: note(f"running: {shown}"), note)
        resolve = resolve_path(action, workdir) if resolve is None else resolve(workdir)

        try:
            report = follow_run(
                link,
                None,
                on_output=on_output,
                note=note,
                should_cancel=should_cancel,
                resolve=resolve,
                start=(script, (target.privileged_stdin() or b"") + archive),
                on_prelude=prelude,
                launched=lambda: prelude.handle(workdir),
                # The confirmation reads the node's decision from the folder the last command removes.
                before_finish=(lambda: watch.join(30)) if watch is not None else None,
            )
        except NotStarted as e:
            err = [line for stream, line in prelude.held if stream == "err"]
            if e.code == _PARENT_EXIT:
                raise RemoteError(
                    "ship",
                    f"cannot use {os.path.dirname(workdir)} on {target.address}: "
                    f"it must be a directory owned by {target.user!r}{stderr_tail(err)}",
                ) from None
            if prelude.shipped:
                raise RemoteError(
                    "ship", f"nixos-rebuild did not start on {target.address} (exit {e.code}){stderr_tail(err)}"
                ) from None
            raise RemoteError(
                "ship",
                f"unpacking the source into {target.address}:{workdir} failed (exit {e.code}){stderr_tail(err)}",
            ) from None
        except (Cancelled, RemoteError) as e:
            # Stopped on request, or ended without a status: nothing more to read.
            collected = isinstance(e, Cancelled) or e.kind == "killed"
            raise
        before = states[0] if states else parse_state([])
        collected, removed = True, report.removed
        exit_code = report.exit_status
        note(f"exit code {exit_code}")
        after = SystemState(report.generation, report.profile_path, report.current_system)
        toplevel = (report.toplevel or None) if exit_code == 0 and resolve else None
        magic = parse_magic(report.magic) if arm is not None else None
        if watch is not None:
            watch.join(30)  # its last lines belong to this run's log
        if magic is not None and magic.rolled_back:
            toplevel = None  # the node no longer runs what was built
        note(after.describe("after"))
        if toplevel:
            note(f"toplevel: {toplevel}")
        return RebuildResult(exit_code=exit_code, before=before, after=after, toplevel=toplevel, magic=magic)
    finally:
        # Never let cleanup mask the real outcome (an exception or the result).
        try:
            if prelude is not None and prelude.launched is not None and not collected:
                note(f"left {workdir} on the node: it holds the run's output and, once it ends, its exit status")
            elif removed:
                note(f"removed {workdir}: its outcome is read")
            elif link.conn is not None:
                note("cleaning up")
                read_output(link.conn, remove_script(workdir))
        except (RemoteError, RuntimeError, OSError) as e:
            try:
                note(f"warning: could not remove {workdir}: {e}")
            except Exception:
                pass
        link.close()


def _check_sudo(conn: Connection, target: Target) -> None:
    """Fail early with kind "sudo" instead of a confusing nixos-rebuild failure."""
    err: list[bytes] = []
    code = run_command(
        conn,
        f"{target.privileged_prefix()}true",
        lambda stream, line: err.append(line) if stream == "err" else None,
        stdin=target.privileged_stdin(),
    )
    if code != 0:
        how = "with the stored password" if target.sudo_secret() else "without a password (sudo -n)"
        raise RemoteError("sudo", f"sudo as {target.user!r} on {target.address} failed {how}{stderr_tail(err, 3)}")
