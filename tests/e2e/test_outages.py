"""A database, Redis or daphne blip mid-deploy breaks nothing: PostgreSQL (a private one) stopped for 5 s or
60 s, Redis (a private one) restarted, or daphne killed, while a followed deploy prints its log; the deployment
still succeeds, the stored log is complete, followers get every line once (across a reconnect too), and
nothing stays running."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.support.panel import Browser, Panel, read_log
from tests.support.processes import matching
from tests.support.services import PrivatePostgres, PrivateRedis
from tests.support.testbed import NodeConfigSpec, make_flake_repo
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

PACED_LINES = 1500  # at 100 lines/s: 15 s of activation output


@pytest.fixture(scope="module")
def outage_panel(tmp_path_factory, testbed):
    repo = tmp_path_factory.mktemp("outage-fleet") / "flake"
    make_flake_repo(repo, {"paced": NodeConfigSpec(extra_lines=PACED_LINES, lines_per_second=100)})
    with PrivatePostgres() as pg, PrivateRedis() as redis:
        panel = Panel(tmp_path_factory.mktemp("outage-panel"), database_url=pg.url, redis_url=redis.url)
        node = testbed.add_node(f"e2e-outage-{testbed.token}")
        try:
            panel.register_nodes([("paced", "paced", node)], repo_path=repo)
            panel.start()
            yield panel, pg, node, redis
        finally:
            panel.stop()


@pytest.mark.parametrize("outage", [5, 60])
def test_postgres_stopped_mid_deploy_loses_nothing(outage_panel, outage):
    panel, pg, node, _ = outage_panel
    browser = Browser(panel)
    browser.login()
    pk = browser.deploy("paced")
    followed: dict = {}
    follower = threading.Thread(target=lambda: followed.update(asyncio.run(read_log(panel, browser, pk, timeout=180))))
    follower.start()
    # Let the activation print for a few seconds, then take the database away under it.
    time.sleep(5)
    pg.stop("fast")
    time.sleep(outage)
    pg.start()
    follower.join(200)
    assert followed.get("ended"), f"the follower did not see the end: {followed.get('close_code')}\n{panel.logs()}"

    seqs = [line[0] for line in followed["lines"]]
    assert seqs == list(range(len(seqs))), "every line once, in order, through the outage"
    paced = [line[2] for line in followed["lines"] if " paced line " in line[2]]
    assert [int(t.split(" paced line ")[1][:8]) for t in paced] == list(range(1, PACED_LINES + 1))
    assert followed["statuses"][-1]["status"] == "succeeded", followed["statuses"][-1]
    assert followed["statuses"][-1]["log_gaps"] == []

    # The stored log (a late reader replays it from the database) is the same, complete.
    late = asyncio.run(read_log(panel, browser, pk, timeout=60))
    assert late["lines"] == followed["lines"]
    # The node finished its activation; nothing of the deployment is left running.
    final = followed["statuses"][-1]
    assert final["generation_after"] is not None and node.current_system() == final["system_after"]
    _, _, body = browser.request("GET", f"/api/deployments/{pk}/")
    assert b'"status": "succeeded"' in body
    wait_for(
        lambda: not matching(node.processes(), "nixos-rebuild"), timeout=30, what="nothing of the run left on the node"
    )


def test_a_redis_restart_mid_deploy_loses_nothing_and_reconnects_are_served(outage_panel):
    panel, _, node, redis = outage_panel
    browser = Browser(panel)
    browser.login()
    pk = browser.deploy("paced")
    followed: dict = {}
    follower = threading.Thread(target=lambda: followed.update(asyncio.run(read_log(panel, browser, pk, timeout=180))))
    follower.start()
    first = asyncio.run(read_log(panel, browser, pk, stop_after_lines=200, timeout=60))
    redis.stop()
    time.sleep(2)
    redis.start()
    # A viewer reconnecting right after Redis is back is served (no HTTP 500) and resumes where it was.
    rest = asyncio.run(read_log(panel, browser, pk, after=first["lines"][-1][0], timeout=180))
    follower.join(200)
    assert rest["close_code"] is None and rest["ended"], (rest["close_code"], panel.logs())
    seqs = [line[0] for line in first["lines"] + rest["lines"]]
    assert seqs == list(range(len(seqs)))
    assert followed.get("ended") and followed["lines"] == first["lines"] + rest["lines"]
    assert followed["statuses"][-1]["status"] == "succeeded"
    assert sum(" paced line " in line[2] for line in followed["lines"]) == PACED_LINES


def test_daphne_killed_mid_deploy_followers_resume_on_the_new_one_with_every_line_once(outage_panel):
    panel, _, _, _ = outage_panel
    browser = Browser(panel)
    browser.login()
    pk = browser.deploy("paced")
    first = asyncio.run(read_log(panel, browser, pk, stop_after_lines=300, timeout=60))
    panel.kill("daphne")  # SIGKILL: the sockets drop, the deployment goes on in the worker
    panel.start(daphne=True, worker=False)
    rest = asyncio.run(read_log(panel, browser, pk, after=first["lines"][-1][0], timeout=180))
    assert rest["ended"], (rest["close_code"], panel.logs())
    lines = first["lines"] + rest["lines"]
    assert [line[0] for line in lines] == list(range(len(lines)))
    assert sum(" paced line " in line[2] for line in lines) == PACED_LINES
    assert rest["statuses"][-1]["status"] == "succeeded"
