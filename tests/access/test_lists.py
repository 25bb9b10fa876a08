"""Lists and their counts show only what the user may see."""

import pytest

from tests.support.personas import grant

pytestmark = pytest.mark.django_db


@pytest.fixture
def charlie_client(client, world, users):
    charlie = users[2]
    grant(charlie, "viewer", tag="web")
    client.force_login(charlie)
    return client


def test_the_dashboard_lists_and_counts_only_charlies_nodes(charlie_client, world):
    world.queue("db-1")
    response = charlie_client.get("/")
    page = response.content.decode()
    assert [n.name for n in response.context["nodes"]] == ["web-1"]
    assert response.context["page"].paginator.count == 1
    assert response.context["active_count"] == 0, "db-1's active deployment is not counted"
    assert "db-1" not in page


def test_searching_does_not_reveal_unseen_nodes(charlie_client, world):
    assert list(charlie_client.get("/?q=db").context["nodes"]) == []
    assert list(charlie_client.get("/?tag=db-main").context["nodes"]) == []


def test_the_deployment_list_shows_only_deployments_of_charlies_nodes(charlie_client, world):
    response = charlie_client.get("/deployments/")
    assert [d.node.name for d in response.context["page"].object_list] == ["web-1"]
    assert response.context["page"].paginator.count == 1
    assert charlie_client.get("/deployments/?node=db-1").context["page"].paginator.count == 0


def test_the_api_lists_only_charlies_nodes(charlie_client, world):
    assert [n["name"] for n in charlie_client.get("/api/nodes/").json()["nodes"]] == ["web-1"]


def test_a_user_without_grants_sees_an_empty_panel(client, world, users):
    client.force_login(users[1])
    response = client.get("/")
    assert response.status_code == 200 and response.context["page"].paginator.count == 0
