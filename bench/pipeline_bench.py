#!/usr/bin/env python
"""Deploy pipeline benchmarks (issue 2): log throughput, line latency, worker memory, overhead.

    .venv/bin/python bench/pipeline_bench.py                 # everything, about 3-4 minutes
    .venv/bin/python bench/pipeline_bench.py --no-postgres   # only the embedded default (SQLite, poll)

Everything runs for real on this machine: a testbed node (network namespace, sshd, Nix,
the nixos-rebuild stand-in) and a panel started by ``tests.support.panel.Panel`` (migrate,
daphne and the qcluster worker as processes).  Deployments are requested over HTTP as a
logged-in browser does and their logs are read from the WebSocket, checking every line:
sequence numbers gap-free from 0 without duplicates, and the activation lines all there,
in order.  The bare paramiko figures run the same ``nixos-rebuild switch`` on the same node
(flake unpacked there beforehand) with ``exec_command`` and a read until EOF.

One testbed node per panel, one flake attribute ``bench``; each phase commits a new
``testbed.json`` (``commit_change``) and the panel deploys the branch head, so the only
thing that changes between phases is what the activation prints.

Definitions (all clocks are this machine's; the node shares it):
* request = just before the HTTP POST of the deploy form.
* throughput, request→all: activation lines / (last activation line at the WS client - request).
  The bare figure: lines / (EOF - before connect).
* throughput, streaming: activation lines / (last - first activation line at the client).
* latency: time the WS client received a paced line - the timestamp the node printed in it.
* overhead, first line: request → first remote line (stream o or e) at the WS client.
* overhead, total: request → the WS client got the terminal status; bare: connect + run + EOF + exit status.

Writes bench/results/pipeline-<timestamp>.json; exits 1 when a target is missed: throughput and first-line
overhead are gated on the embedded default, latency p99 and completeness on both set-ups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.panel import Browser, Panel  # noqa: E402
from tests.support.processes import process_group, stat_fields  # noqa: E402
from tests.support.testbed import NodeConfigSpec, Testbed, commit_change, make_flake_repo  # noqa: E402

ATTR = "bench"
TERMINAL = {"succeeded", "failed", "error", "cancelled", "interrupted"}
ACT_PREFIX = "activation output line "
PG_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

TARGETS = {
    "throughput_lines_per_s": 50_000,
    "latency_p99_ms": 250,
    "overhead_first_line_ms": 500,
}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class NodeCPU:
    """CPU time of everything testbed nodes run (their sshd and every process started under it, detached
    ones included), from a cgroup v1 ``cpuacct`` group of their own; ``None`` where that cannot be made."""

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, pids: list[int]) -> None:
        self.group: Path | None = self.ROOT / f"node-bench-{os.getpid()}"
        try:
            self.group.mkdir(exist_ok=True)
            for pid in pids:
                (self.group / "cgroup.procs").write_text(str(pid))
        except OSError:
            self.group = None

    def seconds(self) -> float | None:
        return int((self.group / "cpuacct.usage").read_text()) / 1e9 if self.group else None

    def close(self) -> None:
        if self.group is not None:
            for pid in (self.group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # it ended meanwhile
                    (self.ROOT / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):  # a process still in it: the group goes with the next boot
                self.group.rmdir()


def machine_busy_seconds() -> float:
    """CPU time every CPU of this machine has spent busy so far (``/proc/stat``): the nodes' sshd, shells and Nix
    run on this machine too, so a round's total CPU is the difference of two readings (the bench's own included)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- WebSocket follower


