#!/usr/bin/env python
"""Rollout benchmark (issue 9): a rollout's wall time against bare paramiko, worker memory, the page under load.

    .venv/bin/python bench/rollout_bench.py                  # 50 nodes at parallelism 10, 3 rounds; then 200 at 50
    .venv/bin/python bench/rollout_bench.py --no-big         # only the 50-node comparison
    .venv/bin/python bench/rollout_bench.py --postgres       # the panel on PostgreSQL + Redis instead of SQLite
    .venv/bin/python bench/rollout_bench.py --no-big --activation-seconds 2   # each switch takes 2 s on the node

Everything is real: N testbed nodes (each its own network namespace, sshd, Nix store, the
``nixos-rebuild`` stand-in) and a panel from ``tests.support.panel`` (migrate, daphne, a qcluster with
``PANEL_WORKERS`` = the parallelism divided by ``PANEL_ROLLOUT_THREADS``, rounded up: each worker
process runs that many nodes at once in threads; ``--workers`` overrides).  Each round first commits a new version of the flake attribute
``bench`` (a new system to build on every node), then:

* bare: the flake is unpacked on every node beforehand (not timed); a pool of P threads runs
  ``nixos-rebuild switch --flake path:/root/fleet#bench`` on each node with paramiko (connect with the
  pinned key, exec, read both streams to EOF, exit status) — the wall time of all N;
* panel: the next version; a logged-in client POSTs ``/api/rollouts/`` (the same N nodes, parallelism
  P) and polls ``GET /api/rollouts/<id>/`` once a second until it has finished; the wall time is request
  → the rollout's own ``finished_at`` (same clock), so the slow poll costs neither CPU nor precision.
  The panel ships its own ``git archive`` to each node, as it always does.

The stand-in ``nixos-rebuild`` evaluates and builds with the node's real Nix, then activates at once: its
work is ~0.1 s of CPU, on the same two CPUs as the panel, so by default the figure measures CPU shared by
the panel and ten nodes (every program the panel starts on a node, every query of the worker, is wall
time). ``--activation-seconds S`` makes each activation take S seconds of the node's own time, printing
a line every 0.5 s, as a real switch does (restarting units): the figure then measures what a rollout
adds to the nodes' own time, as on a fleet where every node has its own CPUs.  Both figures are
reported (bench/README.md); the CPU-shared one is the harder.

Both build and switch the same kind of new system on every node; the order alternates between rounds
(bare first, then panel first, …) so neither always meets a warmer machine.  The ratio is panel / bare
within a round; the figure is the median over rounds.  Worker RSS is the sum over the qcluster's process
group (sampled every 20 ms), peak during the rollout.  The big run (default 200 nodes at 50) also times
``GET /rollouts/<id>/`` (the page, HTML) once a second while the rollout runs.

Writes bench/results/rollout-<timestamp>.json; exits 1 when the ratio target (≤ 1.25) is missed or a
node did not succeed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline_bench import (  # noqa: E402
    PG_URL,
    REDIS_URL,
    NodeCPU,
    TreeRSS,
    bare_run,
    environment,
    log,
    machine,
    machine_busy_seconds,
    rebuild_command,
    setup_django,
    stop_panel,
)

from tests.support.panel import Browser, Panel  # noqa: E402
from tests.support.processes import process_group, stat_fields  # noqa: E402
from tests.support.testbed import NodeConfigSpec, Testbed, commit_change, make_flake_repo  # noqa: E402

ATTR = "bench"
TARGET_RATIO = 1.25


def make_nodes(tb: Testbed, count: int) -> list:
    t = time.monotonic()
    nodes = [tb.add_node(f"r{i:03d}") for i in range(count)]
    log(f"{count} testbed nodes up in {time.monotonic() - t:.1f} s")
    return nodes


def start_panel(workdir: Path, nodes: list, repo: Path, workers: int) -> tuple[Panel, Browser]:
    t = time.monotonic()
    workdir.mkdir(parents=True)
    panel = Panel(workdir)
    panel.env["PANEL_WORKERS"] = str(workers)
    # The panel's own heartbeat (tests beat every 0.5 s to reap dead workers sooner).
    panel.env.pop("PANEL_HEARTBEAT_INTERVAL", None)
    try:
        panel.register_nodes([(tb.name, ATTR, tb) for tb in nodes], repo_path=repo)
        panel.start()
        browser = Browser(panel)
        browser.login()
    except BaseException:
        panel.stop()
        raise
    time.sleep(3)  # let the cluster fork its workers
    log(f"panel up in {time.monotonic() - t:.1f} s ({panel.url}, {workers} workers)")
    return panel, browser


def set_workers(panel: Panel, workers: int) -> None:
    panel.env["PANEL_WORKERS"] = str(workers)
    panel.kill("worker")
    panel.start(daphne=False, worker=True)
    time.sleep(3 + workers / 10)


def cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by the processes of group ``pgid`` and their waited-for children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in process_group(pgid):
        fields = stat_fields(pid)
        if fields is not None:
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / tick


NODE_CPU: NodeCPU | None = None  # every node's CPU, where the machine lets us make a cpuacct group


def node_cpu_seconds() -> float | None:
    return NODE_CPU.seconds() if NODE_CPU is not None else None


def since(before: float | None) -> float | None:
    now = node_cpu_seconds()
    return None if before is None or now is None else now - before


def bare_round(nodes: list, repo: Path, parallel: int) -> dict:
    with ThreadPoolExecutor(max_workers=16) as pool:  # unpacking the flake on every node: not timed
        list(pool.map(lambda tb: tb.ship_flake(repo, "/root/fleet"), nodes))
    command = rebuild_command()
    t0, cpu0, busy0, node0 = time.time(), time.process_time(), machine_busy_seconds(), node_cpu_seconds()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(lambda tb: bare_run(tb, command), nodes))
    wall = time.time() - t0
    return {
        "wall_s": wall,
        "median_node_s": statistics.median(r["total_s"] for r in results),
        "cpu_s": time.process_time() - cpu0,
        "machine_cpu_s": machine_busy_seconds() - busy0,
        "node_cpu_s": since(node0),
    }


def panel_round(
    panel: Panel, browser: Browser, names: list[str] | None, parallel: int, *, page_every: float | None = None
) -> dict:
    """One rollout through the API to ``names`` (None: all nodes), followed until it has finished."""
    page_times: list[float] = []
    stop = threading.Event()

    cpu_before = {name: cpu_seconds(proc.pid) for name, proc in panel.procs.items()}
    busy0, node0 = machine_busy_seconds(), node_cpu_seconds()
    with TreeRSS(panel.procs["worker"].pid) as tree:
        t0 = time.time()
        chosen = {"nodes": names} if names is not None else {"all": True, "confirm_all": True}
        status, _, body = browser.request("POST", "/api/rollouts/", json_body={**chosen, "parallelism": parallel})
        assert status == 201, (status, body[:500])
        rid = json.loads(body)["rollout"]["id"]

        def load_pages():
            viewer = Browser(panel)
            viewer.login()
            while not stop.wait(page_every):
                t = time.time()
                code, _, _ = viewer.request("GET", f"/rollouts/{rid}/")
                if code == 200:
                    page_times.append(time.time() - t)

        pager = threading.Thread(target=load_pages, daemon=True) if page_every else None
        if pager:
            pager.start()
        while True:
            # Slow polls (this client's own cost stays out of the way); the end is the rollout's own time.
            code, _, body = browser.request("GET", f"/api/rollouts/{rid}/?tails=")
            data = json.loads(body)["rollout"]
            if data["terminal"]:
                break
            time.sleep(1)
        wall = dt.datetime.fromisoformat(data["finished_at"]).timestamp() - t0
        stop.set()
        if pager:
            pager.join(30)
    durations = [n["duration_seconds"] for n in data["nodes"] if n["duration_seconds"] is not None]
    starts = sorted(dt.datetime.fromisoformat(n["started_at"]).timestamp() for n in data["nodes"] if n["started_at"])
    ends = sorted(dt.datetime.fromisoformat(n["finished_at"]).timestamp() for n in data["nodes"] if n["finished_at"])
    # A slot freed by the k-th end is taken by the (parallel + k)-th start: the gap is the panel's hand-over.
    refills = [starts[parallel + k] - ends[k] for k in range(len(starts) - parallel)]
    cpu = {name: cpu_seconds(proc.pid) - cpu_before[name] for name, proc in panel.procs.items()}
    machine_cpu = machine_busy_seconds() - busy0
    out = {
        "machine_cpu_s": machine_cpu,
        "node_cpu_s": since(node0),
        "rollout": rid,
        "cpu_s": cpu,
        "wall_s": wall,
        "status": data["status"],
        "counts": data["counts"],
        "median_node_s": statistics.median(durations) if durations else None,
        "request_to_first_start_s": starts[0] - t0 if starts else None,
        "last_end_to_seen_s": t0 + wall - ends[-1] if ends else None,
        "refill_median_ms": statistics.median(refills) * 1000 if refills else None,
        "refill_max_ms": max(refills) * 1000 if refills else None,
        "worker_rss_baseline_mb": tree.baseline_sum / 2**20,
        "worker_rss_peak_mb": tree.peak_sum / 2**20,
        "worker_processes": len(tree.baseline),
    }
    if page_times:
        out["page_load_ms"] = {
            "n": len(page_times),
            "median": statistics.median(page_times) * 1000,
            "max": max(page_times) * 1000,
        }
    return out


def fmt(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f} s"


def compare(nodes, repo, panel, browser, parallel: int, rounds: int) -> dict:
    out = {"rounds": []}
    for i in range(rounds):
        one = {}
        order = ("bare", "panel") if i % 2 == 0 else ("panel", "bare")
        for kind in order:
            commit_change(repo, ATTR)
            if kind == "bare":
                one["bare"] = bare_round(nodes, repo, parallel)
                b = one["bare"]
                log(
                    f"  round {i + 1} bare:  {b['wall_s']:.2f} s, node median {b['median_node_s']:.2f} s, "
                    f"machine CPU {b['machine_cpu_s']:.1f} s, on the nodes {fmt(b['node_cpu_s'])}, this process "
                    f"{b['cpu_s']:.1f} s"
                )
            else:
                one["panel"] = panel_round(panel, browser, [tb.name for tb in nodes], parallel)
                p = one["panel"]
                log(
                    f"  round {i + 1} panel: {p['wall_s']:.2f} s, {p['status']}, node median {p['median_node_s']} s, "
                    f"first start {p['request_to_first_start_s']:.2f} s, slot refill median "
                    f"{p['refill_median_ms']:.0f} ms (max {p['refill_max_ms']:.0f}), worker RSS "
                    f"{p['worker_rss_baseline_mb']:.0f} → {p['worker_rss_peak_mb']:.0f} MB, machine CPU "
                    f"{p['machine_cpu_s']:.1f} s, on the nodes {fmt(p['node_cpu_s'])}, CPU "
                    + ", ".join(f"{k} {v:.1f} s" for k, v in p["cpu_s"].items())
                )
        one["ratio"] = one["panel"]["wall_s"] / one["bare"]["wall_s"]
        log(f"  round {i + 1} ratio {one['ratio']:.2f} ({'bare first' if order[0] == 'bare' else 'panel first'})")
        out["rounds"].append(one)
    out["ratio_median"] = statistics.median(r["ratio"] for r in out["rounds"])
    out["bare_median_s"] = statistics.median(r["bare"]["wall_s"] for r in out["rounds"])
    out["panel_median_s"] = statistics.median(r["panel"]["wall_s"] for r in out["rounds"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-nodes", type=int, default=200)
    ap.add_argument("--big-parallel", type=int, default=50)
    ap.add_argument("--no-big", action="store_true", help="skip the big rollout")
    ap.add_argument(
        "--activation-seconds",
        type=float,
        default=0,
        help="seconds each node's activation takes, on the node's own time (as a real switch does; the stand-in "
        "sleeps, printing a line every 0.5 s). 0, the default: the stand-in's work is all CPU, shared with the panel",
    )
    ap.add_argument("--postgres", action="store_true", help="the panel on PostgreSQL + Redis")
    ap.add_argument("--workers", type=int, default=0, help="qcluster workers (default: parallelism / threads)")
    ap.add_argument(
        "--confirm-timeout",
        type=int,
        default=None,
        help="the nodes' magic-rollback deadline (0: off, as bare nixos-rebuild; default: the panel's, 30 s)",
    )
    args = ap.parse_args()
    threads = int(os.environ.get("PANEL_ROLLOUT_THREADS") or 10)  # the panel's default

    def workers_for(parallel: int) -> int:
        return args.workers or max(1, -(-parallel // threads))

    started = time.monotonic()
    results: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "args": vars(args)}
    tmp = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    setup_django(tmp)
    tb = Testbed(tmp / "tb")
    failures = []
    db = dict(DATABASE_URL=PG_URL, REDIS_URL=REDIS_URL) if args.postgres else {}
    try:
        repo = tmp / "fleet"
        make_flake_repo(repo, {ATTR: NodeConfigSpec(sleep=args.activation_seconds)})
        count = max(args.nodes, 0 if args.no_big else args.big_nodes)
        nodes = make_nodes(tb, count)
        global NODE_CPU
        NODE_CPU = NodeCPU([n.sshd_pid for n in nodes])
        with environment(**db):
            panel, browser = start_panel(tmp / "panel", nodes, repo, workers_for(args.parallel))
            try:
                if args.confirm_timeout is not None:
                    panel.manage(
                        "shell",
                        "-c",
                        "from deployments.models import Node\n"
                        f"Node.objects.update(confirm_timeout={int(args.confirm_timeout)})",
                    )
                    log(f"magic rollback deadline {args.confirm_timeout} s on every node (0: off)")
                log(f"{args.nodes} nodes at parallelism {args.parallel}, {args.rounds} rounds")
                results["compare"] = compare(nodes[: args.nodes], repo, panel, browser, args.parallel, args.rounds)
                for r in results["compare"]["rounds"]:
                    if r["panel"]["status"] != "succeeded":
                        failures.append(f"rollout #{r['panel']['rollout']} {r['panel']['status']}")
                c = results["compare"]
                if c["ratio_median"] > TARGET_RATIO:
                    failures.append(f"rollout/bare wall time {c['ratio_median']:.2f} > {TARGET_RATIO}")
                if not args.no_big:
                    set_workers(panel, workers_for(args.big_parallel))
                    commit_change(repo, ATTR)
                    log(f"{len(nodes)} nodes at parallelism {args.big_parallel}, the page loaded every second")
                    big = panel_round(panel, browser, None, args.big_parallel, page_every=1.0)
                    results["big"] = big
                    log(
                        f"  {big['wall_s']:.1f} s, {big['status']} {big['counts']}, worker RSS "
                        f"{big['worker_rss_baseline_mb']:.0f} → {big['worker_rss_peak_mb']:.0f} MB, page "
                        f"{big.get('page_load_ms', {}).get('median', float('nan')):.0f} ms median"
                    )
                    if big["status"] != "succeeded":
                        failures.append(f"big rollout #{big['rollout']} {big['status']} {big['counts']}")
            finally:
                stop_panel(panel)
    finally:
        tb.close()
        if NODE_CPU is not None:
            NODE_CPU.close()
        subprocess.run(["rm", "-rf", str(tmp)])
    results["seconds"] = time.monotonic() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["failures"] = failures
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rollout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    c = results.get("compare", {})
    print(
        f"\n{args.nodes} nodes at {args.parallel}: panel {c.get('panel_median_s', 0):.2f} s, "
        f"bare {c.get('bare_median_s', 0):.2f} s, ratio {c.get('ratio_median', 0):.2f} (target ≤ {TARGET_RATIO})"
    )
    print(f"wrote {path.relative_to(ROOT)} ({results['seconds']:.0f} s)")
    for f in failures:
        print(f"MISSED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
