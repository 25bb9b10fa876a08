#!/usr/bin/env python
"""GitOps benchmark (issue 11): push → webhook → first node activation started.

    .venv/bin/python bench/gitops_bench.py              # 10 pushes, the panel on SQLite (the embedded default)
    .venv/bin/python bench/gitops_bench.py --pushes 20

Everything is real: one testbed node (its own network namespace, sshd, Nix store, the ``nixos-rebuild``
stand-in) with the ``auto`` sync policy, and a panel from ``tests.support.panel`` (migrate, daphne, a
qcluster).  Each push commits a new version of the flake attribute ``devm`` (a new system to build),
then POSTs the GitHub push delivery, signed with the repository's secret, to ``/hooks/github/``.  The
figure is the time from just before the POST to the start of ``nixos-rebuild`` on the node, read from
the node's own run log (``Node.rebuild_runs()``: the same clock, the nodes share the host's kernel).
Between pushes it waits for the deployment to end, so every push meets an idle node.  In between lie:
the webhook's verification and record (the 202), the queue, the worker's fetch and head, the policy,
the rollout request (one more fetch), the rollout's hand-out, the SSH connection and the archive.

Then it sends 40 deliveries for an unknown repository and 40 with a wrong secret, interleaved, and
compares their median answer times (they must be alike: 0.67–1.5).

Writes bench/results/gitops-<timestamp>.json; exits 1 when the median misses the target (< 2 s) or the
refusals differ.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline_bench import log, machine, setup_django, stop_panel  # noqa: E402

from tests.gitops.payloads import arm_auto_deploy, github, send  # noqa: E402
from tests.support.panel import Panel  # noqa: E402
from tests.support.testbed import Testbed, commit_change, make_flake_repo  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

TARGET = 2.0


def latest_status(panel: Panel) -> str:
    out = panel.manage(
        "shell", "-c", "from deployments.models import Deployment\nprint(Deployment.objects.order_by('-pk')[0].status)"
    )
    return out.stdout.strip().splitlines()[-1]


def refusal_times(panel: Panel, fleet: Path, head: str, rounds: int = 40) -> dict:
    """Median answer time (ms) of a delivery for an unknown repository and of one with a wrong secret,
    interleaved: the two must be indistinguishable from outside (the same 401, about the same time)."""
    times: dict[str, list[float]] = {"unknown_repository": [], "wrong_secret": []}
    for _ in range(rounds):
        for kind, url, secret in (
            ("unknown_repository", "https://git.example.org/nobody/else.git", "guess"),
            ("wrong_secret", str(fleet), "guess"),
        ):
            started = time.perf_counter()
            status, _ = send(panel, "github", *github(url, after=head, secret=secret))
            times[kind].append((time.perf_counter() - started) * 1000)
            if status != 401:
                raise SystemExit(f"{kind}: answered {status}, not 401")
    return {kind: round(statistics.median(values), 1) for kind, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pushes", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gitops-bench-") as tmp_name:
        tmp = Path(tmp_name)
        setup_django(tmp)
        fleet = tmp / "fleet"
        make_flake_repo(fleet)
        with Testbed(tmp / "tb") as tb:
            node = tb.add_node("gitops-bench")
            panel = Panel(tmp / "panel")
            try:
                panel.register_nodes([("bench-node", "devm", node)], repo_path=fleet)
                secret = arm_auto_deploy(panel, "bench-node")
                panel.start()
                latencies = []
                for i in range(args.pushes):
                    head = commit_change(fleet, "devm")
                    seen = len(node.rebuild_runs())
                    sent = time.time()
                    status, answer = send(panel, "github", *github(str(fleet), after=head, secret=secret))
                    answered = time.time() - sent
                    if status != 202:
                        raise SystemExit(f"webhook answered {status}: {answer}")
                    runs = wait_for(lambda seen=seen: node.rebuild_runs()[seen:], timeout=60, what="the node's run")
                    latency = runs[0][0] - sent
                    latencies.append(latency)
                    log(f"push {i + 1}: 202 after {answered * 1000:.0f} ms, activation started after {latency:.3f} s")
                    wait_for(lambda: latest_status(panel) not in ("queued", "running"), timeout=120, interval=0.2)
                    status = latest_status(panel)
                    if status != "succeeded":
                        raise SystemExit(f"push {i + 1}: the deployment ended {status}\n{panel.logs()[-3000:]}")
                refusals = refusal_times(panel, fleet, head)
            finally:
                stop_panel(panel)
    median = statistics.median(latencies)
    result = {
        "bench": "gitops",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "pushes": args.pushes,
        "latencies_s": [round(x, 3) for x in latencies],
        "median_s": round(median, 3),
        "min_s": round(min(latencies), 3),
        "max_s": round(max(latencies), 3),
        "target_s": TARGET,
        "refusal_median_ms": refusals,
    }
    out = ROOT / "bench" / "results" / f"gitops-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"median {median:.3f} s (min {min(latencies):.3f}, max {max(latencies):.3f}) over {args.pushes} pushes; {out}")
    ratio = refusals["unknown_repository"] / refusals["wrong_secret"]
    log(
        f"refusals: unknown repository {refusals['unknown_repository']} ms, wrong secret "
        f"{refusals['wrong_secret']} ms (ratio {ratio:.2f})"
    )
    return 0 if median < TARGET and 0.67 <= ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
