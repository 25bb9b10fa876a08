"""Every /api/v1/ route and method, for every persona, with a token and with the session: allowed or
refused with the status the pages give (404 unseen, 403 seen but not allowed, refusals audited).

The routes are enumerated from the URL resolver (a viewset's methods from its actions), so a new
endpoint without a rule in ``RULES`` fails ``test_every_api_route_has_a_rule`` until someone decides
who may use it.  Node routes are tried on a node inside the persona's scope (web-1) and one outside
it (db-1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from deployments.audit.models import AuditEvent
from deployments.models import Deployment
from deployments.restapi import tokens
from deployments.restapi.models import ApiToken
from tests.support.personas import ROLES
from tests.support.world import IN_SCOPE, OUT_OF_SCOPE, level

from .conftest import ApiClient

NAMESPACE = "api-v1"


def api_routes() -> list[str]:
    """``name METHOD`` of every route under the namespace (viewset routes: one per method they answer)."""
    found = []

    def walk(patterns, namespace: str) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, ":".join(filter(None, [namespace, p.namespace])))
            elif namespace == NAMESPACE:
                assert isinstance(p, URLPattern)
                actions = getattr(p.callback, "actions", None) or {"get": "get"}
                # HEAD is GET without the body: the same view, the same rule.
                found.extend(f"{p.name} {method.upper()}" for method in actions if method != "head")

    walk(get_resolver().url_patterns, "")
    return sorted(set(found))


def signed_in(ok: int):
    return lambda persona, lvl: 401 if persona == "anonymous" else ok


def anyone(ok: int):
    return lambda persona, lvl: ok


def on_node(need: int, ok: int):
    """Unseen 404, seen but below ``need`` 403, else ``ok``."""

    def expect(persona, lvl):
        if persona == "anonymous":
            return 401
        if lvl == 0:
            return 404
        return ok if lvl >= need else 403

    return expect


def deployers(ok: int):
    return lambda persona, lvl: 401 if persona == "anonymous" else ok if lvl >= 2 else 403


def auditors(persona, lvl):
    if persona == "anonymous":
        return 401
    return 200 if persona in ("auditor", "superuser") else 403


@dataclass
class Rule:
    expect: Callable[[str, int], int]
    kwargs: Callable = lambda world, target, user: {}
    data: dict | Callable = field(default_factory=dict)
    node_route: bool = False  # tried on web-1 and db-1
    denial_audited: bool = False  # a 403 leaves exactly one "denied" audit event
    token_status: int | None = None  # the answer with a token, when it differs from the session's


def _node(world, target, user):
    return {"name": target}


def _deployment(world, target, user):
    return {"pk": world.finished[target].pk}


def _active(world, target, user):
    return {"pk": world.queue(target).pk}


def _diff(world, target, user):
    """A succeeded diff of ``target`` pinned to the branch head, kept: confirming it really queues the activation."""
    from django.utils import timezone

    from deployments import repos

    diff = Deployment.objects.create(
        node=world.nodes[target],
        kind=Deployment.Kind.DIFF,
        action="switch",
        commit_sha=repos.resolve(world.repository),
        flake_attr=target,
        status=Deployment.Status.SUCCEEDED,
        toplevel="/nix/store/" + "b" * 32 + "-nixos-system",
        finished_at=timezone.now(),
    )
    return {"pk": diff.pk}


def _rollout(world, target, user):
    from deployments import rollouts

    return {"pk": rollouts.request_rollout(rollouts.Options(nodes=[target]), user=None, trigger="cli").pk}


def _approval(world, target, user):
    """A pending approval of a deploy of ``target`` asked from the command line (so any deployer of the node
    may decide it), pinned to the branch head: approving it really queues the deployment."""
    from deployments import repos
    from deployments.gitops.models import ApprovalRequest

    approval = ApprovalRequest.objects.create(
        kind="deployment",
        action="switch",
        revision="",
        commits={"flakes": repos.resolve(world.repository)},
        trigger="cli",
    )
    approval.nodes.set([world.nodes[target]])
    return {"pk": approval.pk}


def _drifted(world, target, user):
    """``target`` drifted from its branch head, so a redeploy has something to deploy."""
    from deployments import repos
    from deployments.sync.models import NodeSync

    NodeSync.objects.update_or_create(
        node=world.nodes[target], defaults={"status": "drifted", "commit_sha": repos.resolve(world.repository)}
    )
    return {"name": target}


def _check(world, target, user):
    from deployments.healthchecks import HealthCheck

    check, _ = HealthCheck.objects.get_or_create(
        node=world.nodes[target], name="port", defaults={"kind": "tcp", "port": 443}
    )
    return {"pk": check.pk}


def _subscription(world, target, user):
    """The team ops' subscription: ops holds no admin grant, so only superusers manage it."""
    from deployments.sync.models import Subscription

    sub, _ = Subscription.objects.get_or_create(
        team=world.ops, name="ops-chat", defaults={"kind": "email", "target_encrypted": "", "events": ["node.drifted"]}
    )
    return {"pk": sub.pk}


