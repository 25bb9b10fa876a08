"""A node's system generations as the node has them, and going back to one of them.

No Django here.

**Reading** is one command over the pinned-key connection. It reads the
profile's ``system-<N>-link`` symlinks themselves (number from the name, date
from the link's own mtime, store path from its target: exactly what
``nix-env --list-generations`` prints, without its profile lock, its locale
and its column layout), where ``/nix/var/nix/profiles/system`` points, and
``/run/current-system`` and ``/run/booted-system``. Every line the panel reads
carries a mark, so a login banner or a chatty shell profile cannot be taken
for a generation.

**Going back** (``run_rollback``) is what ``nixos-rebuild switch --rollback``
does on NixOS: ``nix-env -p <profile> --rollback`` for the previous generation,
``nix-env -p <profile> --switch-generation N`` for a chosen one, then
``<profile>/bin/switch-to-configuration switch|boot``. It runs detached from the
SSH session in a run folder like a rebuild's (``detached``: same files, same
follow by byte offset, same cancel, same reconcile; the folder is named
``deploy-<id>-<nonce>`` so the next run's sweep knows it), but ships no source
and builds nothing. Before anything starts, the same command checks that the
generation exists (for "previous": that there is an older one); if not, it
says which generations there are and changes nothing (:class:`GenerationMissing`).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .connection import Cancelled, Connection, RemoteError, Target
from .detached import (
    Link,
    NotStarted,
    RunHandle,
    check_remote_dir,
    follow_lines,
    follow_run,
    launch_script,
    remove_script,
)
from .rebuild import (  # the run folder's conventions are the rebuild's: one sweep and one reconcile for both
    _LAUNCHED_MARK,
    _PARENT_EXIT,
    _PW_VAR,
    _SHIPPED_MARK,
    _STATE_MARK,
    OWNER_SUFFIX,
    _check_sudo,
    _new_workdir,
    _Prelude,
    _sweep_script,
)
from .stream import OutputCallback, read_output, run_command, stderr_tail
from .system import CURRENT_SYSTEM, SYSTEM_PROFILE, SystemState, parse_state, state_script

__all__ = [
    "BOOTED_SYSTEM",
    "GENERATION_RE",
    "ROLLBACK_ACTIONS",
    "Generation",
    "GenerationMissing",
    "Generations",
    "RollbackResult",
    "list_script",
    "parse_generations",
    "read_generations",
    "rollback_invocation",
    "run_rollback",
]

BOOTED_SYSTEM = "/run/booted-system"
# A read of the generations is a person waiting for a page: it gets this long on the node.
READ_TIMEOUT_SECONDS = 30
# The switch-to-configuration actions a rollback may end with (NixOS: `nixos-rebuild switch|boot --rollback`).
ROLLBACK_ACTIONS = ("switch", "boot")
# A generation number as a user gives it: it reaches a remote shell, so digits only (\A…\Z: no trailing newline).
GENERATION_RE = re.compile(r"\A[1-9][0-9]{0,8}\Z")
# Every line the listing prints starts with one of these.
_GEN_MARK = "__NIXOS_PANEL_GEN__"  # "<mtime> system-<N>-link <store path>"
_PROFILE_MARK = "__NIXOS_PANEL_GEN_PROFILE__"  # what the profile link names: "system-<N>-link"
_CURRENT_MARK = "__NIXOS_PANEL_GEN_CURRENT__"  # /run/current-system's store path
_BOOTED_MARK = "__NIXOS_PANEL_GEN_BOOTED__"  # /run/booted-system's store path
_TARGET_MARK = b"__NIXOS_PANEL_ROLLBACK_TARGET__ "  # "<N> <store path>": where the rollback goes
_READY_MARK = b"__NIXOS_PANEL_READY__"  # the folder is made: what the rebuild's shipped mark says
# Exit codes of the rollback's start command when there is nowhere to go (nothing was changed).
_NO_GENERATION_EXIT = 92
_NO_PREVIOUS_EXIT = 91
_LINK_RE = re.compile(r"\Asystem-([0-9]{1,9})-link\Z")


class GenerationMissing(RemoteError):
    """The generation to go back to is not on the node (or there is no older one): nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__("no-generation", message)


