"""Benchmark of the roles gate: the dashboard of a tag-scoped user among 10,000 nodes.

    .venv/bin/python bench/roles_bench.py                  # throwaway SQLite database
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/panel .venv/bin/python bench/roles_bench.py
                                                           # a throwaway test_panel database on that server

Builds 10,000 nodes (two tags each, one finished deployment each), 200 teams
and 2,000 grants (node, tag, tag-prefix and all scopes) over 500 users, then:

* times ``GET /`` with Django's test client for a user whose grants are tag
  scopes (median and p90 of --runs requests, after warm-up);
* counts the queries of that page for a user who sees 10 nodes and one who
  sees 100 nodes (the page size), which must be equal.

Exits non-zero if the median is over --budget-ms or the counts differ.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NODES = 10_000
TEAMS = 200
GRANTS = 2_000
USERS = 500
TAG_GROUPS = ("web", "db", "cache", "batch", "edge")  # 5 groups x 20 tags = 100 tags


def setup_django() -> None:
    os.environ.setdefault("PANEL_DATA_DIR", tempfile.mkdtemp(prefix="roles-bench-"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlpanel.settings"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()


def build(seed: int = 1) -> dict:
    """Fill the (empty, migrated) database; return the benchmark's users."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    from deployments.access.models import Grant, Team
    from deployments.models import Credential, Deployment, Node, Repository, Tag

    rng = random.Random(seed)
    User = get_user_model()
    credential = Credential(name="bench", kind=Credential.Kind.PASSWORD)
    credential.set_secret("bench-password")
    credential.save()
    repo = Repository.objects.create(name="fleet", url="/nonexistent", branch="main")

    tags = Tag.objects.bulk_create([Tag(name=f"{g}-{i:02d}") for g in TAG_GROUPS for i in range(20)])
    tags += Tag.objects.bulk_create([Tag(name="small"), Tag(name="page")])
    by_name = {t.name: t for t in tags}
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
        group = TAG_GROUPS[i % len(TAG_GROUPS)]
        links.append(through(node_id=node.pk, tag_id=by_name[f"{group}-{i // 5 % 20:02d}"].pk))
        links.append(through(node_id=node.pk, tag_id=by_name[f"{TAG_GROUPS[(i + 2) % 5]}-{i % 20:02d}"].pk))
    # Exactly 10 nodes tagged "small" and 100 tagged "page": the two query-count users.
    links += [through(node_id=n.pk, tag_id=by_name["small"].pk) for n in nodes[:10]]
    links += [through(node_id=n.pk, tag_id=by_name["page"].pk) for n in nodes[100:200]]
    through.objects.bulk_create(links, batch_size=5000)
    Deployment.objects.bulk_create(
        [
            Deployment(
                node=node,
                action="switch",
                commit_sha="0" * 40,
                flake_attr=node.flake_attr,
                status=Deployment.Status.SUCCEEDED,
                requested_by_name="bench",
            )
            for node in nodes
        ],
        batch_size=2000,
    )

    password = make_password("bench-password-1")
    users = User.objects.bulk_create([User(username=f"user{i:03d}", password=password) for i in range(USERS)])
    teams = Team.objects.bulk_create([Team(name=f"team-{i:03d}") for i in range(TEAMS)])
    members = Team.members.through
    membership = {(rng.randrange(TEAMS), u) for u in range(USERS) for _ in range(rng.randint(1, 3))}
    members.objects.bulk_create([members(team_id=teams[t].pk, user_id=users[u].pk) for t, u in membership])

    grants, seen = [], set()
    tag_names = [t.name for t in tags[:100]]
    while len(grants) < GRANTS:
        team = teams[len(grants) % TEAMS]
        kind = rng.random()
        role = rng.choice(["viewer", "deployer", "admin"])
        if kind < 0.6:
            g = Grant(team=team, role=role, scope="node", node=nodes[rng.randrange(NODES)])
            key = (team.pk, role, "node", g.node.pk)
        elif kind < 0.85:
            g = Grant(team=team, role=role, scope="tag", tag=rng.choice(tag_names))
            key = (team.pk, role, "tag", g.tag)
        elif kind < 0.995:
            g = Grant(team=team, role=role, scope="tag", tag=f"{rng.choice(TAG_GROUPS)}-{rng.randrange(10)}*")
            key = (team.pk, role, "tag", g.tag)
        else:
            g = Grant(team=team, role="auditor", scope="all")
            key = (team.pk, "auditor", "all")
        if key not in seen:
            seen.add(key)
            grants.append(g)
    Grant.objects.bulk_create(grants)

    def persona(name: str, *team_grants: list[tuple[str, str]]):
        user = User.objects.create_user(name, password="bench-password-1")
        for i, team_grant in enumerate(team_grants):
            team = Team.objects.create(name=f"{name}-{i}")
            team.members.add(user)
            for role, tag in team_grant:
                Grant.objects.create(team=team, role=role, scope="tag", tag=tag)
        return user

    return {
        # Tag-scoped through three teams: web-0* (prefix), db-07 and cache-1* -> about 1,200 nodes.
        "tagged": persona("bob", [("deployer", "web-0*")], [("viewer", "db-07")], [("admin", "cache-1*")]),
        "sees_10": persona("charlie", [("deployer", "small")], [("viewer", "no-such-tag")]),
        "sees_100": persona("dave", [("deployer", "page")], [("viewer", "no-such-tag")]),
    }


