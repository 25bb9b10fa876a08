"""Benchmark of the sync status: 10,000 nodes over 50 distinct (commit, attribute) pairs, and the dashboard.

    .venv/bin/python bench/sync_bench.py                  # throwaway SQLite database
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/panel .venv/bin/python bench/sync_bench.py

Builds one flake repository with five configurations and ten branches (each its own head commit), ten
panel repositories tracking them, and 10,000 nodes (1,000 per repository, 200 per (commit, attribute)):
50 distinct pairs.  Then:

* the first refresh with the nodes' current systems given (no SSH): real ``nix eval`` of each pair,
  counted (must be 50), and 10,000 status changes recorded with their audit events;
* with a succeeded switch per node (6 in 10 run the head's system, 3 an older one, 1 a system by hand):
  a refresh where every status changes (in_sync / behind / drifted, 11,000 audit events), a steady-state
  refresh where none does (the scheduled job's usual cost), and ``compute_states`` alone;
* the dashboard (``/``, ``?sync=drifted``, ``?sync=unknown``) as the superuser: median of --runs requests,
  its queries; and one ``/metrics`` scrape;
* as root: reading ``/run/current-system`` of --ssh-nodes real testbed nodes over SSH, one at a time and
  ``PANEL_SYNC_PARALLELISM`` (20) at a time.

Exits non-zero if evaluations != 50 or a dashboard median is over --budget-ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NODES = 10_000
BRANCHES = 10
ATTRS = ("devm", "web", "db", "cache", "edge")


def setup_django() -> None:
    os.environ.setdefault("PANEL_DATA_DIR", tempfile.mkdtemp(prefix="sync-bench-"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlpanel.settings"
    os.environ.setdefault("PANEL_METRICS_TOKEN", "bench-token")
    import django

    django.setup()


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True).stdout.strip()


def build() -> dict:
    from django.contrib.auth import get_user_model

    from deployments.models import Credential, Node, Repository
    from tests.support.testbed import NodeConfigSpec, commit_change, make_flake_repo

    path = Path(tempfile.mkdtemp(prefix="sync-bench-repo-")) / "fleet"
    make_flake_repo(path, {a: NodeConfigSpec() for a in ATTRS})
    repos = []
    for b in range(BRANCHES):
        git(path, "checkout", "-q", "-b", f"branch-{b}", "main")
        for attr in ATTRS:  # a head of its own, with toplevels of its own, on each branch
            commit_change(path, attr, version_tag=f"b{b}")
        git(path, "checkout", "-q", "main")
        repos.append(Repository.objects.create(name=f"fleet-{b}", url=str(path), branch=f"branch-{b}"))
    credential = Credential(name="bench", kind=Credential.Kind.PASSWORD)
    credential.set_secret("bench-password")
    credential.save()
    Node.objects.bulk_create(
        [
            Node(
                name=f"node-{i:05d}",
                host="192.0.2.1",
                flake_attr=ATTRS[i // BRANCHES % len(ATTRS)],
                repository=repos[i % BRANCHES],
                credential=credential,
                host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBENCH",
                host_key_fingerprint="SHA256:bench",
            )
            for i in range(NODES)
        ],
        batch_size=2000,
    )
    alice = get_user_model().objects.create_superuser("alice", password="bench-password-1")
    return {"alice": alice}


def given(readings: dict):
    return lambda nodes: {n.pk: readings[n.pk] for n in nodes}


def refreshes() -> dict:
    from django.db.models import Count
    from django.utils import timezone

    from deployments.models import Deployment, Node
    from deployments.sync import evaluate, status
    from deployments.sync.models import ExpectedSystem, NodeSync

    calls = []
    real = evaluate.evaluate

    def counting(repo, sha, attr):
        calls.append((repo.pk, sha, attr))
        return real(repo, sha, attr)

    evaluate.evaluate = counting
    nodes = list(Node.objects.values_list("pk", flat=True))
    placeholder = {pk: status.Reading(current_system="/nix/store/placeholder-system") for pk in nodes}
    out = {}
    start = time.perf_counter()
    status.refresh(reader=given(placeholder))
    out["first refresh (50 evaluations, 10,000 changes)"] = time.perf_counter() - start
    out["evaluations"] = len(calls)
    out["evaluation seconds (sum)"] = sum(ExpectedSystem.objects.values_list("seconds", flat=True))
    errors = list(ExpectedSystem.objects.exclude(error="").values_list("error", flat=True)[:1])
    out["evaluation errors"] = errors

    # What the panel deployed and what each node runs: 6 in 10 in sync, 3 behind, 1 drifted.
    expected = {
        (e.repository_id, e.flake_attr): e.out_path for e in ExpectedSystem.objects.all()
    }  # one head per repository
    now = timezone.now()
    readings, history = {}, []
    for i, node in enumerate(Node.objects.order_by("pk").values("pk", "repository_id", "flake_attr")):
        head = expected[(node["repository_id"], node["flake_attr"])]
        kind = i % 10
        deployed = head if kind < 6 or kind == 9 else "/nix/store/older-system"
        current = "/nix/store/by-hand-system" if kind == 9 else deployed
        readings[node["pk"]] = status.Reading(current_system=current)
        history.append(
            Deployment(
                node_id=node["pk"], action="switch", commit_sha="c" * 40, flake_attr=node["flake_attr"],
                status="succeeded", exit_code=0, system_after=deployed, created_at=now, started_at=now,
                finished_at=now,
            )
        )  # fmt: skip
    Deployment.objects.bulk_create(history, batch_size=5000)
    start = time.perf_counter()
    status.refresh(reader=given(readings))
    out["refresh, every status changes"] = time.perf_counter() - start
    out["by status"] = dict(NodeSync.objects.values_list("status").annotate(n=Count("pk")).order_by())
    start = time.perf_counter()
    result = status.refresh(reader=given(readings))
    out["refresh, steady state (no change)"] = time.perf_counter() - start
    assert result["changed"] == 0, result
    todo = list(status._with_deployed(Node.objects.all()).select_related("repository", "credential"))
    start = time.perf_counter()
    status.compute_states(todo, readings)
    out["compute_states alone (heads, cached expected, classify)"] = time.perf_counter() - start
    out["evaluations after all refreshes"] = len(calls)
    return out


def pages(people: dict, runs: int) -> dict:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_HOST="localhost")
    client.force_login(people["alice"])

    def timed(url: str, **headers) -> dict:
        for _ in range(2):
            assert client.get(url, **headers).status_code == 200
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            response = client.get(url, **headers)
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, url
        with CaptureQueriesContext(connection) as queries:
            client.get(url, **headers)
        return {"median_ms": statistics.median(times), "queries": len(queries)}

    out = {"sync join ratio": join_ratio(runs)}
    return out | {
        "dashboard /": timed("/"),
        "dashboard ?sync=drifted": timed("/?sync=drifted"),
        "dashboard ?sync=unknown": timed("/?sync=unknown"),
        "/metrics": timed("/metrics", HTTP_AUTHORIZATION="Bearer bench-token"),
    }


def join_ratio(runs: int) -> dict:
    """The dashboard's page query with the sync join over the same query without it, alternating (the
    machine's load cancels out of the ratio)."""
    from deployments.models import Node
    from deployments.views.pages import _fleet

    ids = list(Node.objects.order_by("name").values_list("pk", flat=True)[:100])

    def page(*related):
        start = time.perf_counter()
        rows = list(_fleet(Node.objects.filter(pk__in=ids).select_related(*related)).order_by("name"))
        assert len(rows) == 100
        return (time.perf_counter() - start) * 1000

    pairs = [(page("repository"), page("repository", "sync")) for _ in range(runs * 2)]
    return {
        "without_ms": statistics.median(a for a, _ in pairs),
        "with_ms": statistics.median(b for _, b in pairs),
        "ratio": statistics.median(b / a for a, b in pairs),
    }


