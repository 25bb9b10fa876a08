"""End to end: daphne and the qcluster as real processes, HTTP with CSRF, the WebSocket log.

Runs on the embedded default (SQLite, ORM broker); `make test` runs it again on
PostgreSQL + Redis (channels-redis pushes, the django-q2 Redis broker).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.support.net import free_port
from tests.support.panel import ROOT, Browser, Panel, read_log
from tests.support.wait import wait_for

from .conftest import CHATTY_LINES

pytestmark = pytest.mark.e2e


def final_status(result: dict) -> str:
    return result["statuses"][-1]["status"]


def test_a_deploy_requested_over_http_streams_every_line_in_order(panel, browser):
    pk = browser.deploy("chatty")
    result = asyncio.run(read_log(panel, browser, pk))
    assert result["ended"], panel.logs()
    seqs = [line[0] for line in result["lines"]]
    assert seqs == list(range(len(seqs))), "gap-free, in order, no duplicates"
    paced = [line[2] for line in result["lines"] if " paced line " in line[2]]
    assert [int(t.split(" paced line ")[1][:8]) for t in paced] == list(range(1, CHATTY_LINES + 1))
    assert final_status(result) == "succeeded"
    assert result["statuses"][-1]["generation_after"] is not None


def test_a_reconnect_mid_stream_resumes_without_gaps_or_duplicates(panel, browser):
    pk = browser.deploy("chatty")
    first = asyncio.run(read_log(panel, browser, pk, stop_after_lines=300))
    assert not first["ended"] and len(first["lines"]) >= 300
    last_seq = first["lines"][-1][0]
    second = asyncio.run(read_log(panel, browser, pk, after=last_seq))
    assert second["ended"], panel.logs()
    seqs = [line[0] for line in first["lines"] + second["lines"]]
    assert seqs == list(range(len(seqs)))
    assert sum(" paced line " in line[2] for line in first["lines"] + second["lines"]) == CHATTY_LINES


def test_a_finished_log_replays_in_full_to_a_late_client(panel, browser):
    pk = browser.deploy("devm")
    live = asyncio.run(read_log(panel, browser, pk))
    late = asyncio.run(read_log(panel, browser, pk))
    assert late["ended"] and late["lines"] == live["lines"]
    assert final_status(late) == "succeeded"


def test_a_failing_activation_reaches_the_browser_as_failed(panel, browser):
    pk = browser.deploy("failing")
    result = asyncio.run(read_log(panel, browser, pk))
    assert final_status(result) == "failed" and result["statuses"][-1]["exit_code"] == 1
    assert any("the following units failed" in line[2] for line in result["lines"][-15:])


def test_the_websocket_refuses_an_anonymous_client(panel, browser):
    pk = browser.deploy("devm")
    asyncio.run(read_log(panel, browser, pk))
    anonymous = Browser(panel)
    anonymous.request("GET", "/login/")
    result = asyncio.run(read_log(panel, anonymous, pk, timeout=10))
    assert result["lines"] == [] and result["close_code"] == 403, "refused at the handshake"


def test_a_deploy_without_csrf_token_is_refused(panel, browser):
    status, _, _ = browser.request("POST", "/nodes/devm/deploy/", {"action": "switch"}, csrf=False)
    assert status == 403


def test_the_deploy_command_follows_the_log_and_exits_with_the_outcome(panel):
    ok = panel.manage("deploy", "devm", "--follow", check=False)
    assert ok.returncode == 0, ok.stderr
    assert "activating the configuration..." in ok.stderr and "succeeded" in ok.stderr
    bad = panel.manage("deploy", "failing", "--follow", check=False)
    assert bad.returncode == 1 and "failed (exit code 1)" in bad.stderr
    refused = panel.manage("deploy", "devm", "--rev", "main;reboot", check=False)
    assert refused.returncode == 2 and "not allowed" in refused.stderr


def test_a_worker_killed_mid_deploy_leaves_an_interrupted_deployment_and_a_free_node(panel, browser, testbed):
    node = testbed.nodes[f"e2e-chatty-{testbed.token}"]
    runs = len(node.rebuild_runs())
    pk = browser.deploy("chatty")
    first = asyncio.run(read_log(panel, browser, pk, stop_after_lines=300, timeout=60))
    assert not first["ended"]
    panel.kill("worker", signal.SIGKILL)
    try:
        wait_for(
            lambda: "1 deployment(s)" in panel.manage("reapdeployments", "--stale-after", "2").stdout,
            timeout=30,
            interval=0.5,
            what="the stale deployment to be reaped",
        )
        status, _, body = browser.request("GET", f"/api/deployments/{pk}/")
        assert b'"status": "interrupted"' in body
    finally:
        panel.start(worker=True)
    # The run went on without its worker, detached on the node: reconcile records how it ended there.
    # Magic rollback is on (the default 30 s deadline): the killed worker never confirmed the new system
    # over a new connection, so the node went back by itself, and reconcile records that.
    reconciled = []
    wait_for(
        lambda: reconciled.append(panel.manage("reconcile", str(pk), check=False)) or reconciled[-1].returncode == 0,
        timeout=60,
        interval=1,
        what="reconcile to find the run ended on the node",
    )
    assert "exit code 0, then the node rolled back: no confirmation" in reconciled[-1].stdout, (
        reconciled[-1].stdout + reconciled[-1].stderr
    )
    _, _, body = browser.request("GET", f"/api/deployments/{pk}/")
    assert b'"status": "rolled_back"' in body and b'"generation_after": null' not in body
    # Never re-run by the queue, and the node is free for a human's new deploy.
    again = browser.deploy("chatty")
    result = asyncio.run(read_log(panel, browser, again))
    assert final_status(result) == "succeeded"
    assert len(node.rebuild_runs()) == runs + 2


def test_runpanel_creates_the_first_admin_and_serves_the_panel(tmp_path):
    port = free_port()
    proc_env = {
        **os.environ,
        "PANEL_DATA_DIR": str(tmp_path / "data"),
        "DJANGO_SETTINGS_MODULE": "controlpanel.settings",
    }
    proc_env.pop("DATABASE_URL", None)
    proc_env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "runpanel", "--port", str(port)],
        cwd=ROOT,
        env=proc_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = ""
        for line in proc.stdout:
            output += line
            if "Panel at" in line:
                break
        password = re.search(r"password: (\S+)", output).group(1)
        fake = Panel.__new__(Panel)
        fake.url, fake.port, fake.password = f"http://127.0.0.1:{port}", port, password
        wait_for(fake._http_up, timeout=30, what="the panel to listen")
        b = Browser(fake)
        b.login("admin", password)
        status, _, page = b.request("GET", "/")
        assert status == 200 and b"NixOS" in page
    finally:
        proc.terminate()  # runpanel stops daphne and the worker itself
        proc.wait(30)
    assert proc.returncode == 0


def test_the_real_server_sends_no_server_banner(panel, browser):
    import websockets

    for path in ("/login/", "/", "/api/nodes/", "/static/panel.js"):
        status, headers, _ = browser.request("GET", path)
        assert status == 200 and "server" not in {k.lower() for k in headers}, (path, headers)

    async def handshake_headers():
        url = panel.url.replace("http://", "ws://") + "/ws/deployments/999999/log/"
        try:
            async with websockets.connect(url, additional_headers=browser.ws_headers()) as ws:
                return ws.response.headers
        except websockets.InvalidStatus as exc:
            return exc.response.headers

    assert "server" not in {k.lower() for k in asyncio.run(handshake_headers())}