def check_generation(generation: int | None) -> None:
    """ValueError unless ``generation`` is None (the previous one) or a positive generation number."""
    if generation is None:
        return
    if isinstance(generation, bool) or not isinstance(generation, int) or not GENERATION_RE.match(str(generation)):
        raise ValueError(f"invalid generation {generation!r}: a number from 1 to 999999999")


def check_action(action: str) -> None:
    if action not in ROLLBACK_ACTIONS:
        raise ValueError(f"invalid rollback action {action!r}: must be one of {', '.join(ROLLBACK_ACTIONS)}")


# -- reading --------------------------------------------------------------------------------


@dataclass
class Generation:
    """One generation of the system profile."""

    number: int
    created_at: int | None  # seconds since the epoch: the link's mtime, as nix-env shows it
    path: str  # the store path of the system it holds
    default: bool = False  # the profile points at it: the boot default
    current: bool = False  # the node runs it: /run/current-system
    booted: bool = False  # the node booted it: /run/booted-system


@dataclass
class Generations:
    """What ``list_script`` found on a node. ``generations`` ascending by number."""

    generations: list[Generation] = field(default_factory=list)
    profile_generation: int | None = None
    current_system: str = ""
    booted_system: str = ""

    def get(self, number: int) -> Generation | None:
        return next((g for g in self.generations if g.number == number), None)

    def previous(self) -> Generation | None:
        """The one ``nix-env --rollback`` goes to: the newest older than the profile's."""
        if self.profile_generation is None:
            return None
        older = [g for g in self.generations if g.number < self.profile_generation]
        return older[-1] if older else None

    def numbers(self) -> str:
        return ", ".join(str(g.number) for g in self.generations) or "none"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Generations:
        return cls(
            generations=[Generation(**g) for g in data.get("generations", [])],
            profile_generation=data.get("profile_generation"),
            current_system=data.get("current_system", ""),
            booted_system=data.get("booted_system", ""),
        )


def _listing(profile: str = SYSTEM_PROFILE) -> str:
    """Shell that prints the marked lines ``parse_generations`` reads."""
    p = shlex.quote(profile)
    return (
        f"printf '{_PROFILE_MARK} %s\\n' \"$(readlink {p} 2>/dev/null)\"; "
        f'for l in {p}-*-link; do [ -L "$l" ] || continue; '
        f'printf \'{_GEN_MARK} %s %s %s\\n\' "$(stat -c %Y -- "$l" 2>/dev/null)" "${{l##*/}}" '
        '"$(readlink -f -- "$l" 2>/dev/null)"; done; '
        f"for m in {_CURRENT_MARK}:{CURRENT_SYSTEM} {_BOOTED_MARK}:{BOOTED_SYSTEM}; do "
        's=; [ -e "${m#*:}" ] && s=$(readlink -f -- "${m#*:}" 2>/dev/null); '
        'printf \'%s %s\\n\' "${m%%:*}" "$s"; done'
    )


def list_script() -> str:
    """The one command that reads a node's generations (nothing is changed)."""
    return _listing()


def _mark_one(gens: Generations, path: str, attr: str) -> None:
    """Mark the generation holding ``path``: the profile's own if it holds it, else the newest that does
    (several generations may hold the same system)."""
    if not path:
        return
    holders = [g for g in gens.generations if g.path == path]
    if not holders:
        return
    own = next((g for g in holders if g.number == gens.profile_generation), None)
    setattr(own or holders[-1], attr, True)


