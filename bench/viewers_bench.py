#!/usr/bin/env python
"""Many viewers of one deployment (issue 12): 1 vs 50 followers of a 200,000-line log, 200 of a paced one.

    .venv/bin/python bench/viewers_bench.py                 # both set-ups, about 5 minutes
    .venv/bin/python bench/viewers_bench.py --no-postgres   # only the embedded default

Everything is real: a testbed node, a panel from ``tests.support.panel`` (daphne and the qcluster as
processes) on the embedded default, then on PostgreSQL + Redis started privately for this run
(``tests.support.services``: own data directory, free port, stopped at the end).  Viewers are WebSocket
clients in this process, connected right after the deploy request; each keeps the raw frames with their
arrival times and is checked afterwards: every line exactly once, in order, all activation lines there.

Figures per set-up:
* ``N viewers, 200,000 lines``: request → last line at each viewer; slowest of 50 / the single viewer's
  (target ≤ 1.5).
* ``200 viewers, paced``: for each line, the spread between its first and last arrival over the viewers,
  p99 (target < 500 ms); failed handshakes (target 0).
* daphne's CPU seconds (utime + stime from /proc) and its database queries and new connections per second,
  counted inside daphne by a ``sitecustomize`` this bench puts on its ``PYTHONPATH``
  (``connection_created`` + an execute wrapper).

Writes bench/results/viewers-<timestamp>.json; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline_bench import ATTR, log, machine, make_bench_repo, pct, setup_django  # noqa: E402

from controlpanel.malloc import tune_malloc  # noqa: E402
from tests.support.panel import Browser, Panel  # noqa: E402
from tests.support.services import PrivatePostgres, PrivateRedis  # noqa: E402
from tests.support.testbed import Testbed, commit_change  # noqa: E402

ACT_PREFIX = "activation output line "
# Viewers ask for compressed `lines` frames, as the log page does where the browser can inflate them.
COMPRESS = True
TARGETS = {"slowest_ratio": 1.5, "spread_p99_ms": 500, "failed_handshakes": 0}

SITECUSTOMIZE = """
import json, os, threading, time
_out = os.environ.get("BENCH_QUERY_COUNT_DIR")
if _out:
    _counts = {"queries": 0, "connections": 0}

    def _wrap(execute, sql, params, many, context):
        _counts["queries"] += 1
        return execute(sql, params, many, context)

    def _created(sender, connection, **kwargs):
        _counts["connections"] += 1
        if _wrap not in connection.execute_wrappers:
            connection.execute_wrappers.append(_wrap)

    from django.db.backends.signals import connection_created
    connection_created.connect(_created, weak=False)

    def _dump():
        path = os.path.join(_out, f"{os.getpid()}.json")
        while True:
            with open(path + ".tmp", "w") as f:
                json.dump(_counts, f)
            os.replace(path + ".tmp", path)
            time.sleep(0.1)

    threading.Thread(target=_dump, daemon=True).start()
"""


class DaphneMeter:
    """daphne's CPU seconds and its query and connection counters, read before and after a phase."""

    def __init__(self, panel: Panel, counts_dir: Path) -> None:
        self.pid = panel.procs["daphne"].pid
        self.path = counts_dir / f"{self.pid}.json"

    def read(self) -> tuple[float, dict]:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        self.sys = int(fields[12]) / os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        time.sleep(0.15)  # the counter file is rewritten every 0.1 s
        counts = json.loads(self.path.read_text()) if self.path.exists() else {"queries": 0, "connections": 0}
        return cpu, counts

    @staticmethod
    def machine_busy() -> tuple[int, int]:
        """(busy, total) jiffies of the whole machine (/proc/stat), for the share others take."""
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = self.machine_busy()
        self.cpu0, self.counts0 = self.read()
        self.sys0 = self.sys

    def stop(self) -> dict:
        cpu, counts = self.read()
        seconds = time.monotonic() - self.t0 - 0.15
        busy = self.machine_busy()
        return {
            "machine_busy_percent": 100 * (busy[0] - self.busy0[0]) / max(1, busy[1] - self.busy0[1]),
            "daphne_cpu_s": cpu - self.cpu0,
            "daphne_kernel_cpu_s": self.sys - self.sys0,
            "seconds": seconds,
            "daphne_cpu_percent": 100 * (cpu - self.cpu0) / seconds,
            "queries_per_s": (counts["queries"] - self.counts0["queries"]) / seconds,
            "connections_per_s": (counts["connections"] - self.counts0["connections"]) / seconds,
        }


