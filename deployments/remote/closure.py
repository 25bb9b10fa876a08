"""Copying a system's closure to a node, and comparing it with what the node runs.

No Django here.

``copy_closure`` does what ``nix-copy-closure --to`` does, over the panel's
own pinned-key connections: the closure is listed on the source
(``nix-store -qR``), the target says which of those paths it lacks
(``nix-store --check-validity --print-invalid``), and only those are exported
on the source (``nix-store --export``, in dependency order) and streamed
through the panel into ``nix-store --import`` on the target. No key file, no
SSH agent, no connection from the source to the target: the source is the
panel host itself or a build host the panel reaches with its own credential
and pinned host key. The imported system is held by a GC root on the target
until it is activated (or a diff of it expires).

``diff_closure`` asks the target for ``nix store diff-closures`` between
``/run/current-system`` and the new system, the closure sizes, and where the
kernel, initrd and systemd links of each point; ``parse_diff`` makes that the
structured diff the panel stores.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from .build import GCROOTS, NIX, check_store_path, root_path, sweep_roots
from .connection import Cancelled, Connection, RemoteError
from .stream import run_command, stderr_tail
from .system import CURRENT_SYSTEM, parse_state, state_script

__all__ = ["REBOOT_LINKS", "CopyStats", "copy_closure", "diff_closure", "parse_diff", "still_there"]

# The links of a NixOS toplevel whose change needs a reboot to take effect.
REBOOT_LINKS = ("kernel", "initrd", "systemd")
_CHUNK = 1 << 16
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_DELTA_RE = re.compile(r"^(?P<rest>.*?)(?:, )?(?P<delta>[+-]\d+(?:\.\d+)?) KiB$")
_DIFF_MARK = "__NIXOS_PANEL_DIFF__"


@dataclass
class CopyStats:
    """What a copy did: the closure's paths, those the target lacked and were sent, and the bytes sent."""

    paths: int
    copied: int
    bytes: int

    def describe(self, source: str, target: str) -> str:
        if not self.copied:
            return f"all {self.paths} paths of the closure are already on {target}: nothing to copy"
        return (
            f"copied {self.copied} of {self.paths} paths ({self.bytes / 1048576:.1f} MiB, {self.bytes} bytes) "
            f"from {source} to {target}"
        )


class LocalStore:
    """The panel host's own store as a copy's source."""

    name = "the panel host"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env

    def closure(self, toplevel: str) -> list[str]:
        proc = subprocess.run(["nix-store", "-qR", toplevel], capture_output=True, env=self.env)
        if proc.returncode != 0:
            raise RemoteError(
                "copy", f"{toplevel} is not in the panel host's store: {proc.stderr.decode(errors='replace').strip()}"
            )
        return proc.stdout.decode().split()

    def export(self, paths: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            ["nix-store", "--export", *paths], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env
        )


