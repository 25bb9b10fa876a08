"""Processes by what they belong to, read from Linux's /proc: the one process-tree walker of tests and bench.

Tests look only at processes they started (below a pid, in a node's network
namespace, or carrying a node's session environment), never machine-wide, so
other work on the same machine never counts.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), or None if it is gone.

    Index ``n`` here is field ``n + 3`` of proc(5): 1 is the parent, 2 the process group, 21 the RSS in pages.
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cmdline(pid: int) -> str | None:
    """The process's arguments joined by spaces; None if it is gone or a kernel thread."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace") or None


def descendants(root: int) -> list[int]:
    """Pids of every process below ``root``, parents before their children."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        fields = stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_group(pgid: int) -> list[int]:
    """Pids of the processes in process group ``pgid``."""
    return [pid for pid in _pids() if (fields := stat_fields(pid)) is not None and int(fields[2]) == pgid]


def processes_of(*, netns: str | None = None, below: int | None = None, environ: str | None = None) -> dict[int, str]:
    """Command lines by pid of the processes that belong to one owner, and no others.

    A process belongs if it is in the network namespace ``netns`` (a path such
    as ``/run/netns/<name>``), or below pid ``below``, or its environment holds
    the entry ``environ`` (``NAME=value``, as sshd's SetEnv gives each session;
    an orphan reparented to init still carries it).  Kernel threads (no command
    line) and the calling process are left out.
    """
    pids: set[int] = set()
    if below is not None:
        pids.update(descendants(below))
    ns_ino = os.stat(netns).st_ino if netns is not None else None
    wanted = environ.encode() if environ is not None else None
    if ns_ino is not None or wanted is not None:
        for pid in _pids():
            try:
                if ns_ino is not None and os.stat(f"/proc/{pid}/ns/net").st_ino == ns_ino:
                    pids.add(pid)
                elif wanted is not None and wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    pids.add(pid)
            except OSError:
                continue
    pids.discard(os.getpid())
    found = {pid: cmdline(pid) for pid in pids}
    return {pid: cmd for pid, cmd in found.items() if cmd}


def matching(found: dict[int, str], text: str) -> list[int]:
    """Pids in ``found`` (from processes_of) whose command line contains ``text``."""
    return [pid for pid, cmd in found.items() if text in cmd]


def sshd_sessions(found: dict[int, str]) -> list[int]:
    """Pids in ``found`` that are sshd's per-connection processes (not its listener)."""
    return [
        pid
        for pid, cmd in found.items()
        # The listener calls itself "sshd: /usr/sbin/sshd … [listener] …" too (OpenSSH 9).
        if cmd.startswith(("sshd: ", "sshd-session: ")) and "[listener]" not in cmd
    ]


def kill_all(pids) -> None:
    """SIGKILL each pid that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