async def _follow(panel: Panel, browser: Browser, dep_id: int, *, kind: str, timeout: float) -> dict:
    """Follow one deployment's log over the WebSocket, checking every line, keeping only counters."""
    import websockets

    url = f"ws://127.0.0.1:{panel.port}/ws/deployments/{dep_id}/log/?after=-1"
    st = {
        "lines": 0,
        "seq_gaps": 0,
        "seq_dups": 0,
        "next_seq": 0,
        "act_lines": 0,
        "act_out_of_order": 0,
        "act_next": 1,
        "t_first_remote": None,
        "t_first_act": None,
        "t_last_act": None,
        "t_last_line": None,
        "first_remote_line": None,
        "final_status": None,
        "t_final": None,
        "ended": False,
        "t_end": None,
        "latencies": [],
        "messages": 0,
        "created_at": None,
        "started_at": None,
        "t_first_line": None,
    }
    async with websockets.connect(url, additional_headers=browser.ws_headers(), max_size=None) as ws:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"deployment {dep_id}: no end after {timeout} s ({st['lines']} lines)")
            raw = await asyncio.wait_for(ws.recv(), timeout=left)
            now = time.time()
            msg = json.loads(raw)
            st["messages"] += 1
            if msg["type"] == "lines":
                for seq, stream, text in msg["lines"]:
                    if seq != st["next_seq"]:
                        st["seq_gaps" if seq > st["next_seq"] else "seq_dups"] += 1
                    st["next_seq"] = max(st["next_seq"], seq + 1)
                    st["lines"] += 1
                    st["t_first_line"] = st["t_first_line"] or now
                    if stream == "s":
                        continue
                    if st["t_first_remote"] is None:
                        st["t_first_remote"], st["first_remote_line"] = now, f"{stream}:{text[:80]}"
                    if stream != "o":
                        continue
                    if kind == "seq" and text.startswith(ACT_PREFIX):
                        n = int(text[len(ACT_PREFIX) : len(ACT_PREFIX) + 12])
                    elif kind == "paced" and " paced line " in text:
                        ts, _, _, n_text, _ = text.split(" ", 4)
                        n = int(n_text)
                        st["latencies"].append(now - float(ts))
                    else:
                        continue
                    if n != st["act_next"]:
                        st["act_out_of_order"] += 1
                    st["act_next"] = n + 1
                    st["act_lines"] += 1
                    st["t_first_act"] = st["t_first_act"] or now
                    st["t_last_act"] = now
                st["t_last_line"] = now
            elif msg["type"] == "status":
                for key in ("created_at", "started_at"):
                    if msg.get(key) and not st[key]:
                        st[key] = dt.datetime.fromisoformat(msg[key]).timestamp()
                if msg["status"] in TERMINAL and st["final_status"] is None:
                    st["final_status"], st["t_final"] = msg["status"], now
            elif msg["type"] == "end":
                st["ended"], st["t_end"] = True, now
                return st


def deploy_and_follow(panel: Panel, browser: Browser, node: str, *, kind: str = "seq", timeout: float = 300) -> dict:
    t_req = time.time()
    dep_id = browser.deploy(node)
    t_posted = time.time()
    st = asyncio.run(_follow(panel, browser, dep_id, kind=kind, timeout=timeout))
    st.update(id=dep_id, t_req=t_req, post_ms=(t_posted - t_req) * 1000)
    return st


def check_complete(st: dict, expected_act: int) -> list[str]:
    """Problems with a followed log: lost, duplicated or reordered lines, wrong end."""
    problems = []
    if st["seq_gaps"] or st["seq_dups"]:
        problems.append(f"seq gaps {st['seq_gaps']}, duplicates {st['seq_dups']}")
    if (
        st["act_lines"] != expected_act
        or st["act_out_of_order"]
        or (expected_act and st["act_next"] != expected_act + 1)
    ):
        problems.append(f"activation lines {st['act_lines']}/{expected_act}, out of order {st['act_out_of_order']}")
    if st["final_status"] != "succeeded" or not st["ended"]:
        problems.append(f"final status {st['final_status']}, ended {st['ended']}")
    return problems


# --------------------------------------------------------------------------- bare paramiko


def rebuild_command() -> str:
    return f"nixos-rebuild switch --flake {shlex.quote(f'path:/root/fleet#{ATTR}')}"