def parse_generations(text: str) -> Generations:
    """The listing's marked lines; anything else (a banner, a shell's chatter) is ignored."""
    gens = Generations()
    seen: dict[int, Generation] = {}
    for line in text.split("\n"):
        mark, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if mark == _GEN_MARK:
            mtime, name, path = (rest.split(" ", 2) + ["", ""])[:3]
            m = _LINK_RE.match(name)
            if not m or not path.startswith("/"):
                continue
            number = int(m.group(1))
            seen[number] = Generation(number, int(mtime) if mtime.isdigit() else None, path.strip())
        elif mark == _PROFILE_MARK:
            m = _LINK_RE.match(os.path.basename(rest))
            gens.profile_generation = int(m.group(1)) if m else None
        elif mark == _CURRENT_MARK:
            gens.current_system = rest
        elif mark == _BOOTED_MARK:
            gens.booted_system = rest
    gens.generations = [seen[n] for n in sorted(seen)]
    default = gens.get(gens.profile_generation) if gens.profile_generation is not None else None
    if default is not None:
        default.default = True
    _mark_one(gens, gens.current_system, "current")
    _mark_one(gens, gens.booted_system, "booted")
    return gens


def read_generations(target: Target, *, timeout: float = READ_TIMEOUT_SECONDS) -> Generations:
    """Connect (pinned host key) and read the node's generations with one command.

    RemoteError for anything that stops it (unreachable, host key, login, the command failing, or
    not ending within ``timeout`` seconds: someone waits for it, and a hung file system must not keep
    them waiting; the command is killed on the node).
    """
    out: list[bytes] = []
    err: list[bytes] = []
    deadline = time.monotonic() + timeout
    with Connection(target) as conn:
        try:
            code = run_command(
                conn,
                list_script(),
                lambda stream, line: (out if stream == "out" else err).append(line),
                should_cancel=lambda: time.monotonic() >= deadline,
            )
        except Cancelled:
            raise RemoteError(
                "protocol", f"reading the generations on {target.address} took longer than {timeout:g} s: stopped"
            ) from None
    if code != 0:
        raise RemoteError(
            "protocol", f"reading the generations on {target.address} failed (exit {code}){stderr_tail(err)}"
        )
    return parse_generations(b"\n".join(out).decode("utf-8", "replace"))


# -- going back -------------------------------------------------------------------------------


@dataclass
class RollbackResult:
    """Outcome of a rollback that started. Non-zero ``exit_code``: nix-env or the activation failed."""

    exit_code: int
    before: SystemState
    after: SystemState
    toplevel: str | None  # the system the profile points at afterwards (exit 0 only)
    generation: int  # the generation it went to (as the node named it before starting)
    generation_path: str  # its store path
    generations: Generations  # what the node had before


def rollback_invocation(target: Target, generation: int | None, action: str, *, privileged: bool = True) -> str:
    """The command the detached run executes: nix-env on the profile, then its switch-to-configuration.

    One ``sh -c`` (under sudo if the target needs it) so both steps run as root and the run's exit status
    is theirs; an activation failure is said as nixos-rebuild says it, exit 1.
    """
    check_generation(generation)
    check_action(action)
    p = shlex.quote(SYSTEM_PROFILE)
    step = "--rollback" if generation is None else f"--switch-generation {shlex.quote(str(int(generation)))}"
    script = (
        f"nix-env -p {p} {step} || exit $?; "
        f"if ! {p}/bin/switch-to-configuration {shlex.quote(action)}; then "
        "echo 'warning: error(s) occurred while switching to the new configuration' >&2; exit 1; fi"
    )
    prefix = target.privileged_prefix() if privileged else ""
    return f"{prefix}sh -c {shlex.quote(script)}"


def _target_check(generation: int | None, profile: str = SYSTEM_PROFILE) -> str:
    """Shell: find the generation to go to (into n and t) or say why there is none and exit."""
    p = shlex.quote(profile)
    if generation is None:
        find = (
            f"c=$(readlink {p} 2>/dev/null); c=${{c##*/}}; c=${{c#system-}}; c=${{c%-link}}; n=; "
            f'case $c in ""|*[!0-9]*) ;; *) for l in {p}-*-link; do [ -L "$l" ] || continue; '
            'k=${l##*/system-}; k=${k%-link}; case $k in ""|*[!0-9]*) continue ;; esac; '
            '[ "$k" -lt "$c" ] && { [ -z "$n" ] || [ "$k" -gt "$n" ]; } && n=$k; done ;; esac; '
            f'[ -n "$n" ] || exit {_NO_PREVIOUS_EXIT}'
        )
    else:
        n = shlex.quote(str(int(generation)))
        find = f"n={n}; [ -L {p}-$n-link ] || exit {_NO_GENERATION_EXIT}"
    return f'{find}; t=$(readlink -f -- {p}-$n-link); printf \'{_TARGET_MARK.decode()}%s %s\\n\' "$n" "$t"'