async def viewer(url: str, headers: dict, timeout: float) -> dict:
    """One follower: raw frames with arrival times, until the end message; parsed afterwards."""
    import websockets

    frames: list[tuple[float, bytes]] = []
    try:
        ws = await asyncio.wait_for(websockets.connect(url, additional_headers=headers, max_size=None), timeout=30)
    except Exception as exc:  # noqa: BLE001 - a failed handshake is a figure, not a crash
        return {"failed": repr(exc), "frames": [], "connected_at": None}
    connected_at = time.time()
    closed = None
    async with ws:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                raw = await asyncio.wait_for(ws.recv(decode=False), timeout=deadline - time.monotonic())
                frames.append((time.time(), raw))
                if raw.startswith(b'{"type":"end"') or raw.startswith(b'{"type": "end"'):
                    break
        except websockets.ConnectionClosed as exc:
            closed = f"closed by the server with {exc.rcvd.code if exc.rcvd else None} before the end"
    return {"failed": None, "frames": frames, "connected_at": connected_at, "closed": closed}


def check(result: dict, expected_act: int) -> dict:
    """Parse one viewer's frames: per-seq arrival times, problems, time of the last line."""
    arrivals: dict[int, float] = {}
    problems = []
    next_seq = 0
    act = 0
    status = finished_at = None
    for at, raw in result["frames"]:
        if raw[:1] != b"{":  # a compressed `lines` frame (?compress=deflate): a zlib stream
            raw = zlib.decompress(raw)
        msg = json.loads(raw)
        if msg["type"] == "lines":
            for seq, _stream, text in msg["lines"]:
                if seq != next_seq:
                    problems.append(f"seq {seq} where {next_seq} was due")
                next_seq = seq + 1
                arrivals[seq] = at
                if text.startswith(ACT_PREFIX) or " paced line " in text[:40]:
                    act += 1
        elif msg["type"] == "status":
            status = msg["status"]
            finished_at = msg.get("finished_at")
    if result.get("closed"):
        problems.append(result["closed"])
    if act != expected_act:
        problems.append(f"{act} activation lines, {expected_act} expected")
    if status != "succeeded":
        problems.append(f"final status {status}")
    return {
        "arrivals": arrivals,
        "problems": problems[:5],
        "last_line_at": max(arrivals.values(), default=0.0),
        "finished_at": datetime.datetime.fromisoformat(finished_at).timestamp() if finished_at else None,
    }


def follow(
    panel: Panel, browser: Browser, viewers: int, expected_act: int, timeout: float, meter: DaphneMeter | None = None
) -> dict:
    """Deploy and follow with ``viewers`` sockets; ``meter`` measures from the request to the last viewer's end."""
    if meter:
        meter.start()
    t_req = time.time()
    pk = browser.deploy("bench")
    url = f"ws://127.0.0.1:{panel.port}/ws/deployments/{pk}/log/?after=-1" + ("&compress=deflate" if COMPRESS else "")

    async def all_viewers():
        return await asyncio.gather(*(viewer(url, browser.ws_headers(), timeout) for _ in range(viewers)))

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    results = asyncio.run(all_viewers())
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    figures = meter.stop() if meter else {}
    client_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    client_kernel = cpu1.ru_stime - cpu0.ru_stime
    failed = [r["failed"] for r in results if r["failed"]]
    checked = [check(r, expected_act) for r in results if not r["failed"]]
    connected = [r["connected_at"] for r in results if r["connected_at"]]
    finished = next((c["finished_at"] for c in checked if c["finished_at"]), None)
    return {
        "t_req": t_req,
        "failed": failed,
        "checked": checked,
        "all_connected_at": max(connected, default=t_req),
        "client_cpu_s": client_cpu,
        "client_kernel_cpu_s": client_kernel,
        "finished_after_s": (finished - t_req) if finished else None,
        "figures": figures,
    }


