"""Run ``nixos-rebuild`` on a node from a shipped flake source archive.

No Django here. The worker gives a :class:`~.connection.Target`, the ``git
archive`` bytes of the pinned commit, the flake attribute and the nixos-rebuild
action; this module connects, records the system generation before and after,
streams the source to the node on stdin, runs ``nixos-rebuild <action> --flake
'path:<dir>#<attr>'`` and removes the shipped folder again.

A folder that outlives its run (the connection dropped, so the cleanup could
not reach the node) is removed by the next run on that node, once nothing of
its run is left there. Each run writes the id of its remote process group to
``<folder>.owner`` before it makes the folder; the next run's first command
removes every ``deploy-*`` folder of the same login user whose owner group no
longer exists, and leaves the others. A dropped run's nixos-rebuild may still
be activating on the node for a while (it runs in its own process group, which
the drop does not kill), and a run of another panel, or of a second worker,
may be using its own folder right now; the panel's one-active-deployment-per-
node lock does not cover either case (the dropped run is already marked
interrupted, and another panel has its own database), so the test is the
process group on the node, not any state in the panel. A folder without an
owner file is never touched. A reused process id can only keep a folder
longer, never remove one in use.
"""

from __future__ import annotations

import collections
import hashlib
import os
import posixpath
import re
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from .connection import Connection, RemoteError, Target
from .stream import OutputCallback, read_output, run_command, stderr_tail

__all__ = [
    "COMMIT_SHA_RE",
    "FLAKE_ATTR_RE",
    "REBUILD_ACTIONS",
    "RebuildResult",
    "SystemState",
    "run_rebuild",
]

# The nixos-rebuild actions the panel runs ("action" means only this, everywhere in the panel).
REBUILD_ACTIONS = ("switch", "boot", "test", "dry-activate", "build")
# A flake attribute under nixosConfigurations: it reaches a remote shell, so nothing
# but these characters. \A and \Z so that match() and fullmatch() agree (no "$" before "\n").
FLAKE_ATTR_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\Z")
# A full git commit id as a deployment pins it (branch and tag names are resolved to one first).
COMMIT_SHA_RE = re.compile(r"\A[0-9a-f]{40}\Z")
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
CURRENT_SYSTEM = "/run/current-system"
WORKDIR_ROOT = "/tmp/nixos-panel"
_GENERATION_RE = re.compile(r"^system-(\d+)-link$")
_USER_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")


def _check_attr(attr: str) -> None:
    if not isinstance(attr, str) or not FLAKE_ATTR_RE.match(attr):
        raise ValueError(
            f"invalid flake attribute {attr!r}: use 1-100 characters from A-Z a-z 0-9 _ . -, not starting with . or -"
        )


def _check_action(action: str) -> None:
    if not isinstance(action, str) or action not in REBUILD_ACTIONS:
        raise ValueError(f"invalid nixos-rebuild action {action!r}: must be one of {', '.join(REBUILD_ACTIONS)}")


def _check_remote_dir(remote_dir: str) -> str:
    """Refuse paths that would make ``rm -rf``/``mkdir`` dangerous; return the normalised path."""
    if not isinstance(remote_dir, str) or "\x00" in remote_dir or "\n" in remote_dir:
        raise ValueError("invalid remote directory")
    norm = posixpath.normpath(remote_dir)
    if not norm.startswith("/") or norm.startswith("//") or len([p for p in norm.split("/") if p]) < 2:
        raise ValueError(f"refusing remote directory {remote_dir!r}: must be absolute and at least two levels deep")
    return norm


@dataclass
class SystemState:
    """What the node runs. ``generation`` None / paths '' when not present (e.g. not NixOS yet)."""

    generation: int | None
    profile_path: str  # store path the system profile points to (readlink -f)
    current_system: str  # store path of /run/current-system (readlink -f)

    def describe(self, when: str) -> str:
        """The log line ``system generation <when>: <n or none> (<current system>)``."""
        generation = "none" if self.generation is None else self.generation
        return f"system generation {when}: {generation}" + (f" ({self.current_system})" if self.current_system else "")