def measure(users: dict, runs: int) -> dict:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from deployments.access import gate

    def client_for(user) -> Client:
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        return client

    bob = client_for(users["tagged"])
    for _ in range(3):  # warm-up: templates, caches, the query planner
        assert bob.get("/").status_code == 200
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        response = bob.get("/")
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200
    shown = response.content.decode().count('class="node-link"')

    counts = {}
    for key in ("sees_10", "sees_100"):
        client = client_for(users[key])
        client.get("/")
        with CaptureQueriesContext(connection) as queries:
            response = client.get("/")
        assert response.status_code == 200
        counts[key] = (response.content.decode().count('class="node-link"'), len(queries))

    # The gate's own part of a page: the count and one page of nodes with their deploy/admin flags.
    user = users["tagged"]
    gate_times = []
    for _ in range(runs):
        gate.forget(user)
        start = time.perf_counter()
        nodes = gate.annotate_permissions(gate.visible_nodes(user), user)
        nodes.count()
        page = list(nodes.order_by("name")[:100])
        gate_times.append((time.perf_counter() - start) * 1000)
    assert len(page) == 100 and any(n.can_deploy for n in page)

    return {
        "gate_ms": statistics.median(gate_times),
        "visible": gate.visible_nodes(users["tagged"]).count(),
        "deployable": gate.nodes_for(users["tagged"], gate.DEPLOY).count(),
        "shown": shown,
        "median_ms": statistics.median(times),
        "p90_ms": sorted(times)[int(len(times) * 0.9) - 1],
        "min_ms": min(times),
        "counts": counts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed dashboard requests (default 30)")
    parser.add_argument("--budget-ms", type=float, default=300.0, help="fail above this median (default 300)")
    args = parser.parse_args()

    setup_django()
    from django.db import connection

    vendor = connection.vendor
    old_name = connection.settings_dict["NAME"]
    # A throwaway database beside the configured one, named so it cannot clobber a test run's.
    if vendor == "sqlite":
        test_name = str(Path(tempfile.mkdtemp(prefix="roles-bench-")) / "bench.sqlite3")
    else:
        test_name = f"roles_bench_{os.getpid()}"
    connection.settings_dict.setdefault("TEST", {})["NAME"] = test_name
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        started = time.perf_counter()
        users = build()
        built_s = time.perf_counter() - started
        result = measure(users, args.runs)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    (n10, q10), (n100, q100) = result["counts"]["sees_10"], result["counts"]["sees_100"]
    print(
        f"roles bench on {vendor}: {NODES} nodes, {TEAMS} teams, {GRANTS} grants, {USERS} users "
        f"(built in {built_s:.1f} s)"
    )
    print(
        f"  tag-scoped user: sees {result['visible']} nodes, may deploy to {result['deployable']}, "
        f"dashboard shows {result['shown']}"
    )
    print(
        f"  dashboard: median {result['median_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms, "
        f"min {result['min_ms']:.1f} ms over {args.runs} requests (budget {args.budget_ms:.0f} ms)"
    )
    print(f"  gate alone (grants + count + a page of 100 with can_deploy/can_admin): median {result['gate_ms']:.1f} ms")
    print(f"  queries: {q10} with {n10} nodes shown, {q100} with {n100} nodes shown")
    ok = result["median_ms"] <= args.budget_ms and q10 == q100 and (n10, n100) == (10, 100)
    print("  OK" if ok else "  FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