def bare_run(tb_node, command: str, *, expect_act: int | None = None) -> dict:
    """connect, exec_command, read stdout then stderr until EOF, exit status, close."""
    t0 = time.time()
    client = tb_node.ssh_client()
    t_conn = time.time()
    chan = client.get_transport().open_session()
    chan.exec_command(command)
    chan.shutdown_write()
    chunks, t_first = [], None
    while True:
        data = chan.recv(1 << 20)
        if not data:
            break
        if t_first is None:
            t_first = time.time()
        chunks.append(data)
    t_last = time.time()
    err = []
    while True:
        data = chan.recv_stderr(1 << 16)
        if not data:
            break
        err.append(data)
    code = chan.recv_exit_status()
    t_done = time.time()
    client.close()
    out = b"".join(chunks).split(b"\n")
    if out and out[-1] == b"":
        out.pop()
    res = {
        "exit_code": code,
        "connect_ms": (t_conn - t0) * 1000,
        "total_s": t_done - t0,
        "out_lines": len(out),
        "stream_s": (t_last - t_first) if t_first else 0.0,
        "to_eof_s": t_last - t0,
    }
    if code != 0:
        raise RuntimeError(f"bare nixos-rebuild exited {code}: {b''.join(err)[-2000:].decode(errors='replace')}")
    if expect_act is not None:
        prefix = ACT_PREFIX.encode()
        act = [line for line in out if line.startswith(prefix)]
        ok = len(act) == expect_act and all(int(line[23:35]) == i + 1 for i, line in enumerate(act))
        res["act_lines"], res["complete"] = len(act), ok
    return res


# --------------------------------------------------------------------------- memory


