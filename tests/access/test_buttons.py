"""Deploy and admin controls appear only for what the user may do (the server checks anyway)."""

import pytest

from tests.support.personas import grant

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "role,deploy_form,admin_links",
    [
        ("viewer", False, False),
        ("deployer", True, False),
        ("admin", True, True),
    ],
)
def test_the_node_page_shows_bob_only_the_controls_of_his_role(client, world, users, role, deploy_form, admin_links):
    bob = users[1]
    grant(bob, role, tag="web")
    client.force_login(bob)
    page = client.get("/nodes/web-1/").content.decode()
    assert ('id="deploy-form"' in page) == deploy_form
    assert ("/nodes/web-1/edit/" in page) == admin_links
    assert ("/nodes/web-1/hostkey/" in page) == admin_links


def test_the_cancel_button_is_only_for_those_who_may_cancel(client, world, users):
    bob, charlie = users[1], users[2]
    grant(bob, "viewer", tag="web")
    grant(charlie, "deployer", tag="web")
    active = world.queue("web-1")
    client.force_login(bob)
    assert client.get(f"/deployments/{active.pk}/").context["can_cancel"] is False
    client.force_login(charlie)
    assert client.get(f"/deployments/{active.pk}/").context["can_cancel"] is True


def test_only_superusers_are_offered_to_add_nodes(client, world, users):
    alice, bob, _ = users
    grant(bob, "admin")
    client.force_login(bob)
    assert client.get("/").context["can_add_node"] is False
    client.force_login(alice)
    assert client.get("/").context["can_add_node"] is True