def superuser_only(ok: int):
    return lambda persona, lvl: 401 if persona == "anonymous" else ok if persona == "superuser" else 403


def subscribers(persona, lvl):
    """Subscribing team ops: superusers may; admins of their own team only (ops is not theirs: 400, as the
    page's form refuses a team that is not offered); whoever manages no team is refused (403)."""
    if persona == "anonymous":
        return 401
    if persona == "superuser":
        return 201
    return 400 if persona.startswith("admin-") else 403


def _event(world, target, user):
    return {"seq": AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[0]}


def _own_token(world, target, user):
    """A token of the persona's own (of zed's for anonymous, who has none)."""
    owner = user or world.zed
    token, _ = tokens.create_token(owner, name="to-revoke")
    return {"pk": token.pk}


RULES: dict[str, Rule] = {
    "schema GET": Rule(anyone(200)),
    "docs GET": Rule(anyone(200)),
    "node-list GET": Rule(signed_in(200)),
    "node-detail GET": Rule(on_node(1, 200), _node, node_route=True),
    "deployment-list GET": Rule(signed_in(200)),
    "deployment-list POST": Rule(
        on_node(2, 201), data=lambda target: {"node": target, "action": "switch"}, node_route=True, denial_audited=True
    ),
    "deployment-detail GET": Rule(on_node(1, 200), _deployment, node_route=True),
    "deployment-cancel POST": Rule(on_node(2, 200), _active, node_route=True, denial_audited=True),
    # A finished (not interrupted) deployment: past the gate, "nothing to reconcile" (409).
    "deployment-reconcile POST": Rule(on_node(2, 409), _deployment, node_route=True, denial_audited=True),
    "deployment-log GET": Rule(on_node(1, 200), _deployment, node_route=True),
    # Confirming a diff is a deploy: the activation is queued (201).
    "deployment-confirm POST": Rule(on_node(2, 201), _diff, node_route=True, denial_audited=True),
    "deployment-log-stream GET": Rule(on_node(1, 200), _deployment, node_route=True),
    "rollout-list GET": Rule(signed_in(200)),
    "rollout-list POST": Rule(deployers(201), data=lambda target: {"nodes": [IN_SCOPE]}, denial_audited=True),
    "rollout-detail GET": Rule(on_node(1, 200), _rollout, node_route=True),
    "rollout-cancel POST": Rule(on_node(2, 200), _rollout, node_route=True, denial_audited=True),
    "audit-event-list GET": Rule(auditors),
    "audit-event-detail GET": Rule(auditors, _event),
    "audit-event-verify GET": Rule(auditors),
    "token-list GET": Rule(signed_in(200)),
    # Tokens are made from a signed-in session, never by a token.
    "token-list POST": Rule(signed_in(201), data=lambda target: {"name": "ci"}, token_status=403),
    "token-revoke POST": Rule(signed_in(200), _own_token),
    # Sync status: refreshing and redeploying are deploys (the world's hosts do not resolve: the refresh
    # answers "unknown" quickly); the status itself is on node-detail.
    "node-sync-refresh POST": Rule(on_node(2, 200), _node, node_route=True, denial_audited=True),
    "node-sync-redeploy POST": Rule(on_node(2, 201), _drifted, node_route=True, denial_audited=True),
    # Generations: reading needs only to see the node (the read fails fast: 502 with the reason).
    "node-generations GET": Rule(on_node(1, 200), _node, node_route=True),
    "node-generations-read POST": Rule(on_node(1, 502), _node, node_route=True),
    "node-rollback POST": Rule(on_node(2, 201), _node, data={"action": "switch"}, node_route=True, denial_audited=True),
    # Where the node builds: its admins (the panel host needs no build host, so no second permission).
    "node-build-location POST": Rule(
        on_node(3, 200), _node, data={"location": "panel"}, node_route=True, denial_audited=True
    ),
    # Health checks: read by whoever sees the node; changed by its admins.
    "node-health GET": Rule(on_node(1, 200), _node, node_route=True),
    "node-health-deadline POST": Rule(
        on_node(3, 200), _node, data={"confirm_timeout": 60}, node_route=True, denial_audited=True
    ),
    "health-check-list GET": Rule(signed_in(200)),
    "health-check-list POST": Rule(
        on_node(3, 201),
        data=lambda target: {"node": target, "name": "ssh", "kind": "tcp", "port": 22},
        node_route=True,
        denial_audited=True,
    ),
    "health-check-detail GET": Rule(on_node(1, 200), _check, node_route=True),
    "health-check-detail PATCH": Rule(
        on_node(3, 200), _check, data={"port": 8443}, node_route=True, denial_audited=True
    ),
    "health-check-detail DELETE": Rule(on_node(3, 204), _check, node_route=True, denial_audited=True),
    # Approvals: seen with a node; decided by a deployer of every node of it (the requester here is the CLI).
    # Notification subscriptions: their team's admins (superusers: every team's).
    "subscription-list GET": Rule(signed_in(200)),
    "subscription-list POST": Rule(
        subscribers,
        data={"team": "ops", "name": "chat", "kind": "email", "target": "ops@example.com", "events": ["node.drifted"]},
        denial_audited=True,
    ),
    "subscription-detail GET": Rule(superuser_only(200), _subscription, denial_audited=True),
    "subscription-detail DELETE": Rule(superuser_only(204), _subscription, denial_audited=True),
    "approval-list GET": Rule(signed_in(200)),
    "approval-detail GET": Rule(on_node(1, 200), _approval, node_route=True),
    "approval-approve POST": Rule(on_node(2, 200), _approval, node_route=True, denial_audited=True),
    "approval-reject POST": Rule(
        on_node(2, 200), _approval, data={"comment": "not now"}, node_route=True, denial_audited=True
    ),
}


