#!/usr/bin/env python
"""Nodes behind one bastion (issue 9's jump hosts): one pooled bastion session against one login per node.

    .venv/bin/python bench/jump_bench.py                    # 30 nodes, 10 at a time, 3 rounds (root)
    .venv/bin/python bench/jump_bench.py --nodes 50 --parallel 10 --rounds 3

Everything is real: testbed nodes (own network namespace, sshd, Nix, the nixos-rebuild stand-in), ``--nodes``
of them on the private network behind one bastion node (reachable only through it), and the panel's own
runner (``deployments.remote.run_rebuild``: connect through the bastion, ship the flake, ``nixos-rebuild
switch`` detached, follow it, read the system after), ``--parallel`` threads at a time, as one worker process
runs a rollout's chains. Each round runs the same nodes twice, in turn:

* pooled: the panel as it is, one ``BastionPool`` for the process (one session on the bastion, a
  ``direct-tcpip`` channel per node);
* per node: a fresh pool for every connection, so every node costs the bastion a TCP connection, a key
  exchange and a login (what connecting through the bastion without the pool would cost).

Figures: wall time of each, the ratio per node / pooled (within a round), and the TCP connections the
bastion's sshd accepted (its own log). Exits 1 unless the pooled runs made one connection to the bastion
each and every deploy succeeded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments.remote import HostKey, Target, run_rebuild  # noqa: E402
from deployments.remote import jump as jump_module  # noqa: E402
from deployments.remote.jump import BastionPool  # noqa: E402
from tests.support.testbed import NodeConfigSpec, Testbed, git_archive, make_flake_repo  # noqa: E402

_ids = count(1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def target(node, via: Target | None = None) -> Target:
    return Target(
        host=node.host,
        port=node.port,
        user=node.user,
        host_key=HostKey.parse(node.host_key_public),
        private_key=node.client_key_private,
        name=node.name,
        via=via,
    )


class PerConnectionPool:
    """Stands in for ``jump.POOL``: every acquire gets a pool of its own, so nothing is shared."""

    def __init__(self) -> None:
        self.opened = 0

    def acquire(self, bastion: Target):
        pool = BastionPool(idle_seconds=0)  # closed as soon as its one connection is done
        hop = pool.acquire(bastion)
        self.opened += pool.opened
        return hop


def deploy_all(targets: list[Target], archive: bytes, parallel: int) -> tuple[float, list[int]]:
    def one(t: Target) -> int:
        result = run_rebuild(
            t, deployment_id=next(_ids), archive=archive, attr="devm", action="switch", on_output=lambda s, line: None
        )
        return result.exit_code

    started = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        codes = list(pool.map(one, targets))
    return time.monotonic() - started, codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jump-bench-", dir="/var/tmp"))
    repo = work / "flake"
    make_flake_repo(repo, {"devm": NodeConfigSpec()})
    archive = git_archive(repo)
    results = []
    with Testbed(work / "tb") as tb:
        tb.require_namespaces()
        gw = tb.add_node("gw")
        with ThreadPoolExecutor(8) as pool:
            nodes = list(pool.map(lambda i: tb.add_node(f"app{i:03d}", behind=gw), range(args.nodes)))
        bastion = target(gw)
        targets = [target(n, via=bastion) for n in nodes]
        log(f"{args.nodes} nodes behind bastion {gw.name} ({gw.host}), {args.parallel} at a time")
        for r in range(1, args.rounds + 1):
            row = {"round": r}
            for mode in ("pooled", "per node"):
                pool = BastionPool() if mode == "pooled" else PerConnectionPool()
                jump_module.POOL = pool
                before = gw.ssh_connections()
                wall, codes = deploy_all(targets, archive, args.parallel)
                if isinstance(pool, BastionPool):
                    pool.close_idle()
                row[mode] = {
                    "wall_s": round(wall, 2),
                    "bastion_connections": gw.ssh_connections() - before,
                    "failed": sum(c != 0 for c in codes),
                }
                log(f"round {r} {mode}: {wall:.2f} s, {row[mode]['bastion_connections']} connections to the bastion")
            row["ratio_per_node_to_pooled"] = round(row["per node"]["wall_s"] / row["pooled"]["wall_s"], 2)
            results.append(row)
    ratios = [r["ratio_per_node_to_pooled"] for r in results]
    summary = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "nodes": args.nodes,
        "parallel": args.parallel,
        "rounds": results,
        "median_ratio": statistics.median(ratios),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"jump-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    missed = [
        f"round {r['round']}: {r['pooled']['bastion_connections']} connections to the bastion, pooled (want 1)"
        for r in results
        if r["pooled"]["bastion_connections"] != 1
    ] + [f"round {r['round']}: failed deploys" for r in results if r["pooled"]["failed"] or r["per node"]["failed"]]
    for m in missed:
        print("MISSED:", m)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