@dataclass
class RebuildResult:
    """Outcome of a nixos-rebuild run that started. Non-zero ``exit_code`` is a failed deploy."""

    exit_code: int
    before: SystemState
    after: SystemState
    toplevel: str | None


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


def _state_script(mark: str = "") -> str:
    """Shell that prints three lines, each ``mark`` then possibly nothing: the
    profile link's target, its store path, the current system."""
    p, c = shlex.quote(SYSTEM_PROFILE), shlex.quote(CURRENT_SYSTEM)
    return (
        f"l=$(readlink {p} 2>/dev/null); "
        f"r=; [ -e {p} ] && r=$(readlink -f {p} 2>/dev/null); "
        f"s=; [ -e {c} ] && s=$(readlink -f {c} 2>/dev/null); "
        f'printf \'{mark}%s\\n\' "$l" "$r" "$s"'
    )


def _parse_state(lines: list[str]) -> SystemState:
    link, profile_path, current = (x.strip() for x in (list(lines) + ["", "", ""])[:3])
    m = _GENERATION_RE.match(os.path.basename(link))
    return SystemState(
        generation=int(m.group(1)) if m else None,
        profile_path=profile_path,
        current_system=current,
    )


def _invocation(target: Target, action: str, workdir: str, attr: str) -> str:
    """The nixos-rebuild command line, run from ``workdir`` (where ``./result`` lands for ``build``).

    The flake ref is ``path:<workdir>#<attr>`` so Nix treats the shipped plain
    folder (no .git) as is; every value is validated and shell-quoted.
    """
    _check_action(action)
    _check_attr(attr)
    workdir = _check_remote_dir(workdir)
    if "#" in workdir or "?" in workdir:
        raise ValueError(f"workdir {workdir!r} cannot be used in a flake reference")
    ref = f"path:{workdir}#{attr}"
    return f"{target.privileged_prefix()}nixos-rebuild {shlex.quote(action)} --flake {shlex.quote(ref)}"


# Marker lines of the ship-and-run script on stdout; run_rebuild consumes them.
_STATE_MARK = b"__NIXOS_PANEL_STATE__ "
_SHIPPED_MARK = b"__NIXOS_PANEL_SHIPPED__"
_STALE_MARK = b"__NIXOS_PANEL_STALE__ "  # "<folder>": removed, its run is gone
_IN_USE_MARK = b"__NIXOS_PANEL_IN_USE__ "  # "<pgid> <folder>": left, its run's process group is alive
# Next to each shipped folder: the remote process group of the run that made it.
OWNER_SUFFIX = ".owner"
# Exit code of the script when the parent of the workdir cannot be used.
_PARENT_EXIT = 97
_PW_VAR = "__nixos_panel_pw"


def _sweep_script(parent: str) -> str:
    """Shell that removes the ``deploy-*`` folders in ``parent`` whose owner process group is gone.

    One ``_STALE_MARK`` line per folder removed, one ``_IN_USE_MARK`` line per
    folder left because its owner group is alive. ``kill -0 -<pgid>`` sends
    nothing; only its "No such process" (LC_ALL=C) counts as gone: a group of
    another user's processes answers "Operation not permitted" and is kept.
    ``kill -0 -- -<pgid>`` would be clearer, but dash's kill refuses ``--``.
    """
    q = shlex.quote(parent)
    stale, in_use = _STALE_MARK.decode(), _IN_USE_MARK.decode()
    return (
        f"for o in {q}/deploy-*{OWNER_SUFFIX}; do "
        '[ -f "$o" ] && [ ! -h "$o" ] || continue; '
        'g=$(head -c 20 -- "$o" 2>/dev/null); '
        "case $g in ''|*[!0-9]*|0|1) continue ;; esac; "
        'if e=$(LC_ALL=C kill -0 "-$g" 2>&1); then '
        f'printf \'{in_use}%s %s\\n\' "$g" "${{o%{OWNER_SUFFIX}}}"; continue; fi; '
        'case $e in *"No such process"*) ;; *) continue ;; esac; '
        f'd=${{o%{OWNER_SUFFIX}}}; rm -rf -- "$d" && rm -f -- "$o" && printf \'{stale}%s\\n\' "$d"; '
        "done"
    )