class TreeRSS:
    """Samples the RSS of every process in a process group (the qcluster tree) every 20 ms."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak_sum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def pids(self) -> list[int]:
        return process_group(self.pgid)

    def rss(self) -> dict[int, int]:
        sizes = {}
        for pid in self.pids():
            fields = stat_fields(pid)
            if fields is not None:
                sizes[pid] = int(fields[21]) * self.page
        return sizes

    def hwm(self) -> dict[int, int]:
        out = {}
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out[pid] = int(line.split()[1]) * 1024
            except OSError:
                pass
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_sum = max(self.peak_sum, sum(self.rss().values()))
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> TreeRSS:
        self.baseline_sum = sum(self.rss().values())
        self.baseline = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def restart_worker(panel: Panel) -> None:
    panel.kill("worker")  # SIGKILL to the group: django-q2's graceful stop can take 30 s and more
    panel.start(daphne=False, worker=True)
    time.sleep(3)  # let the cluster fork its workers before measuring a baseline


def measure_memory(panel: Panel, browser: Browser, repo: Path, lines: int) -> dict:
    commit_change(repo, ATTR, extra_lines=lines, lines_per_second=0)
    restart_worker(panel)
    with TreeRSS(panel.procs["worker"].pid) as tree:
        st = deploy_and_follow(panel, browser, "bench", timeout=600)
        hwm = tree.hwm()
    problems = check_complete(st, lines)
    # The process that ran the task is the one whose peak grew the most over its start.
    grown = {pid: hwm[pid] - tree.baseline.get(pid, 0) for pid in hwm}
    task_pid = max(grown, key=grown.get)
    return {
        "lines": lines,
        "tree_baseline_mb": tree.baseline_sum / 2**20,
        "tree_peak_mb": tree.peak_sum / 2**20,
        "tree_growth_mb": (tree.peak_sum - tree.baseline_sum) / 2**20,
        "task_process_peak_mb": hwm[task_pid] / 2**20,
        "task_process_start_mb": tree.baseline.get(task_pid, 0) / 2**20,
        "processes": len(hwm),
        "samples": tree.samples,
        "seconds": st["t_end"] - st["t_req"],
        "lines_per_s": lines / (st["t_last_act"] - st["t_req"]),
        "problems": problems,
    }


# --------------------------------------------------------------------------- phases


def make_bench_repo(path: Path) -> None:
    make_flake_repo(path, {ATTR: NodeConfigSpec()})


def set_lines(repo: Path, tb_node, lines: int, per_second: int = 0) -> None:
    commit_change(repo, ATTR, extra_lines=lines, lines_per_second=per_second)
    tb_node.run("rm -rf /root/fleet")
    tb_node.ship_flake(repo, "/root/fleet")


def phase_throughput(panel, browser, repo, tb_node, lines: int, runs: int) -> dict:
    set_lines(repo, tb_node, lines)
    bare_run(tb_node, rebuild_command())  # builds the new toplevel once
    out = {"lines": lines, "runs": []}
    for i in range(runs):
        bare = bare_run(tb_node, rebuild_command(), expect_act=lines)
        st = deploy_and_follow(panel, browser, "bench")
        problems = check_complete(st, lines)
        run = {
            "panel_request_to_all_s": st["t_last_act"] - st["t_req"],
            "panel_request_to_first_s": st["t_first_act"] - st["t_req"],
            "panel_streaming_s": st["t_last_act"] - st["t_first_act"],
            "panel_request_to_end_s": st["t_end"] - st["t_req"],
            "bare_to_eof_s": bare["to_eof_s"],
            "bare_streaming_s": bare["stream_s"],
            "bare_complete": bare["complete"],
            "problems": problems,
            "ws_messages": st["messages"],
        }
        run["panel_lines_per_s"] = lines / run["panel_request_to_all_s"]
        run["panel_streaming_lines_per_s"] = lines / run["panel_streaming_s"]
        run["bare_lines_per_s"] = lines / run["bare_to_eof_s"]
        run["bare_streaming_lines_per_s"] = lines / max(run["bare_streaming_s"], 1e-6)
        run["ratio"] = run["panel_lines_per_s"] / run["bare_lines_per_s"]
        run["streaming_ratio"] = run["panel_streaming_lines_per_s"] / run["bare_streaming_lines_per_s"]
        log(
            f"  throughput run {i + 1}: panel {run['panel_lines_per_s']:,.0f} lines/s "
            f"(streaming {run['panel_streaming_lines_per_s']:,.0f}), bare {run['bare_lines_per_s']:,.0f} "
            f"(streaming {run['bare_streaming_lines_per_s']:,.0f}) {problems or 'complete'}"
        )
        out["runs"].append(run)
    best = max(out["runs"], key=lambda r: r["panel_lines_per_s"])
    out["median"] = {k: statistics.median(r[k] for r in out["runs"]) for k in best if isinstance(best[k], float)}
    out["problems"] = [p for r in out["runs"] for p in r["problems"]]
    return out


def phase_latency(panel, browser, repo, tb_node, lines: int, rate: int) -> dict:
    set_lines(repo, tb_node, lines, rate)
    bare_run(
        tb_node,
        f"nix --extra-experimental-features 'nix-command flakes' build --no-link "
        f"'path:/root/fleet#nixosConfigurations.{ATTR}.config.system.build.toplevel'",
    )
    st = deploy_and_follow(panel, browser, "bench", kind="paced", timeout=lines / rate * 3 + 60)
    lat = [x * 1000 for x in st["latencies"]]
    res = {
        "lines": lines,
        "rate_asked": rate,
        "rate_achieved": lines / (st["t_last_act"] - st["t_first_act"]) if lines > 1 else 0,
        "p50_ms": pct(lat, 50),
        "p95_ms": pct(lat, 95),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat),
        "min_ms": min(lat),
        "mean_ms": statistics.fmean(lat),
        "ws_messages": st["messages"],
        "problems": check_complete(st, lines),
    }
    log(
        f"  latency: p50 {res['p50_ms']:.0f} ms, p95 {res['p95_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, "
        f"max {res['max_ms']:.0f} ms at {res['rate_achieved']:.0f} lines/s {res['problems'] or 'complete'}"
    )
    return res


def phase_overhead(panel, browser, repo, tb_node, deploys: int) -> dict:
    set_lines(repo, tb_node, 0)
    bare_run(tb_node, rebuild_command())  # build once
    deploy_and_follow(panel, browser, "bench")  # warm-up (first git fetch into the mirror etc.)
    first, total, bare, post = [], [], [], []
    to_row, pickup, claim_to_first, first_sys = [], [], [], []
    problems = []
    for _ in range(deploys):
        b = bare_run(tb_node, rebuild_command())
        bare.append(b["total_s"] * 1000)
        st = deploy_and_follow(panel, browser, "bench")
        problems += check_complete(st, 0)
        first.append((st["t_first_remote"] - st["t_req"]) * 1000)
        total.append((st["t_final"] - st["t_req"]) * 1000)
        post.append(st["post_ms"])
        to_row.append((st["created_at"] - st["t_req"]) * 1000)
        pickup.append((st["started_at"] - st["created_at"]) * 1000)
        first_sys.append((st["t_first_line"] - st["started_at"]) * 1000)
        claim_to_first.append((st["t_first_remote"] - st["started_at"]) * 1000)
    res = {
        "deploys": deploys,
        "first_line_median_ms": statistics.median(first),
        "first_line_max_ms": max(first),
        "total_median_ms": statistics.median(total),
        "bare_total_median_ms": statistics.median(bare),
        "post_median_ms": statistics.median(post),
        "breakdown_median_ms": {
            "request_to_row": statistics.median(to_row),
            "row_to_claimed (queue pickup)": statistics.median(pickup),
            "claimed_to_first_sys_line_at_client": statistics.median(first_sys),
            "claimed_to_first_remote_line_at_client": statistics.median(claim_to_first),
        },
        "first_line_ms": first,
        "total_ms": total,
        "bare_total_ms": bare,
        "post_ms": post,
        "first_remote_line": st["first_remote_line"],
        "problems": problems,
    }
    res["total_ratio"] = res["total_median_ms"] / res["bare_total_median_ms"]
    log(
        f"  overhead: first remote line median {res['first_line_median_ms']:.0f} ms (POST {res['post_median_ms']:.0f} ms), "
        f"total {res['total_median_ms']:.0f} ms vs bare {res['bare_total_median_ms']:.0f} ms "
        f"(x{res['total_ratio']:.2f}) {problems or 'complete'}"
    )
    log("  breakdown (medians): " + ", ".join(f"{k} {v:.0f} ms" for k, v in res["breakdown_median_ms"].items()))
    return res


@contextlib.contextmanager
def environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_panel(workdir: Path, tb_node, repo: Path) -> tuple[Panel, Browser]:
    t = time.monotonic()
    workdir.mkdir(parents=True)
    panel = Panel(workdir)
    try:
        panel.register_node(tb_node, name="bench", attr=ATTR, repo_path=repo)
        panel.start()
        browser = Browser(panel)
        browser.login()
    except BaseException:
        panel.stop()
        raise
    log(f"  panel up in {time.monotonic() - t:.1f} s ({panel.url})")
    return panel, browser


def setup_django(tmp: Path) -> None:
    """Django in this process too (Panel.register_nodes imports the models), on a throwaway data dir."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlpanel.settings")
    with environment(PANEL_DATA_DIR=str(tmp / "bench-process"), DATABASE_URL=None, REDIS_URL=None):
        django.setup()


