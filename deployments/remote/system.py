"""What a node runs: its system profile generation and ``/run/current-system``, read by one shell snippet.

No Django here.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass

from .connection import Connection, RemoteError, Target
from .stream import run_command

__all__ = ["CURRENT_SYSTEM", "SYSTEM_PROFILE", "SystemState", "parse_state", "read_state", "state_script"]

SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
CURRENT_SYSTEM = "/run/current-system"
_GENERATION_RE = re.compile(r"^system-(\d+)-link$")


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


def state_script(mark: str = "") -> str:
    """Shell that prints three lines, each ``mark`` then possibly nothing: the
    profile link's target, its store path, the current system.

    It runs at the start and the end of every deployment, so it starts one program, not three: a system
    is a directory, and ``cd -P`` (a shell builtin) resolves it as ``readlink -f`` does, in a subshell so
    the caller's directory and variables stay as they were; ``readlink -f`` only where that fails.
    """
    p, c = shlex.quote(SYSTEM_PROFILE), shlex.quote(CURRENT_SYSTEM)

    def resolved(var: str, path: str) -> str:
        return (
            f"{var}=; if cd -P {path} 2>/dev/null; then {var}=$PWD; "
            f"elif [ -e {path} ]; then {var}=$(readlink -f {path} 2>/dev/null); fi; "
        )

    return (
        f"( l=$(readlink {p} 2>/dev/null); "
        + resolved("r", p)
        + resolved("s", c)
        + f'printf \'{mark}%s\\n\' "$l" "$r" "$s" )'
    )


def parse_state(lines: list[str]) -> SystemState:
    """The state from ``state_script``'s three lines (without their mark)."""
    link, profile_path, current = (x.strip() for x in (list(lines) + ["", "", ""])[:3])
    m = _GENERATION_RE.match(os.path.basename(link))
    return SystemState(
        generation=int(m.group(1)) if m else None,
        profile_path=profile_path,
        current_system=current,
    )


def read_state(target: Target, *, timeout: float) -> SystemState:
    """Connect (pinned host key only), read the node's state, disconnect; all within about ``timeout`` s.

    Raises RemoteError: whatever connecting raises, ``disconnected`` when the read does not finish in time,
    ``protocol`` when the snippet fails.  Needs no root: the links are world-readable.
    """
    deadline = time.monotonic() + timeout
    lines: list[str] = []

    def collect(stream: str, line: bytes) -> None:
        if stream == "out":
            lines.append(line.decode(errors="replace"))

    def in_time() -> None:
        if time.monotonic() > deadline:
            raise RemoteError("disconnected", f"{target.address} did not answer within {timeout:g} s")

    with Connection(target) as conn:
        in_time()
        code = run_command(conn, state_script(), collect, on_tick=in_time, poll=0.1)
    if code != 0:
        raise RemoteError("protocol", f"reading the system of {target.address} failed (exit {code})")
    return parse_state(lines)
