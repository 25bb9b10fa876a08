#!/usr/bin/env python
"""Safe change benchmark (issue 10): the diff step's overhead, and building once on a build host vs on every node.

    .venv/bin/python bench/change_bench.py                   # 3 diff rounds; 20 nodes, 2 rounds (root: namespaces)
    .venv/bin/python bench/change_bench.py --nodes 20 --work 2000000 --rounds 3

Everything is real: testbed nodes (each its own network namespace, sshd, Nix store, the nixos-rebuild
stand-in) and a panel from tests/support/panel.py (migrate, daphne, a qcluster with ``PANEL_WORKERS`` =
the parallelism) on the embedded default (SQLite). The flake attribute ``bench`` is a system whose
toplevel's builder burns ``--work`` iterations of a shell loop (about a second of CPU per million here, as
a compile would), so building costs something, as it does for a real NixOS system.

1. Diff overhead, on one node, same run: a plain ``switch`` (``POST /api/nodes/<n>/deploy/``) of a new
   commit, against the difference first (``"diff": true``) of the next commit and its confirmation
   (``POST /api/deployments/<id>/confirm/``). Wall times are each deployment's own ``created_at`` →
   ``finished_at``; the figure is (diff + activation) / switch, median over rounds (the order alternates).
2. 20 nodes running the same system, same run: a rollout (parallelism 10) of a new commit built on every
   node (build location ``target``), against a rollout of the next commit built once on a build host
   (a 21st node) and copied to each (build location ``host``). Wall time: the rollout's request →
   its ``finished_at``. The order alternates between rounds.

Writes bench/results/change-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline_bench import setup_django, stop_panel  # noqa: E402

from tests.support.panel import Browser, Panel  # noqa: E402
from tests.support.testbed import NodeConfigSpec, Testbed, commit_change, make_flake_repo  # noqa: E402

ATTR = "bench"
TERMINAL = {"succeeded", "failed", "error", "cancelled", "interrupted"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ts(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def wait_deployment(browser: Browser, pk: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, _, body = browser.request("GET", f"/api/deployments/{pk}/")
        d = json.loads(body)["deployment"]
        if d["status"] in TERMINAL:
            return d
        time.sleep(0.1)
    raise SystemExit(f"deployment #{pk} did not finish within {timeout} s")


def api(browser: Browser, path: str, body: dict) -> dict:
    code, _, raw = browser.request("POST", path, json_body=body)
    assert code == 201, (code, raw[:500])
    return json.loads(raw)


def wall(d: dict) -> float:
    return ts(d["finished_at"]) - ts(d["created_at"])


def plain_switch(browser: Browser, node: str) -> float:
    d = wait_deployment(browser, api(browser, f"/api/nodes/{node}/deploy/", {"action": "switch"})["deployment"]["id"])
    assert d["status"] == "succeeded", d
    return wall(d)


def diff_then_confirm(browser: Browser, node: str) -> tuple[float, float]:
    body = {"action": "switch", "diff": True}
    diff = wait_deployment(browser, api(browser, f"/api/nodes/{node}/deploy/", body)["deployment"]["id"])
    assert diff["status"] == "succeeded" and diff["diff"], diff
    activation = api(browser, f"/api/deployments/{diff['id']}/confirm/", {})["deployment"]["id"]
    done = wait_deployment(browser, activation)
    assert done["status"] == "succeeded" and done["toplevel"] == diff["toplevel"], done
    return wall(diff), wall(done)


def rollout(browser: Browser, names: list[str], parallel: int) -> float:
    t0 = time.time()
    rid = api(browser, "/api/rollouts/", {"nodes": names, "parallelism": parallel})["rollout"]["id"]
    while True:
        code, _, raw = browser.request("GET", f"/api/rollouts/{rid}/?tails=")
        data = json.loads(raw)["rollout"]
        if data["terminal"]:
            break
        time.sleep(0.5)
    assert data["status"] == "succeeded", data["counts"]
    return ts(data["finished_at"]) - t0


def set_locations(panel: Panel, names: list[str], location: str, host: str = "") -> None:
    calls = [
        f"call_command('buildlocation', '--node', {n!r}, {location!r}"
        + (f", '--build-host', {host!r})" if host else ")")
        for n in names
    ]
    panel.manage("shell", "-c", "from django.core.management import call_command\n" + "\n".join(calls))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the 20-node comparison")
    parser.add_argument("--diff-rounds", type=int, default=3)
    parser.add_argument("--work", type=int, default=2_000_000, help="busy-loop iterations in the build")
    args = parser.parse_args()

    results: dict = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory(prefix="change-bench-") as tmp, Testbed(Path(tmp) / "tb") as tb:
        setup_django(Path(tmp))
        repo = Path(tmp) / "fleet"
        make_flake_repo(repo, {ATTR: NodeConfigSpec(build_work=args.work)})
        t = time.monotonic()
        builder = tb.add_node("builder")
        nodes = [tb.add_node(f"c{i:02d}") for i in range(args.nodes)]
        log(f"{args.nodes + 1} testbed nodes up in {time.monotonic() - t:.1f} s")
        panel = Panel(Path(tmp) / "panel")
        panel.env["PANEL_WORKERS"] = str(args.parallel)
        try:
            panel.register_nodes([(n.name, ATTR, n) for n in [builder, *nodes]], repo_path=repo)
            panel.start()
            browser = Browser(panel)
            browser.login()
            time.sleep(3)  # the cluster forks its workers
            names = [n.name for n in nodes]

            # 1. the diff step's overhead on one node
            rounds = []
            for i in range(args.diff_rounds):
                one = {}
                order = ("plain", "diff") if i % 2 == 0 else ("diff", "plain")
                for what in order:
                    commit_change(repo, ATTR)
                    if what == "plain":
                        one["switch_s"] = plain_switch(browser, names[0])
                    else:
                        one["diff_s"], one["activate_s"] = diff_then_confirm(browser, names[0])
                one["ratio"] = (one["diff_s"] + one["activate_s"]) / one["switch_s"]
                log(
                    f"diff round {i + 1}: switch {one['switch_s']:.2f} s; diff {one['diff_s']:.2f} s + "
                    f"activation {one['activate_s']:.2f} s: ratio {one['ratio']:.2f}"
                )
                rounds.append(one)
            results["diff"] = {
                "rounds": rounds,
                "median_ratio": statistics.median(r["ratio"] for r in rounds),
                "median_switch_s": statistics.median(r["switch_s"] for r in rounds),
                "median_diff_s": statistics.median(r["diff_s"] for r in rounds),
                "median_activate_s": statistics.median(r["activate_s"] for r in rounds),
            }

            # 2. 20 nodes: build on every node vs once on the build host
            rounds = []
            for i in range(args.rounds):
                one = {}
                order = ("every", "once") if i % 2 == 0 else ("once", "every")
                for what in order:
                    commit_change(repo, ATTR)
                    if what == "every":
                        set_locations(panel, names, "target")
                        one["every_node_s"] = rollout(browser, names, args.parallel)
                    else:
                        set_locations(panel, names, "host", builder.name)
                        one["build_host_s"] = rollout(browser, names, args.parallel)
                log(
                    f"{args.nodes} nodes round {i + 1}: built on every node {one['every_node_s']:.1f} s, "
                    f"once on the build host and copied {one['build_host_s']:.1f} s"
                )
                rounds.append(one)
            results["build_once"] = {
                "rounds": rounds,
                "median_every_node_s": statistics.median(r["every_node_s"] for r in rounds),
                "median_build_host_s": statistics.median(r["build_host_s"] for r in rounds),
            }
        finally:
            stop_panel(panel)
    out = ROOT / "bench" / "results" / f"change-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log(f"wrote {out}")
    print(json.dumps({k: v for k, v in results.items() if k in ("diff", "build_once")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
