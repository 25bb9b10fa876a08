#!/usr/bin/env python
"""One node's run, phase by phase: the panel's remote runner against bare paramiko (issue 9).

    .venv/bin/python bench/node_bench.py              # 8 rounds on one testbed node, about a minute
    .venv/bin/python bench/node_bench.py --rounds 20

No Django database, no worker, no other node: ``deployments.remote.run_rebuild`` (connect with the pinned
key, ship the ``git archive``, read the state before, start ``nixos-rebuild switch`` detached, follow its
output files, then read the state after and remove the folder) against bare paramiko running the same
``nixos-rebuild switch --flake path:/root/fleet#bench`` on the same node (the flake unpacked there
beforehand, not timed), once with paramiko's defaults and once with TCP_NODELAY on its socket as the
panel sets it (each packet sent at once instead of waiting for the node's delayed ACK).  Each run gets a
new system (a new build and switch every time); the order rotates between rounds.  This is the panel's protocol cost per node on an otherwise idle
machine: what a rollout's wall time comes to when nodes have CPUs of their own.

Reported: the wall time of each, their ratio (median over rounds), and where the runner's time goes,
from its own progress lines: connect (→ host key verified), ship (→ state before: the source unpacked on
the node), launch (→ the run started), run (→ the last line of the run's output), finish (→ exit code:
the end noticed, then the state after read and the folder removed, ``detached.finish``, also timed alone).
The runner also runs armed (magic rollback, as every node is by default: the node waits after the switch
until the panel confirms over a new connection). CPU time of each run, split three ways: this process (the
runner or bare paramiko), the node (its sshd and everything under it, from a cgroup v1 ``cpuacct`` group of
its own, where the machine lets the bench make one), and the whole machine (``/proc/stat``).

Writes bench/results/node-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from itertools import count
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline_bench import NodeCPU, bare_run, log, machine, machine_busy_seconds, rebuild_command, setup_django  # noqa: E402

ATTR = "bench"


class NoDelay:
    """A testbed node whose ``ssh_client`` connects like the panel does since it sets TCP_NODELAY (bare
    paramiko does not): the same login, on a socket that sends each packet at once."""

    def __init__(self, node) -> None:
        self.node = node

    def ssh_client(self, timeout: float = 10):
        import socket

        import paramiko

        sock = socket.create_connection((self.node.host, self.node.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_type, key_b64 = self.node.host_key_public.split()[:2]
        where = self.node.host if self.node.port == 22 else f"[{self.node.host}]:{self.node.port}"
        client.get_host_keys().add(where, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64)))
        pkey = paramiko.Ed25519Key.from_private_key_file(str(self.node.client_key_path))
        client.connect(
            hostname=self.node.host,
            port=self.node.port,
            username=self.node.user,
            pkey=pkey,
            sock=sock,
            allow_agent=False,
            look_for_keys=False,
            timeout=timeout,
        )
        return client


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="node-bench-", dir="/var/tmp"))
    setup_django(tmp)

    from jump_bench import target as node_target  # the node's Target with its pinned key

    from deployments.remote import detached, run_rebuild
    from deployments.remote.confirm import Arming
    from tests.support.testbed import NodeConfigSpec, Testbed, commit_change, git_archive, make_flake_repo

    finish_ms: list[float] = []
    real_finish = detached.finish

    def timed_finish(*a, **k):
        t = time.monotonic()
        try:
            return real_finish(*a, **k)
        finally:
            finish_ms.append((time.monotonic() - t) * 1000)

    detached.finish = timed_finish
    repo = tmp / "fleet"
    make_flake_repo(repo, {ATTR: NodeConfigSpec()})
    ids = count(700_000)
    rounds = []
    with Testbed(tmp / "tb") as tb:
        tb.require_namespaces()
        node = tb.add_node("nb1")
        target = node_target(node)
        node_cpu = NodeCPU([node.sshd_pid])

        def cpu_split(run):
            """``run()``'s result, and the CPU seconds it cost: this process, the node, the whole machine."""
            own, on_node, busy = time.process_time(), node_cpu.seconds(), machine_busy_seconds()
            result = run()
            return result, {
                "client_ms": round((time.process_time() - own) * 1000, 1),
                "node_ms": None if on_node is None else round((node_cpu.seconds() - on_node) * 1000, 1),
                "machine_ms": round((machine_busy_seconds() - busy) * 1000),
            }

        def bare(nodelay: bool = False) -> tuple[float, float]:
            commit_change(repo, ATTR)
            node.run("rm -rf /root/fleet")
            node.ship_flake(repo, "/root/fleet")
            return cpu_split(lambda: bare_run(NoDelay(node) if nodelay else node, rebuild_command())["total_s"])

        def on_armed(run) -> None:
            run.contact_and_confirm()  # what the worker does for a node without health checks

        def panel(magic: bool = False) -> tuple[float, dict, float]:
            commit_change(repo, ATTR)
            archive = git_archive(repo)
            marks: list[tuple[float, str, bytes]] = []
            t0 = time.monotonic()
            result, cpu = cpu_split(
                lambda: run_rebuild(
                    target,
                    deployment_id=next(ids),
                    archive=archive,
                    attr=ATTR,
                    action="switch",
                    on_output=lambda s, line: marks.append((time.monotonic() - t0, s, line)),
                    arm=Arming(30, 30, True, on_armed) if magic else None,
                )
            )
            wall = time.monotonic() - t0
            assert result.exit_code == 0, result
            if magic:
                assert result.magic is not None and result.magic.outcome == "confirmed", result.magic
                return wall, {}, cpu

            def at(prefix: bytes) -> float:
                return next(t for t, s, line in marks if s == "sys" and line.startswith(prefix))

            last_line = max(t for t, s, _ in marks if s != "sys")
            phases = {
                "connect": at(b"host key verified"),
                "ship": at(b"system generation before") - at(b"host key verified"),
                "launch": at(b"started on the node") - at(b"system generation before"),
                "run": last_line - at(b"started on the node"),
                "finish": at(b"exit code") - last_line,
            }
            return wall, {k: round(v * 1000, 1) for k, v in phases.items()}, cpu

        panel()  # warm up: the first build on a node fills its store
        for i in range(args.rounds):
            kinds = ["bare", "bare_nodelay", "panel", "panel_magic"]
            order = kinds[i % 4 :] + kinds[: i % 4]
            row: dict = {}
            for kind in order:
                if kind == "panel":
                    row["panel_s"], row["phases_ms"], cpu = panel()
                elif kind == "panel_magic":
                    row["panel_magic_s"], _, cpu = panel(magic=True)
                else:
                    row[f"{kind}_s"], cpu = bare(nodelay=kind == "bare_nodelay")
                row[f"{kind}_cpu_ms"] = cpu
            row["ratio"] = row["panel_s"] / row["bare_s"]
            row["ratio_nodelay"] = row["panel_s"] / row["bare_nodelay_s"]
            log(
                f"round {i + 1}: bare {row['bare_s']:.3f} s (TCP_NODELAY {row['bare_nodelay_s']:.3f} s), "
                f"panel {row['panel_s']:.3f} s (magic rollback {row['panel_magic_s']:.3f} s), {row['phases_ms']}; "
                f"CPU ms bare {row['bare_cpu_ms']}, panel {row['panel_cpu_ms']}, magic {row['panel_magic_cpu_ms']}"
            )
            rounds.append(row)
    node_cpu.close()  # the node is gone: its group is empty
    summary = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "rounds": rounds,
        "bare_median_s": statistics.median(r["bare_s"] for r in rounds),
        "bare_nodelay_median_s": statistics.median(r["bare_nodelay_s"] for r in rounds),
        "ratio_nodelay_median": statistics.median(r["ratio_nodelay"] for r in rounds),
        "panel_median_s": statistics.median(r["panel_s"] for r in rounds),
        "panel_magic_median_s": statistics.median(r["panel_magic_s"] for r in rounds),
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "phases_median_ms": {k: statistics.median(r["phases_ms"][k] for r in rounds) for k in rounds[0]["phases_ms"]},
        "finish_command_median_ms": statistics.median(finish_ms[1:]),
        "cpu_median_ms": {
            k: {
                part: statistics.median(r[f"{k}_cpu_ms"][part] for r in rounds)
                for part in rounds[0][f"{k}_cpu_ms"]
                if rounds[0][f"{k}_cpu_ms"][part] is not None
            }
            for k in ("bare", "panel", "panel_magic")
        },
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"node-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(
        f"\npanel {summary['panel_median_s']:.3f} s (with magic rollback {summary['panel_magic_median_s']:.3f} s), bare {summary['bare_median_s']:.3f} s, ratio "
        f"{summary['ratio_median']:.2f} (bare paramiko with TCP_NODELAY {summary['bare_nodelay_median_s']:.3f} s, "
        f"ratio {summary['ratio_nodelay_median']:.2f}); phases (median ms) {summary['phases_median_ms']}; the finishing "
        f"command alone {summary['finish_command_median_ms']:.0f} ms; CPU (median ms) {summary['cpu_median_ms']}"
    )
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