def test_every_api_route_has_a_rule():
    routes = api_routes()
    assert len(routes) >= len(RULES) - 1  # the walk finds the routes (not an empty namespace)
    missing = [r for r in routes if r not in RULES]
    assert not missing, f"/api/v1/ routes without a rule in the API permission matrix: {missing}"
    stale = [r for r in RULES if r not in routes]
    assert not stale, f"rules for /api/v1/ routes that no longer exist: {stale}"


def _client(world, persona: str, auth: str):
    user = world.persona(persona)
    if user is None:
        return None, ApiClient()
    if auth == "token":
        return user, ApiClient(tokens.create_token(user, name="matrix")[1])
    client = ApiClient()
    client.client.force_login(user)
    return user, client


@pytest.mark.parametrize("auth", ["token", "session"])
@pytest.mark.parametrize("persona", ROLES)
@pytest.mark.parametrize("route", sorted(RULES))
def test_api_route_answers_each_persona_as_its_rule_says(world, route, persona, auth):
    if persona == "anonymous" and auth == "token":
        pytest.skip("anonymous has no token (the session run asks without any)")
    rule = RULES[route]
    name, method = route.split(" ")
    user, client = _client(world, persona, auth)
    for target in (IN_SCOPE, OUT_OF_SCOPE) if rule.node_route else (IN_SCOPE,):
        url = reverse(f"{NAMESPACE}:{name}", kwargs=rule.kwargs(world, target, user))
        expected = rule.expect(persona, level(persona, target))
        if auth == "token" and rule.token_status is not None and persona != "anonymous":
            expected = rule.token_status
        denials_before = AuditEvent.objects.filter(outcome="denied").count()
        deployments_before = Deployment.objects.count()
        data = rule.data(target) if callable(rule.data) else rule.data
        if method == "GET":
            response = client.get(url)
        elif method == "POST":
            response = client.post(url, data)
        else:
            response = client.send(method, url, data or None)
        where = f"{persona} ({auth}) {method} {url}"
        assert response.status_code == expected, f"{where}: {response.status_code}, expected {expected}"
        if 400 <= response.status_code or response.status_code == 202:
            assert response.json()["error"], f"{where}: no error message"
        if response.status_code == 403 and rule.denial_audited:
            assert AuditEvent.objects.filter(outcome="denied").count() == denials_before + 1, (
                f"{where}: the refusal was not audited once"
            )
        if route == "deployment-list POST" and response.status_code == 201:
            assert Deployment.objects.count() == deployments_before + 1, f"{where}: nothing queued"
            assert Deployment.objects.get(pk=response.json()["id"]).node.name == target
        if route in ("node-rollback POST", "node-sync-redeploy POST") and response.status_code == 201:
            assert Deployment.objects.count() == deployments_before + 1, f"{where}: nothing queued"
        if route == "approval-approve POST" and response.status_code == 200:
            assert response.json()["approval"]["status"] == "approved"
            assert Deployment.objects.get(pk=response.json()["deployment"]["id"]).node.name == target
        if route == "health-check-detail DELETE" and response.status_code == 204:
            from deployments.healthchecks import HealthCheck

            assert not HealthCheck.objects.filter(node__name=target, name="port").exists(), f"{where}: not deleted"
        if route == "deployment-confirm POST":
            confirmed = Deployment.objects.filter(diff_of_id=url.rstrip("/").split("/")[-2])
            assert confirmed.exists() == (response.status_code == 201), f"{where}: {confirmed.count()} activations"
            if response.status_code == 201:
                assert confirmed.get().pk == response.json()["id"] and confirmed.get().kind == "activate"
        if route == "node-build-location POST" and response.status_code == 200:
            assert response.json()["build_location"] == {
                "location": "panel",
                "source": "node",
                "build_host": None,
                "node_setting": "panel",
            }, where
            world.nodes[target].refresh_from_db()
            assert world.nodes[target].build_location == "panel", f"{where}: not set"
        if route == "token-revoke POST" and response.status_code == 200:
            assert ApiToken.objects.get(pk=response.json()["id"]).revoked_at is not None
