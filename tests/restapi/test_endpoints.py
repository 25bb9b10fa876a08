"""The REST API's endpoints past the gate: what they answer, filters and pages, malformed input refused
with field errors, and the state changes they reach (the same functions the pages call)."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from deployments.audit.models import AuditEvent
from deployments.models import Deployment, LogChunk, Rollout
from deployments.restapi import logsse
from tests.support import personas
from tests.support.world import COMMIT, IN_SCOPE, OUT_OF_SCOPE

from .conftest import ApiClient, token_for


@pytest.fixture
def admin_api(world):
    """The superuser's token client."""
    return ApiClient(token_for(world.persona("superuser")))


def url(route, **kwargs):
    return reverse(f"api-v1:{route}", kwargs=kwargs)


# --- nodes -----------------------------------------------------------------------------------------


def test_nodes_list_filters_by_tag_and_search_and_pages(admin_api):
    assert [n["name"] for n in admin_api.get(url("node-list")).json()["results"]] == ["db-1", "web-1"]
    assert [n["name"] for n in admin_api.get(url("node-list"), tag="web").json()["results"]] == ["web-1"]
    assert [n["name"] for n in admin_api.get(url("node-list"), q="db").json()["results"]] == ["db-1"]
    first = admin_api.get(url("node-list"), limit=1).json()
    assert [n["name"] for n in first["results"]] == ["db-1"] and first["next"]
    second = admin_api.client.get(first["next"], **admin_api.headers).json()
    assert [n["name"] for n in second["results"]] == ["web-1"] and second["next"] is None


@pytest.mark.parametrize("params", [{"tag": "web;reboot"}, {"tag": "$(id)"}, {"q": "a\x00b"}, {"q": "x" * 300}])
def test_nodes_list_refuses_a_bad_filter_with_400(admin_api, params):
    response = admin_api.get(url("node-list"), **params)
    assert response.status_code == 400
    assert set(response.json()["fields"]) == set(params)


def test_node_detail_says_what_it_runs_and_what_the_caller_may_do(world):
    api = ApiClient(token_for(world.persona("deployer-node")))
    node = api.get(url("node-detail", name=IN_SCOPE)).json()
    finished = world.finished[IN_SCOPE]
    assert node["running"]["deployment"] == finished.pk and node["running"]["commit_sha"] == COMMIT
    assert node["last"] == {
        "deployment": finished.pk,
        "status": "succeeded",
        "action": "switch",
        "exit_code": None,
        "at": node["last"]["at"],
    }
    assert node["tags"] == ["web"] and node["can_deploy"] is True and node["can_admin"] is False


# --- deployments ---------------------------------------------------------------------------------


def test_deploy_queues_through_lifecycle_with_action_revision_and_timeout(world, admin_api):
    response = admin_api.post(
        url("deployment-list"), {"node": IN_SCOPE, "action": "boot", "revision": "main", "timeout": 600}
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    deployment = Deployment.objects.get(pk=body["id"])
    assert (deployment.action, deployment.requested_revision, deployment.timeout_seconds) == ("boot", "main", 600)
    assert deployment.trigger == "api" and deployment.status == "queued" and body["node"] == IN_SCOPE
    event = AuditEvent.objects.filter(action="deployment.requested", object_id=str(deployment.pk)).get()
    assert event.actor_name == "alice" and event.details["trigger"] == "api"
    # The node is busy now.
    again = admin_api.post(url("deployment-list"), {"node": IN_SCOPE})
    assert again.status_code == 409 and "in progress" in again.json()["error"]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"node": IN_SCOPE, "revision": "main;reboot"}, "revision"),
        ({"node": IN_SCOPE, "revision": "$(reboot)"}, "revision"),
        ({"node": IN_SCOPE, "revision": "`id`"}, "revision"),
        ({"node": IN_SCOPE, "action": "explode"}, "action"),
        ({"node": IN_SCOPE, "timeout": 0}, "timeout"),
        ({"node": IN_SCOPE, "timeout": "soon"}, "timeout"),
        ({"node": IN_SCOPE, "revison": "main"}, "revison"),
        ({"node": "web-1;reboot"}, "node"),
        ({"node": 5}, "node"),
        ({}, "node"),
    ],
)
def test_deploy_refuses_malformed_input_with_field_errors(world, admin_api, data, field):
    response = admin_api.post(url("deployment-list"), data)
    assert response.status_code == 400, response.json()
    assert response.json()["error"] == "invalid input" and field in response.json()["fields"]
    assert not Deployment.objects.filter(status="queued").exists()