def _start_script(target: Target, workdir: str, generation: int | None, action: str) -> str:
    """One remote command: the state before and the generations, the target checked, the stale folders
    swept, the run folder made, the rollback started detached (``detached.launch_script``), then followed.

    Like the rebuild's ship-and-launch command, without the source: run again for the same folder (after
    a drop) it starts nothing twice. Exits ``_NO_GENERATION_EXIT`` / ``_NO_PREVIOUS_EXIT`` before the
    folder is made when there is nowhere to go.
    """
    workdir = check_remote_dir(workdir)
    parent = os.path.dirname(workdir)
    qp, qd, qo = shlex.quote(parent), shlex.quote(workdir), shlex.quote(workdir + OWNER_SUFFIX)
    qn = shlex.quote(workdir + OWNER_SUFFIX + ".new")
    secret = target.privileged_stdin() is not None
    unit = "nixos-panel-" + os.path.basename(workdir)
    launched = f'printf \'{_LAUNCHED_MARK.decode()}%s %s\\n\' "$g" "$u"'
    read_run = f"g=; read -r g < {qd}/pgid; u=; [ -f {qd}/unit ] && read -r u < {qd}/unit"
    invocation = rollback_invocation(target, generation, action)
    plain = rollback_invocation(target, generation, action, privileged=False)
    lines = [
        f"IFS= read -r {_PW_VAR} || exit {_PARENT_EXIT - 1}" if secret else "",
        f"if [ -s {qd}/pgid ]; then {read_run}; {launched}; else",
        f"{{ {state_script(_STATE_MARK.decode())}; {_listing()}; }} </dev/null",
        _target_check(generation),
        f"mkdir -p -m 700 -- {qp} && test -d {qp} && test ! -h {qp} && test -O {qp} || exit {_PARENT_EXIT}",
        _sweep_script(parent),
        f"echo $$ > {qo} || exit",
        f"rm -rf -- {qd} && mkdir -m 700 -- {qd} {qd}/src || exit",
        f"echo {_READY_MARK.decode()}",
        f"cd {qd} && : > out && : > err || exit",
        launch_script(target, workdir, invocation, plain, unit, _PW_VAR),
        read_run,
        f'echo "$g" > {qn} && mv -f {qn} {qo} || exit',
        launched,
        "fi",
        follow_lines(workdir, "$g", 0, 0),
    ]
    return "\n".join(line for line in lines if line)