def stop_panel(panel: Panel) -> None:
    if "worker" in panel.procs:
        panel.kill("worker")  # nothing is running; django-q2's graceful stop would take 20 s
    panel.stop()


def machine() -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""

    lscpu = dict(line.split(":", 1) for line in sh("lscpu").splitlines() if ":" in line)
    return {
        "cpu": lscpu.get("Model name", "").strip(),
        "cpus": os.cpu_count(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def run_setup(args, workdir: Path, node, repo: Path, phases: tuple[str, ...], memory: bool) -> dict:
    """One panel on ``workdir``: the phases in the order given, then (if ``memory``) the worker's memory."""
    panel, browser = start_panel(workdir, node, repo)
    runs = {
        "throughput": (
            f"throughput, {args.lines:,} lines",
            lambda: phase_throughput(panel, browser, repo, node, args.lines, args.runs),
        ),
        "latency": (
            f"latency, {args.paced_lines:,} lines at {args.rate}/s",
            lambda: phase_latency(panel, browser, repo, node, args.paced_lines, args.rate),
        ),
        "overhead": (
            f"overhead, {args.deploys} deploys",
            lambda: phase_overhead(panel, browser, repo, node, args.deploys),
        ),
    }
    out: dict = {}
    try:
        for phase in phases:
            title, run = runs[phase]
            log(title)
            out[phase] = run()
        if memory:
            out["memory"] = []
            for n in args.mem_lines:
                log(f"worker memory, {n:,} lines")
                m = measure_memory(panel, browser, repo, n)
                log(
                    f"  tree {m['tree_baseline_mb']:.0f} → peak {m['tree_peak_mb']:.0f} MB; task process "
                    f"{m['task_process_start_mb']:.0f} → peak {m['task_process_peak_mb']:.0f} MB; "
                    f"{m['lines_per_s']:,.0f} lines/s {m['problems'] or 'complete'}"
                )
                out["memory"].append(m)
    finally:
        stop_panel(panel)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=200_000, help="throughput: activation lines (75 bytes each)")
    ap.add_argument("--runs", type=int, default=3, help="throughput runs")
    ap.add_argument("--paced-lines", type=int, default=10_000)
    ap.add_argument("--rate", type=int, default=1000, help="paced lines per second")
    ap.add_argument("--mem-lines", type=int, nargs=2, default=[100_000, 1_000_000])
    ap.add_argument("--deploys", type=int, default=10, help="overhead: deploys to time")
    ap.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL + Redis panel")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the embedded default panel")
    args = ap.parse_args()

    started = time.monotonic()
    results: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "args": vars(args),
        "targets": TARGETS,
    }
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    setup_django(tmp)
    tb = Testbed(tmp / "tb")
    try:
        repo = tmp / "fleet"
        make_bench_repo(repo)
        node = tb.add_node("bench")
        log(f"testbed node up at {node.host}:{node.port}")

        if not args.no_sqlite:
            log("panel: embedded default (SQLite, ORM broker, in-memory layer + DB poll)")
            results["sqlite"] = run_setup(
                args, tmp / "panel-sqlite", node, repo, ("throughput", "latency", "overhead"), memory=True
            )
        if not args.no_postgres:
            log("panel: PostgreSQL + Redis (channels-redis pushes, Redis broker)")
            with environment(DATABASE_URL=PG_URL, REDIS_URL=REDIS_URL):
                results["postgres"] = run_setup(
                    args, tmp / "panel-pg", node, repo, ("latency", "throughput", "overhead"), memory=False
                )
    finally:
        tb.close()
        subprocess.run(["rm", "-rf", str(tmp)])
    results["seconds"] = time.monotonic() - started
    results["machine"]["loadavg_end"] = os.getloadavg()

    failures = report(results)
    results["failures"] = failures
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)} ({results['seconds']:.0f} s)")
    for f in failures:
        print(f"MISSED: {f}")
    return 1 if failures else 0


