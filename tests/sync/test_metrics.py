"""/metrics: refused without the token, 404 when none is configured, an exposition Prometheus parses."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from deployments.models import Deployment
from deployments.sync import status

pytestmark = pytest.mark.django_db

TOKEN = "metrics-token-0123456789"


@pytest.fixture
def token(settings):
    settings.METRICS_TOKEN = TOKEN


def scrape(token=TOKEN):
    return Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")


def test_without_a_configured_token_metrics_do_not_exist(db, settings):
    settings.METRICS_TOKEN = ""
    assert scrape().status_code == 404
    assert scrape("").status_code == 404


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN])
def test_a_missing_or_wrong_token_is_refused(token, header):
    kwargs = {} if header is None else {"HTTP_AUTHORIZATION": header}
    r = Client().get("/metrics", **kwargs)
    assert r.status_code == 401
    assert r["WWW-Authenticate"].startswith("Bearer")
    assert b"panel_" not in r.content


def test_a_signed_in_superuser_without_the_token_is_refused_too(token, alice_client):
    assert alice_client.get("/metrics").status_code == 401


def test_the_exposition_parses_and_counts_from_the_database(token, inventory, django_assert_max_num_queries):
    node = inventory["node"]
    now = timezone.now()
    for took, st in ((3, "succeeded"), (40, "failed"), (400, "succeeded")):
        Deployment.objects.create(
            node=node, action="switch", commit_sha="a" * 40, flake_attr="devm", status=st,
            started_at=now - timedelta(seconds=took), finished_at=now,
        )  # fmt: skip
    status.record_states({node.pk: status.State("drifted")})
    with django_assert_max_num_queries(12):
        r = scrape()
    assert r.status_code == 200
    assert r["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(r.content.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("panel_deployments", (("status", "succeeded"),))] == 2
    assert samples[("panel_deployments", (("status", "failed"),))] == 1
    assert samples[("panel_deployments", (("status", "running"),))] == 0
    assert samples[("panel_nodes_sync", (("status", "drifted"),))] == 1
    assert samples[("panel_nodes_sync", (("status", "in_sync"),))] == 0
    assert samples[("panel_deployment_duration_seconds_bucket", (("le", "5.0"),))] == 1
    assert samples[("panel_deployment_duration_seconds_bucket", (("le", "60.0"),))] == 2
    assert samples[("panel_deployment_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert samples[("panel_deployment_duration_seconds_count", ())] == 3
    assert samples[("panel_deployment_duration_seconds_sum", ())] == pytest.approx(443, abs=1)
    assert samples[("panel_rollouts", (("status", "running"),))] == 0
    assert samples[("panel_queue_depth", ())] >= 0
    assert samples[("panel_scrape_queue_ok", ())] == 1
    assert ("panel_worker_processes", ()) in samples


def test_never_checked_nodes_count_as_unknown(token, inventory):
    families = {f.name: f for f in text_string_to_metric_families(scrape().content.decode())}
    unknown = [s.value for s in families["panel_nodes_sync"].samples if s.labels["status"] == "unknown"]
    assert unknown == [1]
