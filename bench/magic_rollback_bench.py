#!/usr/bin/env python
"""Magic rollback (issue 10): from an activation that cuts the node off to the node running its previous
generation again, and to the panel recording ``rolled_back``.

    .venv/bin/python bench/magic_rollback_bench.py                 # 3 runs at the default 30 s deadline (~3 min)
    .venv/bin/python bench/magic_rollback_bench.py --runs 5 --deadline 10

Everything is real: one testbed node (own network namespace, sshd, Nix, the nixos-rebuild and
switch-to-configuration stand-ins) and a panel from tests/support/panel.py (migrate, daphne and the
qcluster worker as processes) on the embedded default. Each run deploys (switch) a configuration whose
activation takes the node's own ``eth0`` down (``NodeConfigSpec(network="down")``: packets dropped, nothing
reset), so the panel cannot confirm over a new connection; the node must go back by itself at its
confirmation deadline (``Node.confirm_timeout``, set on the node's health page), and the old system's
activation brings ``eth0`` up again.

Figures, all on this machine's clock (the node shares its kernel):
* reverted = the broken activation took the network down → the node's previous system is
  ``/run/current-system`` again and its activation has brought the network back (the node's own
  ``network.log``). Target: ≤ deadline + 5 s.
* recorded = network down → the panel's deployment reads ``rolled_back`` (JSON API, polled every 0.1 s).

Writes bench/results/magic-rollback-<timestamp>.json; exits 1 when a run misses the target.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.panel import Browser, Panel  # noqa: E402
from tests.support.testbed import NodeConfigSpec, Testbed, make_flake_repo  # noqa: E402

TERMINAL = {"succeeded", "failed", "error", "cancelled", "interrupted", "unhealthy", "rolled_back"}
SLACK_S = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait(what: str, check, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def status_of(browser: Browser, pk: int) -> dict:
    code, _, body = browser.request("GET", f"/api/deployments/{pk}/")
    assert code == 200, body[:300]
    return json.loads(body)["deployment"]


def one_run(args, browser: Browser, tb, before: str, n: int) -> dict:
    downs = sum(1 for s, _ in tb.network_log() if s == "down")
    pk = browser.deploy("bench")
    log(f"run {n}: deployment #{pk}")
    # The node's current system, sampled every 10 ms from the host (its /run is a directory here).
    samples: list[tuple[float, str]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.time(), tb.current_system()))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        cut_at = wait("the activation to take the network down",
                      lambda: ([t for s, t in tb.network_log() if s == "down"][downs:] or [None])[0], 120)  # fmt: skip
        log(f"run {n}: network down")
        back_at = wait("the node to bring its network back",
                       lambda: ([t for s, t in tb.network_log() if s == "up" and t > cut_at] or [None])[0],
                       args.deadline + 60)  # fmt: skip
        old_at = wait("the node to run its previous system",
                      lambda: next((t for t, sys_ in samples if t > cut_at and sys_ == before), None), 30)  # fmt: skip
        reverted = max(back_at, old_at) - cut_at
        log(f"run {n}: the node runs its previous system again {reverted:.2f} s after the network went down")
        final = wait("the panel to record the end", lambda: (s := status_of(browser, pk))["status"] in TERMINAL and s,
                     args.deadline + 180)  # fmt: skip
        recorded = time.time() - cut_at
    finally:
        stop.set()
        sampler.join()
    log(f"run {n}: panel says {final['status']} after {recorded:.1f} s: {final['error_message'][:160]}")
    return {
        "deployment": pk,
        "status": final["status"],
        "reverted_s": round(reverted, 2),
        "network_back_s": round(back_at - cut_at, 2),
        "previous_system_s": round(old_at - cut_at, 2),
        "recorded_s": round(recorded, 2),
        "message": final["error_message"],
        "node_system_after": tb.current_system(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--deadline", type=int, default=30, help="the node's confirmation deadline, seconds")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root: the testbed node takes its network down in its own namespace")
        return 2
    work = Path(tempfile.mkdtemp(prefix="magic-rollback-bench-"))
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlpanel.settings")
    os.environ["PANEL_DATA_DIR"] = str(work / "bench-process")
    django.setup()
    flake = work / "flake"
    make_flake_repo(flake, {"bench": NodeConfigSpec(network="down", version_tag="cut1")})
    results = []
    with Testbed(work / "tb") as testbed:
        tb = testbed.add_node("bench")
        before = tb.current_system()
        panel = Panel(work / "panel")
        try:
            panel.register_node(tb, name="bench", attr="bench", repo_path=flake)
            panel.start()
            browser = Browser(panel)
            browser.login()
            browser.request("GET", "/nodes/bench/health/")
            code, _, body = browser.request("POST", "/nodes/bench/health/", {"confirm_timeout": str(args.deadline)})
            assert code == 302, (code, body[:300])
            for n in range(1, args.runs + 1):
                results.append(one_run(args, browser, tb, before, n))
        finally:
            if "worker" in panel.procs:
                panel.kill("worker")  # nothing is running; django-q2's graceful stop would take 20 s
            panel.stop()
    reverted = [r["reverted_s"] for r in results]
    recorded = [r["recorded_s"] for r in results]
    target = args.deadline + SLACK_S
    ok = all(r["status"] == "rolled_back" and r["node_system_after"] == before for r in results)
    summary = {
        "reverted_s": {"min": min(reverted), "median": statistics.median(reverted), "max": max(reverted)},
        "recorded_s": {"min": min(recorded), "median": statistics.median(recorded), "max": max(recorded)},
        "target_s": target,
        "all_rolled_back_and_old_system": ok,
    }
    report = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
        },
        "args": vars(args),
        "runs": results,
        "summary": summary,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"magic-rollback-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nthe node ran its previous generation again {min(reverted):.1f} / {statistics.median(reverted):.1f} / "
        f"{max(reverted):.1f} s after the broken activation (min / median / max of {len(reverted)}; "
        f"deadline {args.deadline} s, target <= {target:g} s)"
    )
    print(f"the panel recorded it after {statistics.median(recorded):.1f} s (median)")
    print(f"every run rolled_back, the node on its old system: {ok}")
    print(f"wrote {path.relative_to(ROOT)}")
    missed = []
    if max(reverted) > target:
        missed.append(f"MISSED: a node took {max(reverted):.1f} s to go back (target {target:g} s)")
    if not ok:
        missed.append("MISSED: not every run ended rolled_back with the node on its old system")
    for line in missed:
        print(line)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