# The report's rows: per phase, (what, figure, detail) templates over that phase's figures.
REPORT_ROWS = {
    "throughput": [
        (
            "throughput {lines:,} lines, request→all",
            "{panel_lines_per_s:,.0f} lines/s ({panel_request_to_all_s:.2f} s)",
            "bare {bare_lines_per_s:,.0f} lines/s ({bare_to_eof_s:.2f} s), ratio {ratio:.2f}",
        ),
        (
            "throughput, first→last line at client",
            "{panel_streaming_lines_per_s:,.0f} lines/s ({panel_streaming_s:.2f} s)",
            "bare {bare_streaming_lines_per_s:,.0f} lines/s, ratio {streaming_ratio:.2f}",
        ),
    ],
    "latency": [
        (
            "latency {lines:,} lines at {rate_achieved:.0f}/s",
            "p50 {p50_ms:.0f} / p95 {p95_ms:.0f} / p99 {p99_ms:.0f} ms",
            "max {max_ms:.0f} ms",
        ),
    ],
    "overhead": [
        (
            "request → first remote line ({deploys} deploys)",
            "median {first_line_median_ms:.0f} ms",
            "max {first_line_max_ms:.0f} ms",
        ),
        (
            "request → final status",
            "median {total_median_ms:.0f} ms",
            "bare {bare_total_median_ms:.0f} ms, ratio {total_ratio:.2f}",
        ),
    ],
    "memory": [
        (
            "worker memory, {lines:,} lines",
            "task process peak {task_process_peak_mb:.0f} MB",
            "started at {task_process_start_mb:.0f}; tree {tree_baseline_mb:.0f} → {tree_peak_mb:.0f} MB; "
            "{lines_per_s:,.0f} lines/s",
        ),
    ],
}