def ssh_reads(count: int) -> dict | None:
    """Reading real testbed nodes: one at a time, then all at once (parallelism 20)."""
    if os.geteuid() != 0:
        return None
    from django.conf import settings

    from deployments import inventory
    from deployments.models import Credential, Node, Repository
    from deployments.sync import status
    from tests.support.testbed import Testbed

    out = {}
    with Testbed(Path(tempfile.mkdtemp(prefix="sync-bench-tb-"))) as tb:
        repo = Repository.objects.first()
        nodes = []
        for i in range(count):
            tbn = tb.add_node(f"s{i}")
            cred = Credential(name=f"tb-{i}", kind=Credential.Kind.SSH_KEY)
            inventory.save_credential(cred, secret=tbn.client_key_private, actor_kind="cli")
            node = Node.objects.create(
                name=f"tb-{i}", host=tbn.host, port=tbn.port, ssh_user=tbn.user, flake_attr="devm",
                repository=repo, credential=cred,
            )  # fmt: skip
            inventory.pin_host_key(node, tbn.host_key_public)
            nodes.append(Node.objects.select_related("credential").get(pk=node.pk))
        for parallelism in (1, 20):
            settings.SYNC_PARALLELISM = parallelism
            start = time.perf_counter()
            readings = status.read_current_systems(nodes)
            seconds = time.perf_counter() - start
            assert all(r.current_system.startswith("/nix/store/") for r in readings.values()), readings
            out[f"{count} nodes, parallelism {parallelism}"] = seconds
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ssh-nodes", type=int, default=20)
    parser.add_argument("--budget-ms", type=float, default=300.0, help="fail above this dashboard median")
    args = parser.parse_args()
    setup_django()
    from django.db import connection

    vendor = connection.vendor
    old_name = connection.settings_dict["NAME"]
    if vendor == "sqlite":
        test_name = str(Path(tempfile.mkdtemp(prefix="sync-bench-")) / "bench.sqlite3")
    else:
        test_name = f"sync_bench_{os.getpid()}"
    connection.settings_dict.setdefault("TEST", {})["NAME"] = test_name
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        started = time.perf_counter()
        people = build()
        built_s = time.perf_counter() - started
        result = refreshes()
        page = pages(people, args.runs)
        ssh = ssh_reads(args.ssh_nodes)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    print(
        f"sync bench on {vendor}: {NODES:,} nodes, {BRANCHES * len(ATTRS)} (commit, attribute) pairs (built in {built_s:.1f} s)"
    )
    ok = result["evaluations"] == BRANCHES * len(ATTRS) == result["evaluations after all refreshes"]
    for name, value in result.items():
        shown = f"{value:.2f} s" if isinstance(value, float) else value
        print(f"  {name:58} {shown}")
    ratio = page.pop("sync join ratio")
    print(
        f"  {'page query with the sync join / without (alternating)':58} {ratio['with_ms']:.1f} / "
        f"{ratio['without_ms']:.1f} ms, ratio {ratio['ratio']:.2f}"
    )
    for name, r in page.items():
        over = name.startswith("dashboard") and r["median_ms"] > args.budget_ms
        ok &= not over
        print(f"  {name:58} median {r['median_ms']:6.1f} ms  {r['queries']:2} queries{'  OVER BUDGET' if over else ''}")
    if ssh is None:
        print("  SSH reads: skipped (needs root for testbed nodes)")
    else:
        for name, seconds in ssh.items():
            print(f"  SSH read of /run/current-system, {name:38} {seconds:.2f} s")
    print("  OK" if ok else "  FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
