"""Every URL and WebSocket route of the project, for every persona: allowed or denied, with the right status.

The routes are enumerated from the URL resolver and the WebSocket routing, so a
new view without a rule in ``RULES`` fails here until someone decides who may
use it.  Node routes are tried on a node inside the persona's scope (web-1)
and one outside it (db-1): unseen answers 404, seen but not allowed 403.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from deployments.audit.models import AuditEvent
from deployments.models import Deployment, Node
from deployments.routing import websocket_urlpatterns
from tests.support.personas import ROLES
from tests.support.world import IN_SCOPE, OUT_OF_SCOPE, World, level

# Whole namespaces covered by one rule each.
NAMESPACE_RULES = ("admin", "audit", "api-v1")


def url_pattern_names() -> list[str]:
    """``namespace:name`` of every URL pattern of the project (``admin:*`` for the whole admin)."""
    names = []

    def walk(patterns, namespace: str) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, ":".join(filter(None, [namespace, p.namespace])))
            elif namespace.split(":")[0] in NAMESPACE_RULES:
                names.append(namespace.split(":")[0] + ":*")
            else:
                assert isinstance(p, URLPattern)
                names.append(f"{namespace}:{p.name or p.pattern}" if namespace else str(p.name or p.pattern))

    walk(get_resolver().url_patterns, "")
    return sorted(set(names) | {f"{ns}:*" for ns in NAMESPACE_RULES})


def websocket_route_names() -> list[str]:
    return sorted(f"ws:{p.name or p.pattern}" for p in websocket_urlpatterns)


# --- expectations --------------------------------------------------------------


def signed_in(ok: int, *, api: bool = False):
    """Any signed-in user; lists inside are filtered, not refused."""
    return lambda persona, lvl: (401 if api else 302) if persona == "anonymous" else ok


def superuser_only(ok: int):
    return lambda persona, lvl: 302 if persona == "anonymous" else ok if persona == "superuser" else 403


def on_node(need: int, ok: int, *, api: bool = False):
    """A node route: unseen 404, seen but below ``need`` 403, else ``ok``."""

    def expect(persona, lvl):
        if persona == "anonymous":
            return 401 if api else 302
        if lvl == 0:
            return 404
        return ok if lvl >= need else 403

    return expect


def anyone(ok: int):
    return lambda persona, lvl: ok


def auditors(persona, lvl):
    if persona == "anonymous":
        return 302
    return 200 if persona in ("auditor", "superuser") else {403, 404}


def staff_superusers(persona, lvl):
    # Django's admin sends everyone else to its own login page.
    return 200 if persona == "superuser" else 302


@dataclass
class Rule:
    method: str
    expect: Callable[[str, int], int | set[int]]
    kwargs: Callable = lambda world, target: {}
    data: dict = field(default_factory=dict)
    node_route: bool = False  # tried on web-1 and db-1
    api: bool = False
    denial_audited: bool = False  # a 403 leaves a "denied" audit event
    urls: Callable | None = None  # for namespace rules: the URLs to try


def _deployment(world, target):
    return {"pk": world.finished[target].pk}


def _active(world, target):
    return {"pk": world.queue(target).pk}


def _node(world, target):
    return {"name": target}


def _rollout(world, target):
    """An unfinished rollout of the one node ``target`` (nothing is handed to a worker in these tests)."""
    from deployments import rollouts

    rollout = rollouts.request_rollout(rollouts.Options(nodes=[target]), user=None, trigger="cli")
    return {"pk": rollout.pk}


def _approval(world, target):
    """A pending approval request for a deploy of ``target`` (asked from the command line, so any deployer
    of the node may decide), pinned to a named revision."""
    from deployments.gitops.models import ApprovalRequest
    from tests.support.world import COMMIT

    approval = ApprovalRequest.objects.create(
        kind="deployment", action="switch", revision="main", commits={"flakes": COMMIT}, trigger="cli"
    )
    approval.nodes.set([world.nodes[target]])
    return {"pk": approval.pk}


def _node_check(world, target):
    from deployments.healthchecks import HealthCheck

    check, _ = HealthCheck.objects.get_or_create(
        node=world.nodes[target], name="port", defaults={"kind": "tcp", "port": 443}
    )
    return {"name": target, "pk": check.pk}


def _tag_check(world, target):
    from deployments.healthchecks import HealthCheck
    from deployments.models import Tag

    check, _ = HealthCheck.objects.get_or_create(
        tag=Tag.objects.get(name="web"), name="page", defaults={"kind": "http", "url": "http://{host}/"}
    )
    return {"tag": "web", "pk": check.pk}


def _drifted(world, target):
    """``target`` drifted from its branch head (so a redeploy has something to deploy)."""
    from deployments import repos
    from deployments.sync.models import NodeSync

    NodeSync.objects.update_or_create(
        node=world.nodes[target], defaults={"status": "drifted", "commit_sha": repos.resolve(world.repository)}
    )
    return {"name": target}


def _subscription(world, target):
    from deployments.sync.models import Subscription

    sub, _ = Subscription.objects.get_or_create(
        team=world.ops, name="ops-chat", defaults={"kind": "email", "target_encrypted": "", "events": ["node.drifted"]}
    )
    return {"pk": sub.pk}


def team_admins(ok: int):
    """Superusers and members of a team holding an admin grant (its subscriptions); the rest 403."""
    return lambda persona, lvl: (
        302 if persona == "anonymous" else ok if persona.startswith(("admin-", "super")) else 403
    )


def deployers(ok: int, *, api: bool = False):
    """Whoever may deploy some node (a rollout's request): anonymous 401/302, the rest 403."""
    return lambda persona, lvl: (401 if api else 302) if persona == "anonymous" else ok if lvl >= 2 else 403


def _zeds_token(world) -> int:
    from deployments.restapi import tokens

    return tokens.create_token(world.zed, name="zed-script")[0].pk


def _admin_urls(world):
    return [
        reverse("admin:index"),
        reverse("admin:access_team_changelist"),
        reverse("admin:deployments_node_changelist"),
        reverse("admin:access_team_change", args=[world.ops.pk]),
    ]


# Arguments for the audit pages that take some; an audit page missing here fails the matrix.
AUDIT_KWARGS = {
    "event-detail": lambda: {"seq": AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[0]},
    "export": lambda: {"fmt": "csv"},
}


def _audit_urls(world):
    urls = []
    for p in get_resolver().url_patterns:
        if isinstance(p, URLResolver) and p.namespace == "audit":
            for sub in p.url_patterns:
                if sub.pattern.converters and sub.name not in AUDIT_KWARGS:
                    pytest.fail(f"audit:{sub.name} takes arguments: give them in AUDIT_KWARGS")
                kwargs = AUDIT_KWARGS[sub.name]() if sub.pattern.converters else {}
                urls.append(reverse(f"audit:{sub.name}", kwargs=kwargs))
    return urls


RULES: dict[str, Rule] = {
    "login": Rule("GET", anyone(200)),
    "logout": Rule("POST", anyone(302)),
    "admin:*": Rule("GET", staff_superusers, urls=_admin_urls),
    "audit:*": Rule("GET", auditors, urls=_audit_urls),
    # The REST API: every route, method and persona, with a token and with the session, is in
    # tests/restapi/test_matrix.py (which fails for a route without a rule); here its schema.
    "api-v1:*": Rule("GET", anyone(200), urls=lambda world: [reverse("api-v1:schema")]),
    # API tokens: each user's own; another's token does not exist for them (zed's, here).
    "restapi:token-list": Rule("GET", signed_in(200)),
    "restapi:token-revoke": Rule("POST", signed_in(404), lambda w, t: {"pk": _zeds_token(w)}),
    # Nodes and deployments.
    "deployments:dashboard": Rule("GET", signed_in(200)),
    "deployments:node-add": Rule("GET", superuser_only(200), denial_audited=True),
    "deployments:node-detail": Rule("GET", on_node(1, 200), _node, node_route=True),
    "deployments:node-edit": Rule("GET", on_node(3, 200), _node, node_route=True, denial_audited=True),
    "deployments:node-deploy": Rule(
        "POST", on_node(2, 302), _node, {"action": "switch"}, node_route=True, denial_audited=True
    ),
    "deployments:node-hostkey": Rule("GET", on_node(3, 200), _node, node_route=True, denial_audited=True),
    # Generations: reading them needs only to see the node (the world's hosts do not resolve: the read
    # fails fast and says so); rolling back is a deploy.
    "deployments:node-generations-read": Rule("POST", on_node(1, 302), _node, node_route=True, denial_audited=True),
    "deployments:node-rollback": Rule(
        "POST", on_node(2, 302), _node, {"action": "switch"}, node_route=True, denial_audited=True
    ),
    "deployments:api-node-generations": Rule("GET", on_node(1, 200, api=True), _node, node_route=True, api=True),
    "deployments:api-rollback": Rule(
        "POST", on_node(2, 201, api=True), _node, {"action": "switch"}, node_route=True, api=True, denial_audited=True
    ),
    # Health checks: a node's by its admins, a tag's by superusers (inventory); auditors read a tag's.
    "deployments:node-health": Rule("GET", on_node(1, 200), _node, node_route=True),
    "deployments:node-check-add": Rule("GET", on_node(3, 200), _node, node_route=True, denial_audited=True),
    "deployments:node-check-edit": Rule("GET", on_node(3, 200), _node_check, node_route=True, denial_audited=True),
    "deployments:node-check-delete": Rule("POST", on_node(3, 302), _node_check, node_route=True, denial_audited=True),
    "deployments:tag-health": Rule("GET", auditors, lambda w, t: {"tag": "web"}, denial_audited=True),
    "deployments:tag-check-add": Rule("GET", superuser_only(200), lambda w, t: {"tag": "web"}, denial_audited=True),
    "deployments:tag-check-edit": Rule("GET", superuser_only(200), _tag_check, denial_audited=True),
    "deployments:tag-check-delete": Rule("POST", superuser_only(302), _tag_check, denial_audited=True),
    "deployments:node-build-location": Rule(
        "POST", on_node(3, 302), _node, {"location": "target"}, node_route=True, denial_audited=True
    ),
    "deployments:deployment-list": Rule("GET", signed_in(200)),
    "deployments:deployment-detail": Rule("GET", on_node(1, 200), _deployment, node_route=True),
    "deployments:deployment-cancel": Rule("POST", on_node(2, 302), _active, node_route=True, denial_audited=True),
    # A finished (not interrupted) deployment: past the gate the page is told there is nothing to reconcile.
    "deployments:deployment-reconcile": Rule(
        "POST", on_node(2, 302), _deployment, node_route=True, denial_audited=True
    ),
    "deployments:deployment-log": Rule("GET", on_node(1, 200), _deployment, node_route=True),
    # A finished rebuild: past the gate the page is told it is not a difference to confirm.
    "deployments:deployment-confirm": Rule("POST", on_node(2, 302), _deployment, node_route=True, denial_audited=True),
    "deployments:api-confirm": Rule(
        "POST", on_node(2, 409, api=True), _deployment, node_route=True, api=True, denial_audited=True
    ),
    "deployments:api-nodes": Rule("GET", signed_in(200, api=True), api=True),
    "deployments:api-deploy": Rule(
        "POST", on_node(2, 201, api=True), _node, {"action": "switch"}, node_route=True, api=True, denial_audited=True
    ),
    "deployments:api-deployment": Rule("GET", on_node(1, 200, api=True), _deployment, node_route=True, api=True),
    "deployments:api-deployment-log": Rule("GET", on_node(1, 200, api=True), _deployment, node_route=True, api=True),
    "deployments:api-cancel": Rule(
        "POST", on_node(2, 200, api=True), _active, node_route=True, api=True, denial_audited=True
    ),
    # Rollouts: seen through their nodes; requested by whoever may deploy (every node named), cancelled by
    # whoever may deploy every node of it.
    "deployments:rollout-list": Rule("GET", signed_in(200)),
    "deployments:rollout-add": Rule("GET", deployers(200), denial_audited=True),
    "deployments:rollout-detail": Rule("GET", on_node(1, 200), _rollout, node_route=True),
    "deployments:rollout-cancel": Rule("POST", on_node(2, 302), _rollout, node_route=True, denial_audited=True),
    "deployments:api-rollouts": Rule(
        "POST", deployers(201, api=True), data={"nodes": [IN_SCOPE]}, api=True, denial_audited=True
    ),
    "deployments:api-rollout": Rule("GET", on_node(1, 200, api=True), _rollout, node_route=True, api=True),
    "deployments:api-rollout-cancel": Rule(
        "POST", on_node(2, 200, api=True), _rollout, node_route=True, api=True, denial_audited=True
    ),
    # GitOps: the webhook answers everyone alike (here: not JSON); settings for who manages the inventory,
    # node policies for the node's admins; approvals decided by deployers of every node of the request.
    "webhook": Rule("POST", anyone(400), lambda w, t: {"provider": "github"}),
    "gitops:overview": Rule("GET", auditors, denial_audited=True),
    "gitops:repository-secret": Rule(
        "POST", superuser_only(200), lambda w, t: {"pk": w.repository.pk}, denial_audited=True
    ),
    "gitops:repository-poll": Rule(
        "POST", superuser_only(302), lambda w, t: {"pk": w.repository.pk}, {"poll_interval": "0"}, denial_audited=True
    ),
    "gitops:tag-policy": Rule("GET", superuser_only(200), lambda w, t: {"name": "web"}, denial_audited=True),
    "gitops:node-policy": Rule("GET", on_node(3, 200), _node, node_route=True, denial_audited=True),
    "gitops:approval-list": Rule("GET", signed_in(200)),
    "gitops:approval-detail": Rule("GET", on_node(1, 200), _approval, node_route=True),
    "gitops:approval-approve": Rule("POST", on_node(2, 302), _approval, node_route=True, denial_audited=True),
    "gitops:approval-reject": Rule("POST", on_node(2, 302), _approval, node_route=True, denial_audited=True),
    # Sync status (the node page's buttons) and notifications; metrics need a token (none here: 404).
    "metrics": Rule("GET", anyone(404)),
    "sync:node-refresh": Rule("POST", on_node(2, 302), _node, node_route=True, denial_audited=True),
    "sync:node-redeploy": Rule("POST", on_node(2, 302), _drifted, node_route=True, denial_audited=True),
    "sync:subscription-list": Rule("GET", signed_in(200)),
    "sync:subscription-add": Rule("GET", team_admins(200), denial_audited=True),
    # ops' subscription: ops holds no admin grant, so only superusers manage it.
    "sync:subscription-edit": Rule("GET", superuser_only(200), _subscription, denial_audited=True),
    "sync:subscription-delete": Rule("POST", superuser_only(302), _subscription, denial_audited=True),
    # Teams and grants: superusers only; refused changes are audited.
    "access:team-list": Rule("GET", superuser_only(200)),
    "access:team-add": Rule("GET", superuser_only(200)),
    "access:team-detail": Rule("GET", superuser_only(200), lambda w, t: {"pk": w.ops.pk}),
    "access:team-edit": Rule(
        "POST", superuser_only(302), lambda w, t: {"pk": w.ops.pk}, {"name": "ops2"}, denial_audited=True
    ),
    "access:team-delete": Rule("POST", superuser_only(302), lambda w, t: {"pk": w.ops.pk}, denial_audited=True),
    "access:member-add": Rule(
        "POST", superuser_only(302), lambda w, t: {"pk": w.ops.pk}, {"username": "zed"}, denial_audited=True
    ),
    "access:member-remove": Rule(
        "POST", superuser_only(302), lambda w, t: {"pk": w.ops.pk, "user_id": w.zed.pk}, denial_audited=True
    ),
    "access:grant-add": Rule(
        "POST",
        superuser_only(302),
        lambda w, t: {"pk": w.ops.pk},
        {"role": "deployer", "scope": "tag", "tag": "db-*"},
        denial_audited=True,
    ),
    "access:grant-remove": Rule(
        "POST", superuser_only(302), lambda w, t: {"pk": w.ops.pk, "grant_id": w.ops_grant.pk}, denial_audited=True
    ),
    # Credentials and repositories: auditors read the lists, superusers change them; every refusal is audited.
    **{
        route: rule
        for kind, obj in (
            ("credential", lambda w: w.nodes[IN_SCOPE].credential),
            ("repository", lambda w: w.repository),
        )
        for route, rule in {
            f"deployments:{kind}-list": Rule("GET", auditors, denial_audited=True),
            f"deployments:{kind}-add": Rule("GET", superuser_only(200), denial_audited=True),
            f"deployments:{kind}-edit": Rule(
                "GET", superuser_only(200), lambda w, t, obj=obj: {"pk": obj(w).pk}, denial_audited=True
            ),
            # In use by both nodes: the superuser is told so and sent back (302), nothing is deleted.
            f"deployments:{kind}-delete": Rule(
                "POST", superuser_only(302), lambda w, t, obj=obj: {"pk": obj(w).pk}, denial_audited=True
            ),
            # No such team: the gate decides before the input is read (a superuser is told to choose one).
            f"deployments:{kind}-use-add": Rule(
                "POST", superuser_only(302), lambda w, t, obj=obj: {"pk": obj(w).pk}, {"team": "0"}, denial_audited=True
            ),
            f"deployments:{kind}-use-remove": Rule(
                "POST",
                superuser_only(302),
                lambda w, t, obj=obj: {"pk": obj(w).pk, "team_id": w.ops.pk},
                denial_audited=True,
            ),
        }.items()
    },
}

WEBSOCKET_RULES: dict[str, Callable[[World, str], str]] = {
    "ws:ws-deployment-log": lambda world, target: f"/ws/deployments/{world.finished[target].pk}/log/",
}


def test_every_url_pattern_has_a_rule():
    missing = [name for name in url_pattern_names() if name not in RULES]
    assert not missing, f"URL patterns without a rule in the permission matrix: {missing}"
    stale = [name for name in RULES if name not in url_pattern_names()]
    assert not stale, f"rules for URL patterns that no longer exist: {stale}"


def test_every_websocket_route_has_a_rule():
    missing = [name for name in websocket_route_names() if name not in WEBSOCKET_RULES]
    assert not missing, f"WebSocket routes without a rule in the permission matrix: {missing}"


def _request(client, rule: Rule, url: str):
    if rule.method == "GET":
        return client.get(url)
    if rule.api:
        return client.post(url, json.dumps(rule.data), content_type="application/json")
    return client.post(url, rule.data)


@pytest.mark.parametrize("persona", ROLES)
@pytest.mark.parametrize("route", url_pattern_names())
def test_url_answers_each_persona_as_its_rule_says(client, world, route, persona):
    rule = RULES.get(route)
    if rule is None:
        pytest.fail(f"{route} has no rule in the permission matrix")
    user = world.persona(persona)
    if user is not None:
        client.force_login(user)
    targets = (IN_SCOPE, OUT_OF_SCOPE) if rule.node_route else (IN_SCOPE,)
    for target in targets:
        if rule.urls is not None:
            urls = rule.urls(world)
        else:
            urls = [reverse(route, kwargs=rule.kwargs(world, target))]
        for url in urls:
            expected = rule.expect(persona, level(persona, target))
            denials_before = AuditEvent.objects.filter(outcome="denied").count()
            deployments_before = Deployment.objects.count()
            response = _request(client, rule, url)
            allowed = expected if isinstance(expected, set) else {expected}
            assert response.status_code in allowed, (
                f"{persona} {rule.method} {url}: {response.status_code}, expected {expected}"
            )
            if response.status_code == 302 and persona == "anonymous" and not url.startswith("/admin/"):
                assert response["Location"].startswith(reverse("login"))
            if response.status_code == 403 and rule.denial_audited:
                assert AuditEvent.objects.filter(outcome="denied").count() == denials_before + 1, (
                    f"{persona} {rule.method} {url}: the refusal was not audited"
                )
            if route.endswith("deploy") and user is not None and response.status_code in (201, 302):
                assert Deployment.objects.count() == deployments_before + 1, f"{persona} {url}: nothing queued"


async def _connect(path: str, user) -> tuple[bool, int | None]:
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    if user is not None:
        communicator.scope["user"] = user
    connected, code = await communicator.connect(timeout=5)
    if connected:
        await communicator.disconnect()
    return connected, code


@pytest.mark.parametrize("persona", ROLES)
@pytest.mark.parametrize("route", websocket_route_names())
def test_websocket_admits_only_who_may_see_the_deployment(consumer_world, route, persona):
    from django.contrib.auth.models import AnonymousUser

    make_path = WEBSOCKET_RULES.get(route)
    if make_path is None:
        pytest.fail(f"{route} has no rule in the permission matrix")
    user = consumer_world.persona(persona) or AnonymousUser()
    for target in (IN_SCOPE, OUT_OF_SCOPE):
        connected, code = async_to_sync(_connect)(make_path(consumer_world, target), user)
        if level(persona, target) >= 1:
            assert connected, f"{persona} was refused the log of a deployment on {target} (code {code})"
        else:
            assert not connected and code == 4404, f"{persona} reached the log of a deployment on {target}"


# --- the gate decides before the input is read ------------------------------------------------------

# Requests with input that is wrong in every way, to each route that takes input: (content type, body)
# for the API, form data for pages.  Whoever may not act gets exactly the answer a valid request gets
# (404 unseen; 403 seen but not allowed, recorded once); whoever may act gets a 4xx naming the problem.
# Nothing is ever queued.
INVALID_INPUT: dict[str, list] = {
    "deployments:node-add": [
        {"name": "web;1", "host": "$(reboot)", "port": "x"},
        {"name": "\u202eweb", "tag_names": "a\x00b"},
        {},
    ],
    "deployments:node-deploy": [
        {"action": "explode"},
        {"action": "switch", "revision": "main;reboot"},
        {"action": "switch", "revision": "x" * 10_000},
        {},
    ],
    "deployments:api-deploy": [
        ("application/json", b'{"action": "explode"}'),
        ("application/json", b"not json"),
        ("application/json", b'{"action": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("application/json", b'{"revision": "' + b"x" * 20_000 + b'"}'),
        ("application/json", b"\xff\xfe"),
        ("text/plain", b'{"action": "switch"}'),
    ],
    "deployments:node-check-add": [
        {"name": "web;1", "kind": "tcp", "host": "$(reboot)", "port": "443"},
        {"name": "page", "kind": "http", "url": "http://x/`id`"},
        {"name": "page", "kind": "http", "url": "http://u:p@x/"},
        {"name": "cmd", "kind": "command", "command": "true\nreboot"},
        {},
    ],
    "deployments:api-cancel": [
        ("application/json", b'{"unexpected": true}'),
        ("text/plain", b"{}"),
    ],
    "deployments:node-rollback": [
        {"generation": "2;reboot", "action": "switch"},
        {"generation": "$(reboot)"},
        {"generation": "1", "action": "test"},
        {"generation": "0", "action": "boot"},
    ],
    "deployments:api-rollback": [
        ("application/json", b'{"generation": "1; reboot"}'),
        ("application/json", b'{"generation": true}'),
        ("application/json", b'{"generation": 1, "action": "dry-activate"}'),
        ("application/json", b'{"generation": [1]}'),
        ("application/json", b'{"unexpected": 1}'),
        ("text/plain", b'{"generation": 1}'),
    ],
    "deployments:rollout-add": [
        {"action": "switch", "tags": "web;reboot"},
        {"action": "switch", "all_nodes": "on"},
        {"action": "explode", "nodes": "web-1"},
        {},
    ],
    "deployments:api-rollouts": [
        ("application/json", b'{"nodes": ["web-1"], "parallelism": "ten"}'),
        ("application/json", b'{"all": true}'),
        ("application/json", b'{"nodes": "web-1"}'),
        ("application/json", b'{"nodes": ["web-1"], "action": "explode"}'),
        ("application/json", b'{"tags": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("text/plain", b'{"nodes": ["web-1"]}'),
    ],
    "deployments:api-rollout-cancel": [
        ("application/json", b'{"unexpected": true}'),
        ("text/plain", b"{}"),
    ],
}


def may_act(route: str, persona: str, target: str) -> bool:
    """Whether ``persona`` passes the gate of ``route`` (adding nodes: superusers; the rest: deployers)."""
    if route == "deployments:node-add":
        return persona == "superuser"
    if route == "deployments:node-check-add":  # a node's health checks: its admins
        return persona != "anonymous" and level(persona, target) >= 3
    return persona != "anonymous" and level(persona, target) >= 2


def test_every_route_with_invalid_input_cases_has_a_rule():
    assert set(INVALID_INPUT) <= set(RULES)


@pytest.mark.parametrize("persona", ROLES)
@pytest.mark.parametrize("route", sorted(INVALID_INPUT))
def test_the_gate_answers_before_the_input_is_read(client, world, route, persona):
    rule = RULES[route]
    user = world.persona(persona)
    if user is not None:
        client.force_login(user)
    for target in (IN_SCOPE, OUT_OF_SCOPE) if rule.node_route else (IN_SCOPE,):
        url = reverse(route, kwargs=rule.kwargs(world, target))
        for payload in INVALID_INPUT[route]:
            expected = rule.expect(persona, level(persona, target))
            denials_before = AuditEvent.objects.filter(outcome="denied").count()
            deployments_before = Deployment.objects.exclude(status=Deployment.Status.CANCELLED).count()
            nodes_before = Node.objects.count()
            if rule.api:
                content_type, body = payload
                response = client.generic("POST", url, body, content_type=content_type)
            else:
                response = client.post(url, payload)
            where = f"{persona} POST {url} {str(payload)[:60]}"
            if may_act(route, persona, target):  # the input is judged, and refused
                assert response.status_code in (400, 413, 415), f"{where}: {response.status_code}"
                if rule.api:
                    assert response.json()["error"], where
            else:
                assert response.status_code == expected, f"{where}: {response.status_code}, expected {expected}"
            if response.status_code == 403:
                assert AuditEvent.objects.filter(outcome="denied").count() == denials_before + 1, (
                    f"{where}: the refusal was not recorded exactly once"
                )
            assert Deployment.objects.exclude(status=Deployment.Status.CANCELLED).count() == deployments_before, (
                f"{where}: something was queued or changed"
            )
            assert Node.objects.count() == nodes_before, f"{where}: a node was added"
