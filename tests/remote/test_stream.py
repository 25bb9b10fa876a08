"""deployments.remote.stream: every line, in order, stdout and stderr apart; cancel kills the remote tree."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import time

import pytest

from deployments.remote import Cancelled, RemoteError
from deployments.remote import stream as stream_module
from deployments.remote.connection import Connection
from deployments.remote.stream import read_output, run_command
from tests.support.wait import wait_for

from .server import collect

pytestmark = pytest.mark.timeout(120)


def test_streaming_throughput_no_loss_in_order(node):
    n = 200_000
    cmd = f"seq -f '%074.0f' 1 {n}"  # 74 digits + newline = 75 bytes a line
    with Connection(node.target()) as conn:
        got: list[bytes] = []
        append = got.append
        t0 = time.perf_counter()
        code = run_command(conn, cmd, lambda stream, line: append(line))
        ours = time.perf_counter() - t0

        # Bare paramiko on the same connection, as the reference ceiling.
        t0 = time.perf_counter()
        chan = conn.transport.open_session()
        chan.exec_command(cmd)
        buf = bytearray()
        while True:
            data = chan.recv(65536)
            if not data:
                break
            buf += data
        bare_code = chan.recv_exit_status()
        bare = time.perf_counter() - t0
        chan.close()

    assert code == 0 and bare_code == 0
    assert len(got) == n
    assert all(len(line) == 74 for line in got)
    assert [int(x) for x in got] == list(range(1, n + 1))
    assert buf.count(b"\n") == n
    ours_rate, bare_rate = n / ours, n / bare
    print(
        f"\nstreaming {n} lines x 75 B: run_command {ours_rate:,.0f} lines/s ({ours:.3f} s); "
        f"bare paramiko {bare_rate:,.0f} lines/s ({bare:.3f} s)"
    )
    # Loose bounds: shared CI machines are noisy; the figures above are the real result.
    assert ours_rate > 0.4 * bare_rate
    assert ours_rate > 100_000


def test_stdout_stderr_separated_ordered_and_partial_lines(node):
    lines, out = collect()
    cmd = (
        "echo o1; sleep 0.05; echo e1 >&2; sleep 0.05; echo o2; sleep 0.05; "
        "printf 'e2\\ne3\\n' >&2; sleep 0.05; printf 'o-partial'; sleep 0.05; printf 'e-partial' >&2; exit 3"
    )
    with Connection(node.target()) as conn:
        assert run_command(conn, cmd, out) == 3
    assert lines[:5] == [("out", b"o1"), ("err", b"e1"), ("out", b"o2"), ("err", b"e2"), ("err", b"e3")]
    assert sorted(lines[5:]) == [("err", b"e-partial"), ("out", b"o-partial")]
    assert not any(b"PGID" in line for _, line in lines)


def test_stdin_is_fed_and_closed(node):
    lines, out = collect()
    with Connection(node.target()) as conn:
        assert run_command(conn, "cat; echo end", out, stdin=b"one\ntwo") == 0
        assert run_command(conn, "cat; echo end2", out) == 0  # no stdin: EOF at once, no hang
    assert lines == [("out", b"one"), ("out", b"twoend"), ("out", b"end2")]


def test_quoted_values_arrive_literally(node):
    weird = "a b'c\"d $(echo pwned) `id` ; | & > < * ? \\ \t end"
    lines, out = collect()
    with Connection(node.target()) as conn:
        assert run_command(conn, f"printf '%s\\n' {shlex.quote(weird)}", out) == 0
    assert lines == [("out", weird.encode())]


def test_a_command_killed_by_a_signal_ends_with_an_exit_code_not_a_lost_connection(node):
    """A command whose last program dies of a signal (a check's segfault, a `timeout` passing on its
    child's signal) ends with an exit code: the wrapper's ``setsid -w`` stays outside the command's
    process group and exits with the child's wait status (util-linux: N for signal N). sshd alone would
    report the signal instead of an exit status, and the connection would look lost."""
    with Connection(node.target()) as conn:
        assert run_command(conn, "kill -TERM $$", lambda stream, line: None) == signal.SIGTERM
        assert run_command(conn, "true; exec sh -c 'kill -KILL $$'", lambda stream, line: None) == signal.SIGKILL
        assert run_command(conn, "echo still here", lambda stream, line: None) == 0  # the connection is fine


def test_read_output_returns_stdout_or_names_the_failure(node):
    with Connection(node.target()) as conn:
        assert read_output(conn, "printf 'a\\nb\\n'") == "a\nb"
        with pytest.raises(RemoteError) as e:
            read_output(conn, "echo boom >&2; exit 2")
    assert e.value.kind == "protocol" and "boom" in e.value.message and "exit 2" in e.value.message


def test_cancel_kills_the_remote_process_group(node):
    marker = f"sleep 100.{secrets.randbelow(10**6):06d}"
    lines: list = []
    cancel = {"now": False}

    def out(stream, line):
        lines.append((stream, line))
        if line == b"started":
            cancel["now"] = True

    with Connection(node.target()) as conn:
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            run_command(
                conn, f"{marker} & echo started; wait; echo never", out, should_cancel=lambda: cancel["now"], poll=0.05
            )
        assert time.monotonic() - t0 < 4  # SIGTERM sufficed; no 5 s KILL grace needed
        # The connection stays usable after a cancel.
        assert read_output(conn, "echo still-here") == "still-here"
    wait_for(lambda: not node.pids(marker), 5, interval=0.02, what="remote sleep to be gone")
    assert ("out", b"never") not in lines


def test_cancel_escalates_to_kill_when_term_is_ignored(node, monkeypatch):
    monkeypatch.setattr(stream_module, "CANCEL_GRACE_SECONDS", 0.5)
    marker = f"sleep 101.{secrets.randbelow(10**6):06d}"
    flag = {"now": False}

    def out(stream, line):
        if line == b"started":
            flag["now"] = True

    with Connection(node.target()) as conn:
        with pytest.raises(Cancelled):
            run_command(
                conn, f"trap '' TERM; {marker} & echo started; wait", out, should_cancel=lambda: flag["now"], poll=0.05
            )
    wait_for(lambda: not node.pids(marker), 5, interval=0.02, what="remote sleep to be gone")


def test_dropped_connection_is_disconnected(node):
    marker = f"sleep 77.{secrets.randbelow(10**6):06d}"
    killed: list[int] = []

    def out(stream, line):
        if line == b"started" and not killed:
            for pid in node.session_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    conn = Connection(node.target())
    conn.open()
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as e:
            run_command(conn, f"echo started; {marker}; echo never", out)
        assert e.value.kind == "disconnected"
        assert killed
        assert time.monotonic() - t0 < 10
        with pytest.raises(RemoteError) as e2:
            run_command(conn, "true", out)
        assert e2.value.kind == "disconnected"
    finally:
        conn.close()
        for pid in node.pids(marker):  # the orphaned remote sleep
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
