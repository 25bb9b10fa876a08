"""Benchmark of the fleet view (the dashboard) with 10,000 nodes, and of a big rollout's page.

    .venv/bin/python bench/fleet_bench.py                  # throwaway SQLite database
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/panel .venv/bin/python bench/fleet_bench.py
                                                           # a throwaway fleet_bench_<pid> database on that server

Builds 10,000 nodes (two tags each, 100 tags) with five deployments each (50,000: switch, test, boot,
dry-activate and a last switch that failed on every tenth node), then times with Django's test client, as
the superuser (medians of --runs requests after warm-up):

* ``GET /`` (the first page of 100), a deep page (``?page=100``), ``?tag=web-03`` and ``?outcome=failed``;
* the same first page for a user whose tag grants let them see about a third of the fleet;
* the queries of each page (their number must not depend on the nodes or their history) and the
  database's plan for the page of nodes (the subqueries must use the deployment indexes);
* a 200-node rollout's page and its JSON (``/rollouts/<id>/``, ``/api/rollouts/<id>/``), 20 nodes
  failed with 40 log lines each;
* requesting a rollout to all 10,000 nodes (``rollouts.request_rollout``: the gate, one commit, 10,000
  queued deployments and 10,001 audit events in one transaction), once, nothing handed to a worker.

Exits non-zero if a median is over --budget-ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NODES = 10_000
TAGS = ("web", "db", "cache", "batch", "edge")  # x 20 = 100 tags


def setup_django() -> None:
    os.environ.setdefault("PANEL_DATA_DIR", tempfile.mkdtemp(prefix="fleet-bench-"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlpanel.settings"
    import django

    django.setup()


def build() -> dict:
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from deployments.access.models import Grant, Team
    from deployments.models import Credential, Deployment, LogChunk, Node, Repository, Rollout, Tag

    User = get_user_model()
    credential = Credential(name="bench", kind=Credential.Kind.PASSWORD)
    credential.set_secret("bench-password")
    credential.save()
    from tests.support.testbed import make_flake_repo

    path = Path(tempfile.mkdtemp(prefix="fleet-bench-repo-")) / "fleet"
    make_flake_repo(path)
    repo = Repository.objects.create(name="fleet", url=str(path), branch="main")
    tags = {t.name: t for t in Tag.objects.bulk_create([Tag(name=f"{g}-{i:02d}") for g in TAGS for i in range(20)])}
    nodes = Node.objects.bulk_create(
        [
            Node(
                name=f"node-{i:05d}",
                host=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                flake_attr=f"node{i}",
                repository=repo,
                credential=credential,
                host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBENCH",
                host_key_fingerprint="SHA256:bench",
            )
            for i in range(NODES)
        ],
        batch_size=2000,
    )
    through = Node.tags.through
    links = []
    for i, node in enumerate(nodes):
        links.append(through(node_id=node.pk, tag_id=tags[f"{TAGS[i % 5]}-{i // 5 % 20:02d}"].pk))
        links.append(through(node_id=node.pk, tag_id=tags[f"{TAGS[(i + 2) % 5]}-{i % 20:02d}"].pk))
    through.objects.bulk_create(links, batch_size=5000)
    now = timezone.now()
    history = []
    for i, node in enumerate(nodes):
        for k, (action, status) in enumerate(
            [
                ("switch", "succeeded"),
                ("test", "succeeded"),
                ("boot", "succeeded"),
                ("dry-activate", "succeeded"),
                ("switch", "failed" if i % 10 == 0 else "succeeded"),
            ]
        ):
            at = now - timedelta(hours=5 - k, seconds=i)
            history.append(
                Deployment(
                    node=node,
                    action=action,
                    commit_sha=f"{k:x}" * 40,
                    flake_attr=node.flake_attr,
                    status=status,
                    exit_code=0 if status == "succeeded" else 4,
                    generation_after=k + 1,
                    requested_by_name="bench",
                    created_at=at,
                    started_at=at,
                    finished_at=at + timedelta(seconds=30),
                )
            )
    Deployment.objects.bulk_create(history, batch_size=5000)

    alice = User.objects.create_superuser("alice", password="bench-password-1")
    bob = User.objects.create_user("bob", password="bench-password-1")
    team = Team.objects.create(name="web-deployers")
    team.members.add(bob)
    for prefix in ("web-", "db-0"):
        Grant.objects.create(team=team, role="deployer", scope="tag", tag=f"{prefix}*")

    # A finished 200-node rollout: 180 succeeded, 20 failed with 40 log lines each.
    rollout = Rollout.objects.create(action="switch", commits={"fleet": "f" * 40}, node_count=200, status="failed")
    rows = [
        Deployment(
            node=node,
            action="switch",
            commit_sha="f" * 40,
            flake_attr=node.flake_attr,
            status="failed" if p % 10 == 0 else "succeeded",
            exit_code=1 if p % 10 == 0 else 0,
            rollout=rollout,
            rollout_position=p,
            created_at=now,
            started_at=now,
            finished_at=now + timedelta(seconds=20),
        )
        for p, node in enumerate(nodes[:200])
    ]
    Deployment.objects.bulk_create(rows)
    failed = Deployment.objects.filter(rollout=rollout, status="failed")
    LogChunk.objects.bulk_create(
        [
            LogChunk(
                deployment=d,
                seq_start=0,
                seq_end=40,
                data="\n".join(f"e line {i} of the failed activation" for i in range(40)),
            )
            for d in failed
        ]
    )
    return {"alice": alice, "bob": bob, "rollout": rollout}


def measure(people: dict, runs: int) -> dict:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    def client_for(user) -> Client:
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        return client

    def timed(client, url: str) -> dict:
        for _ in range(2):
            assert client.get(url).status_code == 200
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, url
        with CaptureQueriesContext(connection) as queries:
            client.get(url)
        return {
            "median_ms": statistics.median(times),
            "p90_ms": sorted(times)[int(len(times) * 0.9) - 1],
            "queries": len(queries),
            "rows": response.content.decode().count('class="node-link"'),
        }

    alice, bob = client_for(people["alice"]), client_for(people["bob"])
    rid = people["rollout"].pk
    out = {
        "first page": timed(alice, "/"),
        "page 100": timed(alice, "/?page=100"),
        "tag web-03": timed(alice, "/?tag=web-03"),
        "outcome failed": timed(alice, "/?outcome=failed"),
        "tag-scoped user": timed(bob, "/"),
        "rollout page (200 nodes)": timed(alice, f"/rollouts/{rid}/"),
        "rollout JSON (200 nodes)": timed(alice, f"/api/rollouts/{rid}/"),
        "rollout JSON, no tails": timed(alice, f"/api/rollouts/{rid}/?tails="),
    }
    out["plan"] = page_plan()
    out["request"] = request_all(people["alice"])
    return out


def request_all(user) -> dict:
    """Time a rollout request to every node (after finishing the nodes' bench history, none is busy)."""
    from deployments import rollouts
    from deployments.models import Deployment

    Deployment.objects.filter(status__in=Deployment.ACTIVE).update(status="succeeded")
    rollouts.hand_out = lambda pk: None  # no worker here: only the request is timed
    start = time.perf_counter()
    rollout = rollouts.request_rollout(rollouts.Options(all_nodes=True, confirm_all=True), user=user)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "nodes": rollout.deployments.count()}