def _phase_results(s: dict, phase: str) -> list[tuple[str, dict]]:
    """(label for problems, figures) of each result of ``phase`` in one setup's results."""
    if phase == "memory":
        return [(f"memory {m['lines']}", m) for m in s.get("memory", [])]
    if phase not in s:
        return []
    figures = s[phase]
    if phase == "throughput":  # the median run, and the line count of them all
        figures = {**figures["median"], "lines": figures["lines"], "problems": figures["problems"]}
    return [(phase, figures)]


def _missed_targets(setup: str, s: dict) -> list[str]:
    """The targets one setup's results miss (throughput and first line are gated on the embedded default only)."""
    missed = []
    if setup == "sqlite" and "throughput" in s:
        got = s["throughput"]["median"]["panel_lines_per_s"]
        if got < TARGETS["throughput_lines_per_s"]:
            missed.append(f"throughput {got:,.0f} < {TARGETS['throughput_lines_per_s']:,}")
    if "latency" in s and s["latency"]["p99_ms"] >= TARGETS["latency_p99_ms"]:
        missed.append(f"latency p99 {s['latency']['p99_ms']:.0f} ms >= {TARGETS['latency_p99_ms']}")
    if setup == "sqlite" and "overhead" in s:
        got = s["overhead"]["first_line_median_ms"]
        if got >= TARGETS["overhead_first_line_ms"]:
            missed.append(f"first line {got:.0f} ms >= {TARGETS['overhead_first_line_ms']}")
    mem = s.get("memory", [])
    if len(mem) == 2 and mem[1]["task_process_peak_mb"] > mem[0]["task_process_peak_mb"] * 1.25 + 10:
        missed.append(
            f"worker memory grows with the log: {mem[0]['task_process_peak_mb']:.0f} → "
            f"{mem[1]['task_process_peak_mb']:.0f} MB"
        )
    return missed


def report(r: dict) -> list[str]:
    failures = []
    rows = []
    for setup in ("sqlite", "postgres"):
        if setup not in r:
            continue
        s = r[setup]
        name = "SQLite/poll" if setup == "sqlite" else "PG+Redis/push"
        for phase, templates in REPORT_ROWS.items():
            for label, figures in _phase_results(s, phase):
                rows += [(name, *(cell.format(**figures) for cell in template)) for template in templates]
                failures += [f"{name} {label}: {p}" for p in figures["problems"]]
        failures += [f"{name} {missed}" for missed in _missed_targets(setup, s)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return failures


if __name__ == "__main__":
    sys.exit(main())
