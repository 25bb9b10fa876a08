"""The fleet view on the dashboard: what each node runs (commit, generation, when, by whom) and its last
outcome, filterable by tag and outcome, in a constant number of queries (bench/fleet_bench.py times it
with 10,000 nodes)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from deployments.models import Deployment
from tests.support.fleet import make_fleet

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(repository):
    return make_fleet(repository)


def deployment(node, status, *, action="switch", commit="a" * 40, generation=None, by="alice", ago=0):
    at = timezone.now() - timedelta(minutes=ago)
    return Deployment.objects.create(
        node=node,
        action=action,
        commit_sha=commit,
        flake_attr="devm",
        status=status,
        generation_after=generation,
        requested_by_name=by,
        created_at=at,
        started_at=at,
        finished_at=at if status in Deployment.TERMINAL else None,
        exit_code=0 if status == "succeeded" else 4 if status == "failed" else None,
    )


def rows(client, query=""):
    response = client.get("/" + query)
    assert response.status_code == 200
    return {n.name: n for n in response.context["nodes"]}, response.content.decode()


def test_each_node_shows_what_it_runs_and_its_last_outcome(alice_client, fleet):
    web1 = fleet["web-01"]
    deployment(web1, "succeeded", commit="1" * 40, generation=4, by="bob", ago=30)
    deployment(web1, "succeeded", action="test", commit="2" * 40, generation=5, by="carol", ago=20)
    deployment(web1, "succeeded", action="boot", commit="3" * 40, generation=6, ago=15)  # not running until reboot
    deployment(web1, "succeeded", action="dry-activate", commit="4" * 40, ago=12)
    deployment(web1, "failed", commit="5" * 40, ago=10)
    nodes, page = rows(alice_client)
    n = nodes["web-01"]
    assert (n.run_commit, n.run_generation, n.run_by) == ("2" * 40, 5, "carol")
    assert (n.last_status, n.last_action, n.last_exit_code) == ("failed", "switch", 4)
    assert "2222222222" in page and "gen 5" in page and "exit 4" in page
    assert nodes["web-02"].run_id is None and nodes["web-02"].last_id is None
    assert "never deployed" in page


def test_a_system_kept_after_a_failing_health_check_is_what_the_node_runs(alice_client, fleet):
    """``unhealthy`` (policy keep): the node runs what that deployment built, as sync status says; a
    ``rolled_back`` one left the node on the system before it."""
    web1 = fleet["web-01"]
    deployment(web1, "succeeded", commit="1" * 40, generation=4, ago=30)
    deployment(web1, "unhealthy", commit="2" * 40, generation=5, ago=20)
    deployment(web1, "rolled_back", commit="3" * 40, generation=6, ago=10)
    n = rows(alice_client)[0]["web-01"]
    assert (n.run_commit, n.run_generation) == ("2" * 40, 5)
    assert n.last_status == "rolled_back"


def test_the_fleet_filters_by_tag_and_by_last_outcome(alice_client, fleet):
    deployment(fleet["web-01"], "failed")
    deployment(fleet["db-01"], "failed")
    deployment(fleet["db-02"], "succeeded")
    assert set(rows(alice_client, "?tag=db")[0]) == {"db-01", "db-02", "db-03", "db-04"}
    assert set(rows(alice_client, "?outcome=failed")[0]) == {"web-01", "db-01"}
    assert set(rows(alice_client, "?tag=db&outcome=failed")[0]) == {"db-01"}
    assert set(rows(alice_client, "?tag=db&outcome=never")[0]) == {"db-03", "db-04"}
    assert alice_client.get("/?outcome=exploded").status_code == 400


def test_the_fleet_page_costs_the_same_queries_however_many_deployments(alice_client, fleet):
    def count():
        with CaptureQueriesContext(connection) as queries:
            rows(alice_client)
        return len(queries)

    before = count()
    for i, node in enumerate(fleet.values()):
        for k in range(3):
            deployment(node, "succeeded" if k % 2 else "failed", generation=i, ago=10 - k)
    assert count() == before