def page_plan() -> str:
    """The database's plan for the dashboard's page of nodes (the superuser's first page)."""
    from django.db import connection

    from deployments.models import Node
    from deployments.views.pages import _fleet

    sql, params = _fleet(Node.objects.all()).order_by("name")[:100].query.sql_with_params()
    with connection.cursor() as cur:
        if connection.vendor == "sqlite":
            cur.execute("EXPLAIN QUERY PLAN " + sql, params)
            return "\n".join(row[-1] for row in cur.fetchall())
        cur.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in cur.fetchall())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget-ms", type=float, default=300.0, help="fail above this median (default 300)")
    args = parser.parse_args()
    setup_django()
    from django.db import connection

    vendor = connection.vendor
    old_name = connection.settings_dict["NAME"]
    if vendor == "sqlite":
        test_name = str(Path(tempfile.mkdtemp(prefix="fleet-bench-")) / "bench.sqlite3")
    else:
        test_name = f"fleet_bench_{os.getpid()}"
    connection.settings_dict.setdefault("TEST", {})["NAME"] = test_name
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        started = time.perf_counter()
        people = build()
        built_s = time.perf_counter() - started
        result = measure(people, args.runs)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    plan = result.pop("plan")
    request = result.pop("request")
    print(f"fleet bench on {vendor}: {NODES} nodes, {NODES * 5} deployments (built in {built_s:.1f} s)")
    ok = True
    for name, r in result.items():
        over = r["median_ms"] > args.budget_ms
        ok &= not over
        print(
            f"  {name:26} median {r['median_ms']:6.1f} ms  p90 {r['p90_ms']:6.1f} ms  "
            f"{r['queries']:2} queries  {r['rows']:3} rows{'  OVER BUDGET' if over else ''}"
        )
    print(f"  a rollout to all {request['nodes']:,} nodes requested in {request['seconds']:.1f} s")
    uses = [name for name in ("deployment_node_finished", "deployment_node_recent") if name in plan]
    print(f"  the page's subqueries use: {', '.join(uses) or 'no deployment index'}")
    if len(uses) < 2:
        print(plan)
        ok = False
    print("  OK" if ok else "  FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