def _ship_and_run_script(target: Target, workdir: str, invocation: str) -> str:
    """One remote command: read the state before, sweep stale folders, unpack the source from stdin, run ``invocation``.

    stdin carries the sudo password line first (if any), then the tar archive.
    stdout starts with three ``_STATE_MARK`` lines, ``_STALE_MARK`` and
    ``_IN_USE_MARK`` lines of the sweep (see the module docstring), then
    ``_SHIPPED_MARK`` once the source is unpacked; after that it is
    nixos-rebuild's own output.  The script exits ``_PARENT_EXIT`` if the parent
    folder is unusable and with tar's status if unpacking failed (both before
    the shipped mark), else with nixos-rebuild's.  ``$$`` is the id of the
    command's own process group (``stream.run_command`` starts it in one).
    """
    workdir = _check_remote_dir(workdir)
    parent = os.path.dirname(workdir)
    qp, qd, qo = shlex.quote(parent), shlex.quote(workdir), shlex.quote(workdir + OWNER_SUFFIX)
    secret = target.privileged_stdin() is not None
    lines = [
        # `read` takes stdin byte by byte, so tar gets exactly what follows the line.
        f"IFS= read -r {_PW_VAR} || exit {_PARENT_EXIT - 1}" if secret else "",
        f"{{ {_state_script(_STATE_MARK.decode())}; }} </dev/null",
        f"mkdir -p -m 700 -- {qp} && test -d {qp} && test ! -h {qp} && test -O {qp} || exit {_PARENT_EXIT}",
        _sweep_script(parent),
        # The owner file first: whenever the folder exists, its owner can be checked.
        f"echo $$ > {qo} || exit",
        f"rm -rf -- {qd} && mkdir -m 700 -- {qd} && tar -x -f - -C {qd} || exit",
        f"echo {_SHIPPED_MARK.decode()}",
        f"cd {qd} && " + (f"printf '%s\\n' \"${_PW_VAR}\" | {invocation}" if secret else f"{invocation} </dev/null"),
    ]
    return "\n".join(line for line in lines if line)


