"""Tag scopes follow the tag: tagging a node later grants access, untagging revokes it."""

import pytest

from deployments import inventory
from deployments.access import gate
from deployments.access.gate import DEPLOY, VIEW
from tests.support.personas import grant

pytestmark = pytest.mark.django_db


def retag(node, *tags):
    inventory.save_object(node, tags=list(tags))


def test_tagging_a_node_later_lets_charlie_see_it(client, world, users):
    _, _, charlie = users
    grant(charlie, "viewer", tag="web")
    client.force_login(charlie)
    assert client.get("/nodes/db-1/").status_code == 404
    retag(world.nodes["db-1"], "db-main", "web")
    assert client.get("/nodes/db-1/").status_code == 200


def test_untagging_a_node_takes_it_away_from_charlie(client, world, users):
    _, _, charlie = users
    grant(charlie, "deployer", tag="web")
    client.force_login(charlie)
    assert client.get("/nodes/web-1/").status_code == 200
    retag(world.nodes["web-1"])
    assert client.get("/nodes/web-1/").status_code == 404
    assert client.post("/api/nodes/web-1/deploy/", "{}", content_type="application/json").status_code == 404


def test_a_prefix_scope_covers_every_tag_starting_with_it(world, users):
    _, bob, _ = users
    grant(bob, "deployer", tag="db-*")
    retag(world.nodes["web-1"], "dbx")
    assert list(gate.nodes_for(bob, DEPLOY).values_list("name", flat=True)) == ["db-1"]
    retag(world.nodes["web-1"], "db-replica")
    gate.forget(bob)
    assert sorted(gate.nodes_for(bob, DEPLOY).values_list("name", flat=True)) == ["db-1", "web-1"]


def test_a_prefix_is_matched_literally_not_as_a_sql_wildcard(world, users):
    _, bob, _ = users
    grant(bob, "viewer", tag="db_*")  # "_" is a LIKE wildcard: it must not match "db-main"
    assert not gate.visible_nodes(bob).exists()
    assert not gate.can(bob, VIEW, world.nodes["db-1"])


@pytest.mark.parametrize("prefetch", [False, True])
def test_can_agrees_with_the_queryset_whether_tags_are_prefetched_or_not(world, users, prefetch):
    _, bob, _ = users
    grant(bob, "deployer", tag="db-*")
    grant(bob, "viewer", tag="web")
    nodes = gate.visible_nodes(bob)
    if prefetch:
        nodes = nodes.prefetch_related("tags")
    deployable = set(gate.nodes_for(bob, DEPLOY).values_list("pk", flat=True))
    for node in nodes:
        assert gate.can(bob, VIEW, node)
        assert gate.can(bob, DEPLOY, node) == (node.pk in deployable)
    assert deployable == {world.nodes["db-1"].pk}
