"""The permission gate: roles include the ones below them, teams add up, and a page costs constant queries."""

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection
from django.http import Http404
from django.test.utils import CaptureQueriesContext

from deployments.access import gate
from deployments.access.gate import ADMIN, DEPLOY, VIEW
from deployments.access.models import Grant, Team
from deployments.models import Node
from tests.support.keys import HOST_KEY
from tests.support.personas import grant

pytestmark = pytest.mark.django_db


def test_a_deployer_may_view_and_deploy_but_not_administer(world, users):
    _, bob, _ = users
    grant(bob, "deployer", node=world.nodes["web-1"])
    web = world.nodes["web-1"]
    assert gate.can(bob, VIEW, web) and gate.can(bob, DEPLOY, web)
    assert not gate.can(bob, ADMIN, web)
    assert not gate.can(bob, VIEW, world.nodes["db-1"])


def test_permissions_are_the_union_over_bobs_teams(world, users):
    _, bob, _ = users
    grant(bob, "viewer", tag="web", team_name="web-readers")
    grant(bob, "admin", node=world.nodes["db-1"], team_name="db-admins")
    assert set(gate.visible_nodes(bob).values_list("name", flat=True)) == {"web-1", "db-1"}
    assert list(gate.nodes_for(bob, ADMIN).values_list("name", flat=True)) == ["db-1"]
    assert not gate.can(bob, DEPLOY, world.nodes["web-1"])


def test_the_auditor_reads_everything_and_changes_nothing(world, users):
    _, bob, _ = users
    grant(bob, "auditor")
    assert gate.may(bob, gate.AUDIT)
    assert gate.visible_nodes(bob).count() == 2
    assert gate.visible_deployments(bob).count() == 2
    assert not gate.can(bob, DEPLOY) and not gate.nodes_for(bob, DEPLOY).exists()
    with pytest.raises(PermissionDenied):
        gate.node_for(bob, "web-1", DEPLOY)


def test_only_superusers_and_auditors_may_audit(world, users):
    alice, bob, charlie = users
    grant(charlie, "admin")
    assert gate.may(alice, gate.AUDIT)
    assert not gate.may(bob, gate.AUDIT) and not gate.may(charlie, gate.AUDIT)


def test_an_auditor_grant_must_cover_all_nodes(world):
    team = Team.objects.create(name="auditors")
    with pytest.raises(ValidationError, match="global"):
        Grant(team=team, role="auditor", scope="tag", tag="web").full_clean()


@pytest.mark.parametrize(
    "pattern,valid",
    [
        ("web", True),
        ("db-*", True),
        ("db-main", True),
        ("*", False),
        ("d*b", False),
        ("Web", False),
        ("db;*", False),
        ("db**", False),
    ],
)
def test_a_tag_scope_is_a_tag_or_a_prefix_with_a_trailing_star(world, pattern, valid):
    team = Team.objects.create(name="t")
    g = Grant(team=team, role="viewer", scope="tag", tag=pattern)
    if valid:
        g.full_clean()
    else:
        with pytest.raises(ValidationError):
            g.full_clean()


def test_an_inactive_member_may_do_nothing(world, users):
    _, bob, _ = users
    grant(bob, "admin")
    bob.is_active = False
    assert not gate.can(bob, VIEW, world.nodes["web-1"])
    assert not gate.visible_nodes(bob).exists()


def test_unseen_nodes_answer_404_and_seen_ones_403(world, users):
    _, bob, _ = users
    grant(bob, "viewer", node=world.nodes["web-1"])
    with pytest.raises(Http404):
        gate.node_for(bob, "db-1")
    with pytest.raises(Http404):
        gate.node_for(bob, "no-such-node")
    with pytest.raises(PermissionDenied):
        gate.node_for(bob, "web-1", ADMIN)
    with pytest.raises(Http404):
        gate.deployment_for(bob, world.finished["db-1"].pk)


def test_grants_are_read_once_per_user_object(world, users, django_assert_num_queries):
    _, bob, _ = users
    grant(bob, "deployer", tag="web")
    with django_assert_num_queries(2):  # the grants, then the nodes
        list(gate.visible_nodes(bob))
    with django_assert_num_queries(1):
        list(gate.nodes_for(bob, DEPLOY))


def test_annotated_flags_drive_deploy_buttons_without_a_query_per_node(world, users):
    _, bob, _ = users
    grant(bob, "viewer")
    grant(bob, "deployer", tag="web", team_name="web-deployers")
    nodes = gate.annotate_permissions(gate.visible_nodes(bob), bob)
    with CaptureQueriesContext(connection) as queries:
        flags = {n.name: (n.can_deploy, n.can_admin) for n in nodes}
    assert flags == {"web-1": (True, False), "db-1": (False, False)}
    assert len(queries) == 1


def test_the_dashboard_costs_the_same_queries_for_10_or_100_nodes(client, world, users):
    _, bob, _ = users
    grant(bob, "deployer", tag="web")
    client.force_login(bob)

    def dashboard_queries():
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/").status_code == 200
        return len(queries)

    def add_web_nodes(count):
        start = Node.objects.count()
        for i in range(start, start + count):
            node = Node.objects.create(
                name=f"web-x{i}",
                host="192.0.2.1",
                flake_attr="web",
                repository=world.repository,
                credential=world.nodes["web-1"].credential,
                host_key=HOST_KEY,
            )
            node.tags.add(world.nodes["web-1"].tags.get())

    add_web_nodes(9)
    with_10 = dashboard_queries()
    add_web_nodes(90)
    assert dashboard_queries() == with_10
