"""Benchmark of the REST API's token authentication against the session.

    .venv/bin/python bench/api_bench.py                    # throwaway SQLite database
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/panel .venv/bin/python bench/api_bench.py

Builds 200 nodes and a viewer of all of them with an API token and a session, then:

* times ``GET /api/v1/nodes/?limit=100`` with the token and with the session (interleaved, --runs each,
  after warm-up): the token's check (one indexed query, a SHA-256 and a constant-time compare) must not
  cost more than the session's lookup (ratio of medians at most --max-ratio);
* counts the queries of one request each way, and the writes and ``api_token.used`` events of a
  burst of --runs token requests within the minute of the token's first use: none (that first use
  wrote ``last_used_at`` and its one event).

Exits non-zero if a figure is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NODES = 200


def setup_django() -> None:
    os.environ.setdefault("PANEL_DATA_DIR", tempfile.mkdtemp(prefix="api-bench-"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlpanel.settings"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()


def build():
    from django.contrib.auth import get_user_model

    from deployments.access.models import Grant, Team
    from deployments.models import Credential, Node, Repository
    from deployments.restapi import tokens

    credential = Credential(name="bench", kind=Credential.Kind.PASSWORD)
    credential.set_secret("bench-password")
    credential.save()
    repo = Repository.objects.create(name="fleet", url="/nonexistent", branch="main")
    Node.objects.bulk_create(
        [
            Node(
                name=f"node-{i:04d}",
                host=f"10.0.{i // 256}.{i % 256}",
                flake_attr=f"node{i}",
                repository=repo,
                credential=credential,
                host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBENCH",
                host_key_fingerprint="SHA256:bench",
            )
            for i in range(NODES)
        ]
    )
    user = get_user_model().objects.create_user("viewer", "", "bench-password-1")
    team = Team.objects.create(name="viewers")
    team.members.add(user)
    Grant.objects.create(team=team, role="viewer", scope="all")
    _, text = tokens.create_token(user, name="bench")
    return user, text


def measure(user, token: str, runs: int) -> dict:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from deployments.audit.models import AuditEvent

    url = "/api/v1/nodes/?limit=100"
    by_token = Client(HTTP_HOST="localhost", HTTP_AUTHORIZATION=f"Bearer {token}")
    by_session = Client(HTTP_HOST="localhost")
    by_session.force_login(user)
    for client in (by_token, by_session):  # warm-up (and the token's first use: its one write)
        for _ in range(5):
            assert client.get(url).status_code == 200
    used_before = AuditEvent.objects.filter(action="api_token.used").count()
    times = {"token": [], "session": []}
    writes = 0
    for _ in range(runs):
        for name, client in (("token", by_token), ("session", by_session)):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url)
                times[name].append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200 and len(response.json()["results"]) == 100
            if name == "token":
                writes += sum(
                    q["sql"].lstrip().upper().startswith(("UPDATE", "INSERT")) for q in queries.captured_queries
                )
    counts = {}
    for name, client in (("token", by_token), ("session", by_session)):
        with CaptureQueriesContext(connection) as queries:
            client.get(url)
        counts[name] = len(queries.captured_queries)
    return {
        "median": {k: statistics.median(v) for k, v in times.items()},
        "p90": {k: statistics.quantiles(v, n=10)[-1] for k, v in times.items()},
        "queries": counts,
        "writes": writes,
        "used_events": AuditEvent.objects.filter(action="api_token.used").count() - used_before,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed requests each way (default 100)")
    parser.add_argument("--max-ratio", type=float, default=1.25, help="token median / session median (default 1.25)")
    args = parser.parse_args()

    setup_django()
    from django.db import connection

    vendor = connection.vendor
    old_name = connection.settings_dict["NAME"]
    if vendor == "sqlite":
        test_name = str(Path(tempfile.mkdtemp(prefix="api-bench-")) / "bench.sqlite3")
    else:
        test_name = f"api_bench_{os.getpid()}"
    connection.settings_dict.setdefault("TEST", {})["NAME"] = test_name
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        user, token = build()
        result = measure(user, token, args.runs)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    med, p90, q = result["median"], result["p90"], result["queries"]
    ratio = med["token"] / med["session"]
    print(f"api bench on {vendor}: GET /api/v1/nodes/?limit=100 of {NODES} nodes, {args.runs} requests each way")
    for name in ("token", "session"):
        print(f"  {name:8s} median {med[name]:.1f} ms, p90 {p90[name]:.1f} ms, {q[name]} queries")
    print(f"  token / session median: {ratio:.2f} (at most {args.max_ratio})")
    print(
        f"  burst of {args.runs} token requests: {result['writes']} writes, {result['used_events']} api_token.used events"
    )
    ok = ratio <= args.max_ratio and q["token"] <= q["session"] and result["writes"] == 0 and result["used_events"] == 0
    print("  OK" if ok else "  FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
