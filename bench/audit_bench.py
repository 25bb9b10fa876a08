#!/usr/bin/env python
"""Audit trail benchmarks: page latency, verify time, export memory, concurrent write rate.

    .venv/bin/python bench/audit_bench.py                          # 1,000,000 events on SQLite
    .venv/bin/python bench/audit_bench.py --database-url postgres://postgres@127.0.0.1:5432/panel_audit_bench
    .venv/bin/python bench/audit_bench.py --events 100000 --writers-url postgres://postgres@127.0.0.1:5432/x

The events are generated fast (bulk INSERTs of a chain computed here, with the
panel's own ``chain_hash``; ``audit verify`` checks it like any other chain),
so the page, verify and export figures are about reading a million events,
not about writing them.  The write figure goes through ``record()``:
``--writers`` processes, each committing one event per transaction, on a
fresh PostgreSQL database.  A given PostgreSQL database is dropped and
re-created: never point this at real data.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ACTIONS = [
    ("deployment.requested", 20),
    ("deployment.started", 20),
    ("deployment.finished", 20),
    ("auth.login", 15),
    ("auth.logout", 10),
    ("auth.login_failed", 3),
    ("hostkey.scanned", 3),
    ("hostkey.pinned", 2),
    ("node.changed", 3),
    ("credential.changed", 1),
    ("deployment.cancelled", 1),
    ("audit.exported", 1),
    ("repository.changed", 1),
]


def recreate_database(url: str) -> None:
    import psycopg

    name = urlparse(url).path.lstrip("/")
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def setup_django(database_url: str, data_dir: str) -> None:
    os.environ["PANEL_DATA_DIR"] = data_dir
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlpanel.settings"
    os.environ["PANEL_AUDIT_CHECKPOINT_MINUTES"] = "0"
    os.environ["ALLOWED_HOSTS"] = "testserver,localhost"
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)
    import django

    django.setup()


def generate(n: int, *, seed: int = 1) -> None:
    """Insert ``n`` events with a valid chain, in batches, bypassing record() for speed only."""
    from django.db import connection, transaction

    from deployments.audit.chain import GENESIS_HASH, chain_hash
    from deployments.audit.models import AuditEvent

    rnd = random.Random(seed)
    names, weights = zip(*ACTIONS, strict=True)
    fields = [f for f in AuditEvent._meta.concrete_fields if f.name != "id"]
    columns = ", ".join(f.column for f in fields)
    sql = f"INSERT INTO audit_auditevent ({columns}) VALUES ({', '.join(['%s'] * len(fields))})"
    start = datetime.now(UTC) - timedelta(seconds=30 * n)
    if connection.vendor == "postgresql":
        from psycopg.types.json import Jsonb

        def prep(name, value):
            return Jsonb(value) if name == "details" else value
    else:
        # What Django's SQLite backend would store: naive UTC text, JSON text.
        def prep(name, value):
            if name == "created_at":
                return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ")
            return json.dumps(value) if name == "details" else value

    prev = GENESIS_HASH
    batch: list = []
    for seq in range(1, n + 1):
        action = rnd.choices(names, weights)[0]
        node = rnd.randrange(200)
        user = rnd.randrange(50)
        system = action in ("deployment.started", "deployment.finished")
        event = {
            "seq": seq,
            "created_at": start + timedelta(seconds=30 * seq),
            "actor_kind": "system" if system else "user",
            "actor_id": None if system else user + 1,
            "actor_name": "" if system else f"user-{user}",
            "action": action,
            "object_type": "deployment" if action.startswith("deployment") else action.split(".")[0],
            "object_id": str(seq // 3),
            "object_repr": f"#{seq // 3} switch web-{node}" if action.startswith("deployment") else f"web-{node}",
            "node_id": node + 1,
            "node_name": f"web-{node}",
            "outcome": rnd.choices(["success", "failure", "denied"], [95, 3, 2])[0],
            "details": {"commit": f"{rnd.getrandbits(160):040x}", "exit_code": 0} if system else {},
            "source_ip": None if system else f"10.0.{user}.{node}",
            "user_agent": "" if system else "Mozilla/5.0 (bench)",
            "request_id": "" if system else f"{rnd.getrandbits(128):032x}",
        }
        event["prev_hash"] = prev
        event["hash"] = prev = chain_hash(prev, event)
        batch.append([prep(f.name, event[f.name]) for f in fields])
        if len(batch) == 10000 or seq == n:
            with transaction.atomic(), connection.cursor() as cur:
                cur.executemany(sql, batch)
            batch.clear()
    with connection.cursor() as cur:
        cur.execute("ANALYZE")


def time_pages(urls: dict[str, str], runs: int) -> dict[str, float]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(username="bench-auditor", defaults={"is_superuser": True})
    client = Client()
    client.force_login(user)
    medians = {}
    for label, url in urls.items():
        for _ in range(2):
            assert client.get(url).status_code == 200, url
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            response = client.get(url)
            samples.append(time.perf_counter() - t0)
            assert response.status_code == 200
        medians[label] = statistics.median(samples) * 1000
    return medians


# Started by a small launcher, which reports the command's peak RSS from os.wait4.  Measured from
# this (large) process directly, Linux would count this process's own peak in the child's: the
# child is started with vfork(), and exec() keeps the larger of the old and new peaks in ru_maxrss.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(args: list[str], env: dict) -> tuple[float, int, int, str]:
    """Run ``manage.py args``; return (seconds, peak RSS in MB, exit status, output)."""
    with tempfile.NamedTemporaryFile(prefix="audit-bench-rss-") as peak:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, peak.name, sys.executable, str(ROOT / "manage.py"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out = proc.stdout.read()
        proc.wait()
        seconds = time.perf_counter() - t0
        rss_kb = int(open(peak.name).read() or 0)
    return seconds, rss_kb // 1024, proc.returncode, out


def writer(count: int, barrier) -> None:
    from django.db import connections, transaction

    from deployments.audit.writer import record

    connections.close_all()
    barrier.wait()
    for i in range(count):
        with transaction.atomic():
            record(
                "deployment.requested",  # a registered name; the bench measures the writer, not the name
                actor_kind="system",
                object_type="bench",
                object_id=str(i),
                object_repr=f"bench {os.getpid()} {i}",
                details={"i": i},
            )
    connections.close_all()


def bench_writers(url: str, writers: int, each: int, data_dir: str) -> dict:
    """``writers`` processes × ``each`` events through record(), one transaction each."""
    from django.core.management import call_command
    from django.db import connections

    from deployments.audit.checkpoint import signing_key
    from deployments.audit.models import AuditEvent
    from deployments.audit.verify import verify_chain

    recreate_database(url)
    call_command("migrate", verbosity=0)
    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(writers + 1)
    procs = [ctx.Process(target=writer, args=(each, barrier)) for _ in range(writers)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    assert all(p.exitcode == 0 for p in procs)
    signing_key(create=True)  # verification never makes the key; a panel's first checkpoint would
    seqs = list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True))
    gap_free = seqs == list(range(1, writers * each + 1))
    return {
        "writers": writers,
        "events": writers * each,
        "seconds": elapsed,
        "events_per_s": writers * each / elapsed,
        "gap_free": gap_free,
        "verifies": verify_chain().ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--database-url", default="", help="PostgreSQL URL to (re)create; default: SQLite in a temp dir"
    )
    parser.add_argument("--runs", type=int, default=15, help="requests per page for the median")
    parser.add_argument(
        "--writers-url",
        default="postgres://postgres@127.0.0.1:5432/panel_audit_bench_writers",
        help="PostgreSQL database (re-created) for the concurrent write test; '' to skip",
    )
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--per-writer", type=int, default=2500)
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="writers run with PANEL_AUDIT_ASYNC_COMMIT=on (docs/audit.md: the trade-off)",
    )
    parser.add_argument("--writers-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="audit-bench-")
    if args.async_commit:
        os.environ["PANEL_AUDIT_ASYNC_COMMIT"] = "on"  # the operator setting (docs/audit.md)
    if args.writers_only:
        setup_django(args.writers_url, data_dir)
        print(json.dumps(bench_writers(args.writers_url, args.writers, args.per_writer, data_dir)))
        return 0
    if args.database_url:
        recreate_database(args.database_url)
    setup_django(args.database_url, data_dir)
    from django.conf import settings
    from django.core.management import call_command

    from deployments.audit.models import AuditEvent

    results: dict = {
        "backend": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
        "events": args.events,
        "cpus": os.cpu_count(),
    }
    call_command("migrate", verbosity=0)
    t0 = time.perf_counter()
    generate(args.events)
    results["generate_s"] = round(time.perf_counter() - t0, 1)
    print(f"generated {args.events} events in {results['generate_s']} s", flush=True)

    mid = AuditEvent.objects.get(seq=args.events // 2).created_at
    urls = {
        "first page": "/audit/",
        "node": "/audit/?node=web-17",
        "action": "/audit/?action=deployment.finished",
        "outcome denied": "/audit/?outcome=denied",
        "actor + outcome": "/audit/?actor=user-3&outcome=failure",
        "time range (one day, mid-trail)": f"/audit/?since={mid.date()}&until={mid.date()}",
        "deep page (before=seq/2)": f"/audit/?before={args.events // 2}",
        "free text, common (web-17)": "/audit/?q=web-17",
        "free text, no match": "/audit/?q=no-such-node",
    }
    results["page_median_ms"] = {k: round(v, 1) for k, v in time_pages(urls, args.runs).items()}
    for label, ms in results["page_median_ms"].items():
        print(f"  {label:34} {ms:8.1f} ms", flush=True)

    from deployments.audit.checkpoint import signing_key

    signing_key(create=True)  # verification never makes the key; a panel's first checkpoint would
    env = dict(os.environ)
    seconds, rss, status, out = run_child(["audit", "verify"], env)
    assert status == 0, out
    results["verify_s"] = round(seconds, 1)
    results["verify_peak_rss_mb"] = rss
    print(f"verify: {seconds:.1f} s, peak RSS {rss} MB: {out.strip().splitlines()[-1]}", flush=True)

    out_file = Path(data_dir) / "export.jsonl"
    seconds, rss, status, out = run_child(["audit", "export", "--format", "jsonl", "-o", str(out_file)], env)
    assert status == 0, out
    results["export_jsonl"] = {"s": round(seconds, 1), "peak_rss_mb": rss, "mb": out_file.stat().st_size >> 20}
    print(f"export jsonl: {seconds:.1f} s, peak RSS {rss} MB, {out_file.stat().st_size >> 20} MB", flush=True)
    t0 = time.perf_counter()
    check = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "deployments/audit/chain.py"), str(out_file)],
        capture_output=True,
        text=True,
    )
    results["offline_verify_s"] = round(time.perf_counter() - t0, 1)
    assert check.returncode == 0, check.stdout + check.stderr
    print(f"offline verify of the export: {results['offline_verify_s']} s", flush=True)
    seconds, rss, status, out = run_child(["audit", "export", "--format", "csv", "-o", str(out_file)], env)
    results["export_csv"] = {"s": round(seconds, 1), "peak_rss_mb": rss}
    print(f"export csv: {seconds:.1f} s, peak RSS {rss} MB", flush=True)
    out_file.unlink()

    if args.writers_url:
        # A process of its own: this one's default database may be SQLite.
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--writers-only",
                "--writers-url",
                args.writers_url,
                "--writers",
                str(args.writers),
                "--per-writer",
                str(args.per_writer),
            ]
            + (["--async-commit"] if args.async_commit else []),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results["pg_writers"] = json.loads(proc.stdout)
        print(f"record() on PostgreSQL: {results['pg_writers']}", flush=True)

    print(json.dumps(results, indent=2))
    missed = [f"page {label}: {ms} ms (budget 200 ms)" for label, ms in results["page_median_ms"].items() if ms >= 200]
    if results["verify_s"] >= 15:
        missed.append(f"verify: {results['verify_s']} s (budget 15 s)")
    for fmt in ("export_jsonl", "export_csv"):
        if results[fmt]["peak_rss_mb"] >= 100:
            missed.append(f"{fmt}: peak RSS {results[fmt]['peak_rss_mb']} MB (budget 100 MB)")
    writers = results.get("pg_writers")
    if writers and (writers["events_per_s"] < 2000 or not writers["gap_free"] or not writers["verifies"]):
        missed.append(
            f"PostgreSQL writers: {writers['events_per_s']:.0f} events/s (target 2,000), "
            f"gap-free {writers['gap_free']}, verifies {writers['verifies']}"
        )
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