@pytest.mark.parametrize(
    "content_type, body, status",
    [
        ("application/json", b"not json", 400),
        ("application/json", b'{"node": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
        ("application/json", b'{"node": "' + b"x" * 20_000 + b'"}', 413),
        ("application/json", b"\xff\xfe", 400),
        ("application/json", b'["web-1"]', 400),
        ("text/plain", b'{"node": "web-1"}', 415),
        ("application/x-www-form-urlencoded", b"node=web-1", 415),
    ],
)
def test_a_body_that_is_not_a_small_json_object_is_refused(world, admin_api, content_type, body, status):
    response = admin_api.post(url("deployment-list"), raw=body, content_type=content_type)
    assert response.status_code == status
    assert response.json()["error"]
    assert not Deployment.objects.filter(status="queued").exists()


def test_a_deployer_of_one_node_cannot_deploy_another_it_sees(world):
    """A viewer of every node who deploys web-1 only: db-1 is refused (403, audited), alone or in a rollout."""
    user = world.persona("deployer-node")
    personas.grant(user, "viewer")  # sees every node now
    api = ApiClient(token_for(user))
    response = api.post(url("deployment-list"), {"node": OUT_OF_SCOPE})
    assert response.status_code == 403 and OUT_OF_SCOPE in response.json()["error"]
    denied = AuditEvent.objects.filter(action="deployment.requested", outcome="denied").get()
    assert denied.actor_name == user.username and denied.node_name == OUT_OF_SCOPE
    response = api.post(url("rollout-list"), {"nodes": [IN_SCOPE, OUT_OF_SCOPE]})
    assert response.status_code == 403 and OUT_OF_SCOPE in response.json()["error"]
    response = api.post(url("deployment-cancel", pk=world.queue(OUT_OF_SCOPE).pk))
    assert response.status_code == 403
    assert not Deployment.objects.filter(node__name=OUT_OF_SCOPE, requested_by=user).exists()
    assert not Rollout.objects.exists()


def test_deployments_list_filters_by_node_and_status_and_pages(world, admin_api):
    active = world.queue(OUT_OF_SCOPE)
    everything = admin_api.get(url("deployment-list")).json()["results"]
    assert [d["id"] for d in everything] == sorted([active.pk, *(d.pk for d in world.finished.values())], reverse=True)
    by_node = admin_api.get(url("deployment-list"), node=OUT_OF_SCOPE).json()["results"]
    assert {d["id"] for d in by_node} == {active.pk, world.finished[OUT_OF_SCOPE].pk}
    queued = admin_api.get(url("deployment-list"), status="queued").json()["results"]
    assert [d["id"] for d in queued] == [active.pk]
    page = admin_api.get(url("deployment-list"), limit=2).json()
    assert len(page["results"]) == 2 and page["next"]
    assert admin_api.get(url("deployment-list"), status="exploded").json()["fields"]["status"]
    assert admin_api.get(url("deployment-list"), node="a b").status_code == 400


def test_cancel_a_queued_deployment_then_it_is_a_conflict(world, admin_api):
    active = world.queue(IN_SCOPE)
    response = admin_api.post(url("deployment-cancel", pk=active.pk))
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    again = admin_api.post(url("deployment-cancel", pk=active.pk))
    assert again.status_code == 409 and "already finished" in again.json()["error"]
    assert admin_api.post(url("deployment-cancel", pk=active.pk), {"why": "x"}).status_code == 400


def test_reconcile_of_a_finished_deployment_is_a_conflict(world, admin_api):
    response = admin_api.post(url("deployment-reconcile", pk=world.finished[IN_SCOPE].pk))
    assert response.status_code == 409 and "only an interrupted deployment" in response.json()["error"]


def test_reconcile_of_an_interrupted_deployment_that_never_reached_its_node_says_so(world, admin_api):
    deployment = world.queue(IN_SCOPE)
    Deployment.objects.filter(pk=deployment.pk).update(status="interrupted")
    response = admin_api.post(url("deployment-reconcile", pk=deployment.pk))
    assert response.status_code == 409 and "never reached the node" in response.json()["error"]


def test_a_revision_the_repository_does_not_have_is_400_with_the_reason(world, admin_api):
    response = admin_api.post(url("deployment-list"), {"node": IN_SCOPE, "revision": "no-such-branch"})
    assert response.status_code == 400 and "no-such-branch" in response.json()["error"]
    assert not Deployment.objects.filter(status="queued").exists()


def test_an_id_that_is_not_a_number_is_not_found(admin_api, world):
    assert admin_api.get("/api/v1/deployments/1x/").status_code == 404
    assert admin_api.get("/api/v1/deployments/99999/").status_code == 404


# --- logs ----------------------------------------------------------------------------------------


def _log(deployment, n: int) -> None:
    """``n`` stored lines (alternately stdout and stderr) in chunks of 3, as the log writer stores them."""
    for start in range(0, n, 3):
        end = min(start + 3, n)
        data = "\n".join(f"{'oe'[i % 2]}line {i}" for i in range(start, end))
        LogChunk.objects.create(deployment=deployment, seq_start=start, seq_end=end, data=data)


def test_the_log_is_paged_by_seq(world, admin_api):
    deployment = world.finished[IN_SCOPE]
    _log(deployment, 10)
    first = admin_api.get(url("deployment-log", pk=deployment.pk), limit=4).json()
    assert [line["seq"] for line in first["lines"]] == [0, 1, 2, 3]
    assert first["lines"][1] == {"seq": 1, "stream": "e", "text": "line 1"}
    assert first["more"] is True and first["finished"] is False and first["next_after"] == 3
    rest = admin_api.get(url("deployment-log", pk=deployment.pk), after=3, limit=100).json()
    assert [line["seq"] for line in rest["lines"]] == list(range(4, 10))
    assert rest["more"] is False and rest["finished"] is True and rest["status"] == "succeeded"
    for bad in ({"after": "x"}, {"limit": 0}, {"limit": 5001}, {"after": -2}):
        response = admin_api.get(url("deployment-log", pk=deployment.pk), **bad)
        assert response.status_code == 400 and set(response.json()["fields"]) == set(bad)


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_the_stream_of_a_finished_deployment_sends_every_line_then_end(world, admin_api):
    deployment = world.finished[IN_SCOPE]
    _log(deployment, 7)
    response = admin_api.get(url("deployment-log-stream", pk=deployment.pk), after=2)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/event-stream")
    events = _events(b"".join(response.streaming_content).decode())
    assert [e[1]["seq"] for e in events[:-1]] == [3, 4, 5, 6]
    assert events[-1] == ("end", {"status": "succeeded", "next_after": 6})


def test_the_stream_follows_new_lines_until_the_deployment_ends(world, admin_api, monkeypatch):
    monkeypatch.setattr(logsse, "POLL", 0.01)
    deployment = world.queue(IN_SCOPE)
    Deployment.objects.filter(pk=deployment.pk).update(status="running")
    _log(deployment, 2)
    response = admin_api.get(url("deployment-log-stream", pk=deployment.pk))
    chunks = iter(response.streaming_content)
    assert [e[1]["seq"] for e in _events(next(chunks).decode())] == [0, 1]
    LogChunk.objects.create(deployment=deployment, seq_start=2, seq_end=3, data="olate line")
    Deployment.objects.filter(pk=deployment.pk).update(status="failed")
    rest = _events(b"".join(chunks).decode())
    assert rest == [
        ("line", {"seq": 2, "stream": "o", "text": "late line"}),
        ("end", {"status": "failed", "next_after": 2}),
    ]


def test_the_stream_ends_when_the_token_is_revoked_or_the_grant_is_lost(world, monkeypatch):
    from deployments.access.models import Grant
    from deployments.restapi.models import ApiToken

    monkeypatch.setattr(logsse, "POLL", 0.01)
    monkeypatch.setattr(logsse, "RECHECK", 0.0)
    viewer = world.persona("viewer-node")
    deployment = world.queue(IN_SCOPE)
    for lose in (
        lambda: ApiToken.objects.update(revoked_at="2020-01-01T00:00Z"),
        lambda: Grant.objects.filter(team__members=viewer).delete(),
    ):
        ApiToken.objects.filter(user=viewer).delete()
        api = ApiClient(token_for(viewer))
        chunks = iter(api.get(url("deployment-log-stream", pk=deployment.pk)).streaming_content)
        lose()
        events = _events(b"".join(chunks).decode())
        assert events[-1][0] == "error", events
        assert "revoked" in events[-1][1]["error"] or "no longer see" in events[-1][1]["error"]


def test_the_stream_of_an_unseen_deployment_is_a_json_404_even_asking_for_events(world):
    api = ApiClient(token_for(world.persona("viewer-node")))
    response = api.client.get(
        url("deployment-log-stream", pk=world.finished[OUT_OF_SCOPE].pk), HTTP_ACCEPT="text/event-stream", **api.headers
    )
    assert response.status_code == 404 and response.json() == {"error": "No such deployment"}


# --- rollouts --------------------------------------------------------------------------------------


def test_a_rollout_is_requested_shown_and_cancelled(world, admin_api):
    response = admin_api.post(url("rollout-list"), {"tags": ["web", "db-main"], "parallelism": 1, "canary": 1})
    assert response.status_code == 201, response.json()
    body = response.json()
    rollout = Rollout.objects.get(pk=body["id"])
    assert rollout.parallelism == 1 and rollout.canary_count == 1 and rollout.node_count == 2
    assert body["counts"]["queued"] == 2 and {r["node"] for r in body["nodes"]} == {IN_SCOPE, OUT_OF_SCOPE}
    detail = admin_api.get(url("rollout-detail", pk=rollout.pk)).json()
    assert detail["id"] == rollout.pk and len(detail["nodes"]) == 2
    assert [r["id"] for r in admin_api.get(url("rollout-list")).json()["results"]] == [rollout.pk]
    cancelled = admin_api.post(url("rollout-cancel", pk=rollout.pk))
    assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelling", "cancelled")
    assert admin_api.post(url("rollout-cancel", pk=rollout.pk)).status_code == 409


def test_a_viewer_of_one_node_sees_only_that_nodes_row_of_a_rollout(world, admin_api):
    rollout_id = admin_api.post(url("rollout-list"), {"tags": ["web", "db-main"]}).json()["id"]
    api = ApiClient(token_for(world.persona("viewer-node")))
    detail = api.get(url("rollout-detail", pk=rollout_id)).json()
    assert [r["node"] for r in detail["nodes"]] == [IN_SCOPE] and detail["node_count"] == 2


@pytest.mark.parametrize(
    "data, field",
    [
        ({"nodes": ["web-1"], "parallelism": "ten"}, "parallelism"),
        ({"nodes": ["web-1"], "parallelism": 0}, "parallelism"),
        ({"nodes": "web-1"}, "nodes"),
        ({"nodes": ["web-1;reboot"]}, "nodes.0"),
        ({"tags": ["web", "$(id)"]}, "tags.1"),
        ({"nodes": ["web-1"], "action": "explode"}, "action"),
        ({"nodes": ["web-1"], "revision": "a b"}, "revision"),
        ({"nodes": ["web-1"], "node_timeouts": {"web-1": "x"}}, "node_timeouts.web-1"),
        ({"nodes": ["web-1"], "everything": True}, "everything"),
    ],
)
def test_a_malformed_rollout_is_refused_with_field_errors(world, admin_api, data, field):
    response = admin_api.post(url("rollout-list"), data)
    assert response.status_code == 400, response.json()
    assert field in response.json()["fields"], response.json()
    assert not Rollout.objects.exists()


def test_a_rollout_the_options_refuse_is_400_with_the_reason(world, admin_api):
    response = admin_api.post(url("rollout-list"), {"all": True})
    assert response.status_code == 400 and "confirm" in response.json()["error"].lower()
    assert not Rollout.objects.exists()


# --- the audit trail ---------------------------------------------------------------------------------


def test_auditors_search_the_trail_with_the_pages_filters_and_pages(world, admin_api):
    admin_api.post(url("deployment-list"), {"node": IN_SCOPE})
    api = ApiClient(token_for(world.persona("auditor")))
    found = api.get(url("audit-event-list"), action="deployment.*", node=IN_SCOPE).json()
    assert [e["event"] for e in found["results"]] == ["deployment.requested"]
    assert found["results"][0]["actor_name"] == "alice" and found["next_before"] is None
    everything = AuditEvent.objects.count()
    page = api.get(url("audit-event-list"), limit=2).json()
    assert len(page["results"]) == 2 and page["results"][0]["seq"] > page["results"][1]["seq"]
    older = api.get(url("audit-event-list"), before=page["next_before"], limit=500).json()
    assert (
        len(page["results"]) + len(older["results"])
        == AuditEvent.objects.filter(seq__lt=page["results"][0]["seq"] + 1).count()
    )
    assert everything >= len(older["results"])
    bad = api.get(url("audit-event-list"), outcome="maybe", since="yesterday")
    assert bad.status_code == 400 and set(bad.json()["fields"]) == {"outcome", "since"}


def test_a_page_of_audit_events_costs_a_constant_number_of_queries(world, django_assert_max_num_queries):
    api = ApiClient(token_for(world.persona("auditor")))
    api.get(url("node-list"))  # the token's use is recorded: later requests only read
    for _ in range(10):
        api.post(url("deployment-list"), {"node": OUT_OF_SCOPE})  # refused: one event each
    assert AuditEvent.objects.count() > 10
    with django_assert_max_num_queries(3):  # the token and its user, the page (no query per event)
        page = api.get(url("audit-event-list"), limit=500).json()
    assert len(page["results"]) == AuditEvent.objects.count()


def test_lists_cost_a_constant_number_of_queries(world, admin_api, django_assert_max_num_queries):
    admin_api.get(url("node-list"))  # the token's use is recorded: later requests only read
    # The token and its user; the page; what each node runs and the buttons (one query); their tags.
    with django_assert_max_num_queries(4):
        assert len(admin_api.get(url("node-list")).json()["results"]) == 2
    with django_assert_max_num_queries(2):
        assert len(admin_api.get(url("deployment-list")).json()["results"]) == 2


def test_the_gate_answers_before_the_input_is_judged(world):
    """Who may not deploy the node learns nothing from how their input would have been judged."""
    bad = {"node": IN_SCOPE, "action": "explode", "revision": "a;b", "timeout": -1}
    for persona, status in (("viewer-node", 403), ("viewer-tag", 403), ("nobody", 404), ("auditor", 403)):
        api = ApiClient(token_for(world.persona(persona)))
        denied = AuditEvent.objects.filter(outcome="denied").count()
        assert api.post(url("deployment-list"), bad).status_code == status, persona
        assert AuditEvent.objects.filter(outcome="denied").count() == denied + (status == 403)
        rollout = api.post(url("rollout-list"), {"nodes": "web-1;reboot", "parallelism": "many"})
        assert rollout.status_code == 403, persona
        cancel = api.post(url("deployment-cancel", pk=world.finished[IN_SCOPE].pk), {"unexpected": True})
        assert cancel.status_code == status, persona
    assert not Deployment.objects.filter(status="queued").exists()


def test_an_audit_event_shows_its_details_with_url_secrets_redacted(world):
    from django.db import transaction

    from deployments.audit.writer import record

    with transaction.atomic():
        event = record("repository.changed", actor_kind="system", details={"url": "https://user:hunter2@git.example/x"})
    api = ApiClient(token_for(world.persona("auditor")))
    body = api.get(url("audit-event-detail", seq=event.seq)).json()
    assert body["event"] == "repository.changed" and "hunter2" not in json.dumps(body)
    assert api.get(url("audit-event-detail", seq=event.seq + 1000)).status_code == 404


def test_audit_verify_reports_the_chain_since_the_last_checkpoint(world, settings, tmp_path):
    from deployments.audit import checkpoint

    settings.AUDIT_SIGNING_KEY_FILE = str(tmp_path / "keys" / "audit-signing.key")
    settings.AUDIT_CHECKPOINT_DIR = str(tmp_path / "checkpoints")
    settings.AUDIT_PUBLIC_KEY = ""
    checkpoint.signing_key(create=True)
    api = ApiClient(token_for(world.persona("auditor")))
    whole = api.get(url("audit-event-verify")).json()
    assert whole["ok"] is True and whole["since_checkpoint"] is None
    assert whole["last_seq"] == AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[0]
    checkpoint.write_checkpoint(force=True)
    since = api.get(url("audit-event-verify")).json()
    assert since["ok"] is True and since["since_checkpoint"] and since["checked_events"] < whole["checked_events"]


# --- session authentication --------------------------------------------------------------------------


def test_a_session_post_needs_the_csrf_token(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.persona("superuser"))
    client.get("/login/")  # sets the CSRF cookie, as a page would
    body = json.dumps({"node": IN_SCOPE})
    refused = client.post(url("deployment-list"), body, content_type="application/json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    assert not Deployment.objects.filter(status="queued").exists()
    csrf = client.cookies["csrftoken"].value
    accepted = client.post(url("deployment-list"), body, content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert accepted.status_code == 201
    # A token needs no CSRF token: no browser sends it by itself.
    token = token_for(world.persona("superuser"))
    other = Client(enforce_csrf_checks=True)
    answer = other.post(
        url("rollout-list"),
        json.dumps({"nodes": [OUT_OF_SCOPE]}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert answer.status_code == 201


def test_anonymous_gets_401_with_a_bearer_challenge(db):
    response = Client().get(url("node-list"))
    assert response.status_code == 401 and response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json() == {"error": "Authentication credentials were not provided."}