class RemoteStore:
    """A node's store (a build host) as a copy's source, over the panel's connection to it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.name = conn.target.address

    def closure(self, toplevel: str) -> list[str]:
        err: list[bytes] = []
        out: list[bytes] = []
        code = run_command(
            self.conn,
            f"nix-store -qR {shlex.quote(toplevel)}",
            lambda s, line: (out if s == "out" else err).append(line),
        )
        if code != 0:
            raise RemoteError("copy", f"{toplevel} is not in the store of {self.name}{stderr_tail(err)}")
        return [line.decode() for line in out if line.startswith(b"/nix/store/")]


def _missing(target: Connection, paths: list[str]) -> list[str]:
    out: list[bytes] = []
    err: list[bytes] = []
    code = run_command(
        target,
        "xargs -r nix-store --check-validity --print-invalid",
        lambda s, line: (out if s == "out" else err).append(line),
        stdin=("\n".join(paths) + "\n").encode(),
    )
    if code != 0:
        raise RemoteError("copy", f"{target.target.address} could not check its store (exit {code}){stderr_tail(err)}")
    wanted = set(paths)
    return [p for p in (line.decode() for line in out) if p in wanted]


def _root_command(toplevel: str, root: str) -> str:
    return f"mkdir -p {shlex.quote(GCROOTS)} && ln -sfn {shlex.quote(toplevel)} {shlex.quote(root_path(root))}"


def copy_closure(
    source: LocalStore | RemoteStore,
    target: Connection,
    toplevel: str,
    *,
    root: str,
    note: Callable[[str], None],
    should_cancel: Callable[[], bool] | None = None,
) -> CopyStats:
    """Copy the closure of ``toplevel`` from ``source`` into ``target``'s store: only the paths it lacks.

    Then ``toplevel`` is held by GC root ``root`` on the target. RemoteError ``copy`` names what failed
    with the end of its stderr (e.g. "No space left on device" from the target's import); the target's
    store only ever gains whole, valid paths (``nix-store --import`` registers each after writing it).
    """
    check_store_path(toplevel)
    t = target.target
    paths = source.closure(toplevel)
    missing = _missing(target, paths)
    note(f"the closure of {toplevel} has {len(paths)} paths; {t.address} lacks {len(missing)}")
    sent = 0
    if missing:
        import_cmd = privileged_with_stdin(t, "nix-store --import >/dev/null && " + _root_command(toplevel, root))
        sent = _pipe(source, missing, target, import_cmd, should_cancel)
    else:
        _privileged(target, _root_command(toplevel, root), "holding the system with a GC root")
    stats = CopyStats(paths=len(paths), copied=len(missing), bytes=sent)
    note(stats.describe(source.name, t.address))
    return stats


def privileged_with_stdin(t, script: str) -> str:
    """``script`` as root, reading data on its stdin (the import stream).

    With a sudo password, stdin starts with its line (``privileged_stdin``). sudo may not read that line
    (a NOPASSWD rule, a cached credential), and then it would be the start of the data. So the shell
    takes the line, sudo gets it alone on a pipe, and the data reaches the script through a FIFO in a
    private folder (``cat`` from the session's stdin): the script sees exactly the data, whether sudo
    read its line or not. A refused sudo ends the command with its status (the writer is stopped).
    """
    inner = f"sh -c {shlex.quote(script)}"
    if not t.sudo:
        return inner
    if t.privileged_stdin() is None:
        return f"sudo -n {inner}"
    fed = shlex.quote(f'exec <"$1" && {inner}')
    return "; ".join(
        [
            "IFS= read -r pw || exit 1",
            'd=$(mktemp -d) && mkfifo -m 600 "$d/in" || exit 1',
            "exec 4<&0",
            f"printf '%s\\n' \"$pw\" | sudo -S -p '' sh -c {fed} sh \"$d/in\" & s=$!",
            "unset pw",
            'cat <&4 >"$d/in" & c=$!',
            "wait $s; r=$?",
            "kill $c 2>/dev/null",
            'rm -rf "$d"',
            "exit $r",
        ]
    )


def _privileged(conn: Connection, script: str, what: str) -> None:
    t = conn.target
    err: list[bytes] = []
    code = run_command(
        conn,
        f"{t.privileged_prefix()}sh -c {shlex.quote(script)}",
        lambda s, line: err.append(line) if s == "err" else None,
        stdin=t.privileged_stdin(),
    )
    if code != 0:
        raise RemoteError("copy", f"{what} on {t.address} failed (exit {code}){stderr_tail(err)}")


def _pipe(source, paths: list[str], target: Connection, import_cmd: str, should_cancel) -> int:
    """Stream ``nix-store --export paths`` on the source into ``import_cmd`` on the target; bytes sent."""
    t = target.target
    dest = target.transport.open_session()
    dest.exec_command(import_cmd)
    secret = t.privileged_stdin()
    if secret:
        dest.sendall(secret)
    dest_err = bytearray()
    src_err = bytearray()
    sent = 0
    local = None
    chan = None
    dest_gave_up = False
    src_code = 0
    try:
        if isinstance(source, LocalStore):
            local = source.export(paths)
            read = local.stdout.read1 if hasattr(local.stdout, "read1") else local.stdout.read
        else:
            chan = source.conn.transport.open_session()
            # All the paths on one command line: xargs could split them into several exports, and
            # nix-store --import reads one.
            chan.exec_command("set -f; exec nix-store --export $(cat)")
            chan.sendall(("\n".join(paths) + "\n").encode())
            chan.shutdown_write()

            def read(n: int) -> bytes:
                while True:
                    if chan.recv_ready() or chan.eof_received:
                        return chan.recv(n)
                    if chan.recv_stderr_ready():
                        src_err.extend(chan.recv_stderr(_CHUNK))
                    time.sleep(0.001)

        while True:
            if should_cancel is not None and should_cancel():
                raise Cancelled("the copy was stopped")
            data = read(_CHUNK)
            if not data:
                break
            while dest.recv_stderr_ready():
                dest_err.extend(dest.recv_stderr(_CHUNK))
            while dest.recv_ready():
                dest.recv(_CHUNK)
            if dest.exit_status_ready() and not dest.recv_ready():
                dest_gave_up = True  # the import gave up (e.g. the disk is full): its status says why
                break
            try:
                dest.sendall(data)
            except OSError:
                dest_gave_up = True
                break
            sent += len(data)
        if dest_gave_up:
            pass  # the source is stopped below; the import's status and stderr say what happened
        elif local is not None:
            src_code = local.wait()
            src_err.extend(local.stderr.read())
        else:
            while not chan.exit_status_ready() or chan.recv_stderr_ready():
                if chan.recv_stderr_ready():
                    src_err.extend(chan.recv_stderr(_CHUNK))
                else:
                    time.sleep(0.005)
            src_code = chan.recv_exit_status()
        if chan is not None and dest_gave_up:
            chan.close()
        dest.shutdown_write()
        while True:
            if dest.recv_stderr_ready():
                dest_err.extend(dest.recv_stderr(_CHUNK))
            elif dest.recv_ready():
                dest.recv(_CHUNK)
            elif dest.exit_status_ready() and dest.eof_received:
                break
            else:
                time.sleep(0.005)
        dest_code = dest.recv_exit_status()
    finally:
        dest.close()
        if chan is not None:
            chan.close()
        if local is not None and local.poll() is None:
            local.kill()
            local.wait()
    if dest_code != 0:
        raise RemoteError(
            "copy",
            f"importing the system into the store of {t.address} failed (exit {dest_code})"
            f"{stderr_tail(bytes(dest_err).splitlines())}",
        )
    if src_code != 0:
        raise RemoteError(
            "copy",
            f"exporting the closure from {source.name} failed (exit {src_code}){stderr_tail(bytes(src_err).splitlines())}",
        )
    return sent


def still_there(conn: Connection, toplevel: str) -> bool:
    """Whether ``toplevel`` is a valid path in the node's store."""
    check_store_path(toplevel)
    code = run_command(conn, f"nix-store --check-validity {shlex.quote(toplevel)}", lambda s, line: None)
    return code == 0


def _diff_script(toplevel: str) -> str:
    t = shlex.quote(check_store_path(toplevel))
    c = shlex.quote(CURRENT_SYSTEM)
    links = " ".join(REBOOT_LINKS)
    return "\n".join(
        [
            # Diffs nobody confirmed in time: their systems may go with the next garbage collection.
            sweep_roots("diff-*"),
            state_script("state "),
            f"o=$(readlink -f {c} 2>/dev/null)",
            f'for x in {links}; do printf "old-%s %s\\n" $x "$(readlink -f "$o/$x" 2>/dev/null)"; '
            f'printf "new-%s %s\\n" $x "$(readlink -f {t}/$x 2>/dev/null)"; done',
            f'printf "old-size %s\\n" "$({NIX} path-info -S "$o" 2>/dev/null | cut -f2)"',
            f'printf "new-size %s\\n" "$({NIX} path-info -S {t} 2>/dev/null | cut -f2)"',
            f"echo {_DIFF_MARK}",
            f'{NIX} store diff-closures "$o" {t}',
        ]
    )


def diff_closure(conn: Connection, toplevel: str) -> dict:
    """Compare ``toplevel`` (in the node's store) with the node's ``/run/current-system``: ``parse_diff``."""
    out: list[bytes] = []
    err: list[bytes] = []
    code = run_command(conn, _diff_script(toplevel), lambda s, line: (out if s == "out" else err).append(line))
    if code != 0:
        raise RemoteError(
            "diff", f"comparing the systems on {conn.target.address} failed (exit {code}){stderr_tail(err)}"
        )
    return parse_diff(b"\n".join(out).decode("utf-8", "replace"), toplevel)


def _versions(text: str) -> list[str]:
    text = text.strip()
    if text == "∅":
        return []
    return ["" if v == "ε" else v for v in text.split(", ")]


def parse_diff(text: str, toplevel: str) -> dict:
    """The structured diff from ``_diff_script``'s output.

    ``packages``: ``added`` / ``removed`` (name, versions), ``changed`` (name, from, to, size_delta in
    bytes or None): one entry per line of ``nix store diff-closures`` (``name: 1.0 → 1.1, +12.3 KiB``,
    ``∅`` for none, ``ε`` for an empty version). ``size``: the closures' sizes before and after.
    ``reboot``: which of kernel, initrd, systemd point elsewhere (a reboot hint).
    """
    values: dict[str, str] = {}
    state: list[str] = []
    lines = text.split("\n")
    try:
        mark = lines.index(_DIFF_MARK)
    except ValueError:
        raise RemoteError("diff", "the node's answer holds no closure difference") from None
    for line in lines[:mark]:
        key, _, value = line.partition(" ")
        if key == "state":
            state.append(value)
        else:
            values[key] = value.strip()
    added, removed, changed = [], [], []
    for raw in lines[mark + 1 :]:
        line = _ANSI_RE.sub("", raw).strip()
        if not line or ": " not in line:
            continue
        name, _, rest = line.partition(": ")
        delta = None
        m = _DELTA_RE.match(rest)
        if m:
            delta = round(float(m.group("delta")) * 1024)
            rest = m.group("rest")
        if " → " in rest:
            old, new = (_versions(v) for v in rest.split(" → ", 1))
        else:
            old = new = []
        if not old and new:
            added.append({"name": name, "versions": new, "size_delta": delta})
        elif old and not new:
            removed.append({"name": name, "versions": old, "size_delta": delta})
        else:
            changed.append({"name": name, "from": old, "to": new, "size_delta": delta})
    system = parse_state(state)

    def size(key: str) -> int | None:
        v = values.get(key, "")
        return int(v) if v.isdigit() else None

    before, after = size("old-size"), size("new-size")
    reboot = [x for x in REBOOT_LINKS if values.get(f"old-{x}", "") != values.get(f"new-{x}", "")]
    return {
        "from": system.current_system,
        "to": toplevel,
        "generation": system.generation,
        "packages": {"added": added, "removed": removed, "changed": changed},
        "size": {
            "before": before,
            "after": after,
            "delta": after - before if before is not None and after is not None else None,
        },
        "reboot": reboot,
        "links": {x: {"from": values.get(f"old-{x}", ""), "to": values.get(f"new-{x}", "")} for x in REBOOT_LINKS},
    }