class _RollbackPrelude(_Prelude):
    """The rebuild's prelude (state, sweep notes, launched mark) plus the generations and the target."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.listing: list[str] = []
        self.target: tuple[int, str] | None = None

    def handle(self, workdir: str) -> RunHandle | None:
        if self.launched is not None and self.target is not None:
            self.note(f"generation {self.target[0]} is {self.target[1]}")
        return super().handle(workdir)

    def __call__(self, stream: str, line: bytes) -> None:
        if not self.shipped and stream == "out":
            text = line.decode("utf-8", "replace")
            if text.startswith((_GEN_MARK, _PROFILE_MARK, _CURRENT_MARK, _BOOTED_MARK)):
                self.listing.append(text)
                return
            if line.startswith(_TARGET_MARK):
                number, _, path = line[len(_TARGET_MARK) :].decode("utf-8", "replace").partition(" ")
                if number.isdigit():
                    self.target = (int(number), path.strip())
                return
            if line == _READY_MARK:
                line = _SHIPPED_MARK  # the rebuild's prelude takes it for "ready to start": nothing is shipped
        super().__call__(stream, line)


def run_rollback(
    target: Target,
    *,
    deployment_id: int,
    generation: int | None,
    action: str,
    on_output: OutputCallback,
    should_cancel: Callable[[], bool] | None = None,
    on_workdir: Callable[[str], None] | None = None,
) -> RollbackResult:
    """Go back to ``generation`` (None: the previous one) on one node, then ``switch-to-configuration
    <action>``; detached from the SSH session and followed like ``rebuild.run_rebuild``.

    Contract, as ``run_rebuild``'s: ValueError for invalid input before connecting; RemoteError for what
    stops it (:class:`GenerationMissing` when there is nowhere to go: nothing changed); a non-zero exit of
    the run is returned; :class:`Cancelled` after the run's process group was killed; the folder goes once
    its outcome is read; panel lines go to ``on_output("sys", ...)``.
    """
    check_generation(generation)
    check_action(action)
    workdir = _new_workdir(deployment_id, target.user)
    script = _start_script(target, workdir, generation, action)

    def note(msg: str) -> None:
        on_output("sys", msg.encode())

    note(f"connecting to {target.user}@{target.address}")
    link = Link(target, note)
    link.open()
    if on_workdir is not None:
        on_workdir(workdir)
    states: list[SystemState] = []
    invocation = rollback_invocation(target, generation, action)
    prelude = _RollbackPrelude(
        on_output,
        lambda lines: (states.append(parse_state(lines)), note(states[-1].describe("before"))),
        lambda: note(f"running: {invocation}"),
        note,
    )
    collected = removed = False
    try:
        note(f"host key verified ({target.host_key.fingerprint})")
        if target.sudo:
            _check_sudo(link.conn, target)
        what = "the previous generation" if generation is None else f"generation {generation}"
        note(f"going back to {what} ({action})")

        try:
            report = follow_run(
                link,
                None,
                on_output=on_output,
                note=note,
                should_cancel=should_cancel,
                resolve=SYSTEM_PROFILE,
                start=(script, target.privileged_stdin() or b""),
                on_prelude=prelude,
                launched=lambda: prelude.handle(workdir),
            )
        except NotStarted as e:
            gens = parse_generations("\n".join(prelude.listing))
            err = [line for stream, line in prelude.held if stream == "err"]
            if e.code == _NO_GENERATION_EXIT:
                raise GenerationMissing(
                    f"generation {generation} does not exist on {target.address} (it has {gens.numbers()}): "
                    "nothing was changed"
                ) from None
            if e.code == _NO_PREVIOUS_EXIT:
                current = gens.profile_generation if gens.profile_generation is not None else "none"
                raise GenerationMissing(
                    f"no generation older than the current one ({current}) exists on {target.address} "
                    f"(it has {gens.numbers()}): nothing was changed"
                ) from None
            if e.code == _PARENT_EXIT:
                raise RemoteError(
                    "ship",
                    f"cannot use {os.path.dirname(workdir)} on {target.address}: "
                    f"it must be a directory owned by {target.user!r}{stderr_tail(err)}",
                ) from None
            raise RemoteError(
                "ship", f"the rollback did not start on {target.address} (exit {e.code}){stderr_tail(err)}"
            ) from None
        except (Cancelled, RemoteError) as e:
            collected = isinstance(e, Cancelled) or e.kind == "killed"
            raise
        collected, removed = True, report.removed
        before = states[0] if states else parse_state([])
        note(f"exit code {report.exit_status}")
        after = SystemState(report.generation, report.profile_path, report.current_system)
        note(after.describe("after"))
        toplevel = (report.toplevel or None) if report.exit_status == 0 else None
        number, path = prelude.target if prelude.target is not None else (after.generation or 0, toplevel or "")
        return RollbackResult(
            exit_code=report.exit_status,
            before=before,
            after=after,
            toplevel=toplevel,
            generation=number,
            generation_path=path,
            generations=parse_generations("\n".join(prelude.listing)),
        )
    finally:
        try:
            if prelude.launched is not None and not collected:
                note(f"left {workdir} on the node: it holds the run's output and, once it ends, its exit status")
            elif removed:
                note(f"removed {workdir}: its outcome is read")
            elif prelude.shipped and link.conn is not None:
                note("cleaning up")
                read_output(link.conn, remove_script(workdir))
        except (RemoteError, RuntimeError, OSError) as e:
            try:
                note(f"warning: could not remove {workdir}: {e}")
            except Exception:
                pass
        link.close()