class _Prelude:
    """Filters the ship-and-run output: takes the state lines and the shipped mark.

    Lines before the mark are held back: on success they are delivered (login
    noise, or nixos-rebuild's first stderr lines if sshd forwarded them first);
    on a shipping failure their stderr ends the error message.
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
        self.held: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=1000)

    def __call__(self, stream: str, line: bytes) -> None:
        if self.shipped:
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
        elif stream == "out" and line == _SHIPPED_MARK:
            self.shipped = True
            self.on_shipped()
            held, self.held = list(self.held), collections.deque()
            for s, held_line in held:
                self.on_output(s, held_line)
        else:
            self.held.append((stream, line))


def run_rebuild(
    target: Target,
    *,
    deployment_id: int,
    archive: bytes,
    attr: str,
    action: str,
    on_output: OutputCallback,
    should_cancel: Callable[[], bool] | None = None,
) -> RebuildResult:
    """Deploy a flake source archive (``git archive`` tar bytes) to one node with nixos-rebuild.

    Contract:
    * ValueError for an invalid attr/action/id (before any connection).
    * RemoteError for anything that stops us running or finishing the command
      (connect, host key, auth, sudo, shipping, dropped connection).
    * A non-zero nixos-rebuild exit is *returned* in ``RebuildResult.exit_code``.
    * :class:`Cancelled` propagates after the remote process group was killed.
    * Once connected, the shipped folder is always removed (best effort).
    * Panel progress lines go to ``on_output("sys", b"...")``.

    Each remote command costs a round trip and a process start on the node
    (about 50-60 ms on the testbed), so there are two after connecting (three
    with sudo): one reads the state before, unpacks the source streamed on its
    stdin and runs nixos-rebuild; one resolves the toplevel, reads the state
    after and removes the folder.
    """
    workdir = _new_workdir(deployment_id, target.user)
    invocation = _invocation(target, action, workdir, attr)
    script = _ship_and_run_script(target, workdir, invocation)

    def note(msg: str) -> None:
        on_output("sys", msg.encode())

    size = len(archive)
    digest = hashlib.sha256(archive).hexdigest()

    note(f"connecting to {target.user}@{target.address}")
    conn = Connection(target)
    conn.open()
    cleaned = False
    try:
        note(f"host key verified ({target.host_key.fingerprint})")
        if target.sudo:
            _check_sudo(conn, target)
        note(f"shipping source ({size} bytes, sha256 {digest}) to {workdir}")
        states: list[SystemState] = []

        def on_state(lines: list[str]) -> None:
            states.append(_parse_state(lines))
            note(states[0].describe("before"))

        prelude = _Prelude(on_output, on_state, lambda: note(f"running: {invocation}"), note)
        exit_code = run_command(
            conn,
            script,
            prelude,
            stdin=(target.privileged_stdin() or b"") + archive,
            should_cancel=should_cancel,
        )
        if not prelude.shipped:
            err = [line for stream, line in prelude.held if stream == "err"]
            if exit_code == _PARENT_EXIT:
                raise RemoteError(
                    "ship",
                    f"cannot use {os.path.dirname(workdir)} on {target.address}: "
                    f"it must be a directory owned by {target.user!r}{stderr_tail(err)}",
                )
            raise RemoteError(
                "ship",
                f"unpacking the source into {target.address}:{workdir} failed (exit {exit_code}){stderr_tail(err)}",
            )
        before = states[0] if states else _parse_state([])
        note(f"exit code {exit_code}")
        resolve = None
        if exit_code == 0:
            if action == "build":
                resolve = f"{workdir}/result"
            elif action in ("switch", "test"):
                resolve = CURRENT_SYSTEM
            elif action == "boot":
                resolve = SYSTEM_PROFILE
            # dry-activate: nothing is recorded by nixos-rebuild we could read back.
        after, toplevel, cleaned = _finish(conn, workdir, resolve)
        note(after.describe("after"))
        if toplevel:
            note(f"toplevel: {toplevel}")
        return RebuildResult(exit_code=exit_code, before=before, after=after, toplevel=toplevel)
    finally:
        # Never let cleanup mask the real outcome (an exception or the result).
        try:
            note("cleaning up")
            if not cleaned:
                read_output(conn, _remove_script(workdir))
        except (RemoteError, RuntimeError, OSError) as e:
            try:
                note(f"warning: could not remove {workdir}: {e}")
            except Exception:
                pass
        conn.close()


def _remove_script(workdir: str) -> str:
    """Shell that removes a run's folder, then its owner file (so a folder never outlives its owner file)."""
    workdir = _check_remote_dir(workdir)
    return f"rm -rf -- {shlex.quote(workdir)} && rm -f -- {shlex.quote(workdir + OWNER_SUFFIX)}"


def _finish(conn: Connection, workdir: str, resolve: str | None) -> tuple[SystemState, str | None, bool]:
    """In one command: resolve the toplevel link (if any), read the state after, remove ``workdir``.

    Returns (state, toplevel or None, whether the folder was removed); if it was
    not, run_rebuild's cleanup tries again and reports why it failed.
    """
    q = shlex.quote(resolve) if resolve else None
    script = (
        (f"t=; [ -e {q} ] && t=$(readlink -f {q} 2>/dev/null); " if q else "t=; ")
        + _state_script()
        + '; printf "%s\\n" "$t"'
        + f"; {{ {_remove_script(workdir)}; }} 2>/dev/null && echo removed || echo kept"
    )
    lines = read_output(conn, script).split("\n")
    lines += [""] * (5 - len(lines))
    return _parse_state(lines[:3]), (lines[3].strip() or None) if q else None, lines[4].strip() == "removed"


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
