"""Taking bob out of a team applies on his next request and closes his open log WebSockets."""

import time

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from deployments import consumers
from deployments.access import teams
from deployments.models import Deployment
from deployments.routing import websocket_urlpatterns
from tests.support.personas import grant

DEADLINE = 10.0  # seconds; the consumer re-checks far more often (see the fixture below)


@pytest.fixture
def quick_recheck(monkeypatch):
    monkeypatch.setattr(consumers, "RECHECK_PERMISSION_EVERY", 0.05)


async def close_code(communicator, deadline: float) -> int | None:
    """Read until the server closes the socket: its close code, or None if still open at the deadline."""
    while time.monotonic() < deadline:
        # receive_nothing() polls without cancelling the application, unlike a timed-out receive_output().
        if await communicator.receive_nothing(timeout=0.02, interval=0.005):
            continue
        message = await communicator.receive_output(timeout=1)
        if message["type"] == "websocket.close":
            return message.get("code")
    return None


def test_removing_bob_from_his_team_closes_his_open_log_socket(consumer_world, users, quick_recheck, client):
    _, bob, _ = users
    team_grant = grant(bob, "viewer", tag="web")
    running = consumer_world.queue("web-1")
    Deployment.objects.filter(pk=running.pk).update(status=Deployment.Status.RUNNING)

    async def scenario():
        communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/deployments/{running.pk}/log/")
        communicator.scope["user"] = bob
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        await database_sync_to_async(teams.remove_member)(team_grant.team, bob)
        code = await close_code(communicator, time.monotonic() + DEADLINE)
        await communicator.disconnect()
        return code

    assert async_to_sync(scenario)() == 4403
    client.force_login(bob)
    assert client.get("/nodes/web-1/").status_code == 404, "and his next request no longer sees the node"


def test_a_socket_stays_open_while_bob_keeps_his_access(consumer_world, users, quick_recheck):
    _, bob, _ = users
    grant(bob, "viewer", tag="web")
    grant(bob, "viewer", node=consumer_world.nodes["web-1"], team_name="other")
    running = consumer_world.queue("web-1")
    Deployment.objects.filter(pk=running.pk).update(status=Deployment.Status.RUNNING)
    web_team = bob.teams.get(name="team-bob")

    async def scenario():
        communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/deployments/{running.pk}/log/")
        communicator.scope["user"] = bob
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        # Still a viewer through the other team: the socket must survive several re-checks.
        await database_sync_to_async(teams.remove_member)(web_team, bob)
        code = await close_code(communicator, time.monotonic() + 0.5)
        await communicator.disconnect()
        return code

    assert async_to_sync(scenario)() is None