def phase_many(panel, browser, repo, meter, lines: int, viewers: int) -> dict:
    commit_change(repo, ATTR, extra_lines=lines, lines_per_second=0)
    follow(panel, browser, 1, lines, 300)  # builds the new system once, outside the measurement
    run = follow(panel, browser, viewers, lines, 300, meter)
    figures = run["figures"]
    times = [c["last_line_at"] - run["t_req"] for c in run["checked"]]
    problems = [p for c in run["checked"] for p in c["problems"]] + run["failed"]
    out = {
        "viewers": viewers,
        "lines": lines,
        "slowest_s": max(times),
        "fastest_s": min(times),
        "median_s": sorted(times)[len(times) // 2],
        "failed_handshakes": len(run["failed"]),
        "problems": problems[:10],
        "viewer_process_cpu_s": run["client_cpu_s"],
        "finished_after_s": run["finished_after_s"],
        **figures,
    }
    log(
        f"  viewers' process {run['client_cpu_s']:.1f} CPU s ({run['client_kernel_cpu_s']:.1f} in the kernel); "
        "the deployment finished "
        f"{run['finished_after_s']:.2f} s after the request"
    )
    log(
        f"  {viewers} viewer(s): slowest {out['slowest_s']:.2f} s, fastest {out['fastest_s']:.2f} s; "
        f"daphne {out['daphne_cpu_s']:.1f} CPU s ({out['daphne_kernel_cpu_s']:.1f} in the kernel), "
        f"{out['queries_per_s']:.0f} queries/s, "
        f"{out['connections_per_s']:.1f} connections/s; machine {out['machine_busy_percent']:.0f} % busy; "
        f"{problems[:3] or 'every line once, in order'}"
    )
    return out


def phase_spread(panel, browser, repo, meter, lines: int, rate: int, viewers: int) -> dict:
    commit_change(repo, ATTR, extra_lines=lines, lines_per_second=rate)
    follow(panel, browser, 1, lines, 300)
    run = follow(panel, browser, viewers, lines, 300, meter)
    figures = run["figures"]
    spreads = []
    checked = run["checked"]
    if checked:
        for seq in checked[0]["arrivals"]:
            times = [c["arrivals"][seq] for c in checked if seq in c["arrivals"]]
            # Lines that arrived while viewers were still connecting reach the late ones by replay.
            if min(times) > run["all_connected_at"]:
                spreads.append((max(times) - min(times)) * 1000)
    problems = [p for c in checked for p in c["problems"]] + run["failed"]
    out = {
        "viewers": viewers,
        "lines": lines,
        "rate": rate,
        "spread_p50_ms": pct(spreads, 50),
        "spread_p99_ms": pct(spreads, 99),
        "spread_max_ms": max(spreads, default=float("nan")),
        "spread_lines": len(spreads),
        "handshakes_s": run["all_connected_at"] - run["t_req"],
        "failed_handshakes": len(run["failed"]),
        "problems": problems[:10],
        **figures,
    }
    log(
        f"  {viewers} viewers, {lines} lines at {rate}/s: spread p50 {out['spread_p50_ms']:.0f} / p99 "
        f"{out['spread_p99_ms']:.0f} ms over {out['spread_lines']} lines (all connected {out['handshakes_s']:.1f} s "
        f"after the request), {out['failed_handshakes']} failed handshakes; daphne "
        f"{out['daphne_cpu_percent']:.0f} % CPU, {out['queries_per_s']:.0f} queries/s, "
        f"{out['connections_per_s']:.1f} connections/s; {problems[:3] or 'every line once, in order'}"
    )
    return out


def run_setup(args, workdir: Path, node, repo: Path, **urls) -> dict:
    workdir.mkdir(parents=True)
    counts = workdir / "counts"
    counts.mkdir()
    site = workdir / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    panel = Panel(workdir, **urls)
    panel.env["PYTHONPATH"] = str(site)
    panel.env["BENCH_QUERY_COUNT_DIR"] = str(counts)
    try:
        panel.register_node(node, name="bench", attr=ATTR, repo_path=repo)
        panel.start()
        browser = Browser(panel)
        browser.login()
        meter = DaphneMeter(panel, counts)
        out = {"many": []}
        for viewers in (1, args.viewers):
            log(f"{viewers} viewer(s) of {args.lines:,} lines")
            out["many"].append(phase_many(panel, browser, repo, meter, args.lines, viewers))
        out["slowest_ratio"] = out["many"][1]["slowest_s"] / out["many"][0]["slowest_s"]
        log(f"slowest of {args.viewers} / single: {out['slowest_ratio']:.2f}")
        log(f"{args.spread_viewers} viewers of {args.paced_lines:,} lines at {args.rate}/s")
        out["spread"] = phase_spread(panel, browser, repo, meter, args.paced_lines, args.rate, args.spread_viewers)
        return out
    finally:
        if "worker" in panel.procs:
            panel.kill("worker")
        panel.stop()


def missed(setup: str, s: dict) -> list[str]:
    out = []
    if s["slowest_ratio"] > TARGETS["slowest_ratio"]:
        out.append(f"{setup}: slowest viewer {s['slowest_ratio']:.2f}× a single one > {TARGETS['slowest_ratio']}")
    if not s["spread"]["spread_p99_ms"] < TARGETS["spread_p99_ms"]:
        out.append(f"{setup}: spread p99 {s['spread']['spread_p99_ms']:.0f} ms >= {TARGETS['spread_p99_ms']}")
    for figures in [*s["many"], s["spread"]]:
        if figures["failed_handshakes"]:
            out.append(f"{setup}: {figures['failed_handshakes']} failed handshakes ({figures['viewers']} viewers)")
        if figures["problems"]:
            out.append(f"{setup}: {figures['viewers']} viewers: {figures['problems'][:3]}")
    return out


def main() -> int:
    # The viewers here stand for browsers on other machines: spare them the allocator churn daphne is
    # spared too (controlpanel/malloc.py), so they take less of the CPUs daphne and the worker share.
    tune_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--viewers", type=int, default=50)
    ap.add_argument("--spread-viewers", type=int, default=200)
    ap.add_argument("--paced-lines", type=int, default=3_000)
    ap.add_argument("--rate", type=int, default=300, help="paced lines per second")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--no-compress", action="store_true", help="plain `lines` frames (no ?compress=deflate)")
    args = ap.parse_args()
    global COMPRESS
    COMPRESS = not args.no_compress
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "args": vars(args)}
    tmp = Path(tempfile.mkdtemp(prefix="viewers-bench-"))
    setup_django(tmp)
    tb = Testbed(tmp / "tb")
    try:
        repo = tmp / "fleet"
        make_bench_repo(repo)
        node = tb.add_node("viewers")
        if not args.no_sqlite:
            log("panel: embedded default (SQLite, ORM broker, feed polls the database)")
            results["sqlite"] = run_setup(args, tmp / "panel-sqlite", node, repo)
        if not args.no_postgres:
            log("panel: PostgreSQL + Redis, private instances (channels-redis pushes, Redis broker)")
            with PrivatePostgres() as pg, PrivateRedis() as redis:
                results["postgres"] = run_setup(
                    args, tmp / "panel-pg", node, repo, database_url=pg.url, redis_url=redis.url
                )
    finally:
        tb.close()
        subprocess.run(["rm", "-rf", str(tmp)])
    results["machine"]["loadavg_end"] = os.getloadavg()
    failures = [m for setup in ("sqlite", "postgres") if setup in results for m in missed(setup, results[setup])]
    results["failures"] = failures
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"viewers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    for f in failures:
        print(f"MISSED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
