"""A log WebSocket lives only as long as the sign-in that opened it: logging out, deactivating the user
or changing their password closes it within the same re-check period as a revoked grant."""

import time

import pytest
from asgiref.sync import async_to_sync
from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from deployments import consumers
from deployments.models import Deployment
from deployments.routing import websocket_urlpatterns
from tests.support.personas import grant

from .test_revocation import DEADLINE, close_code


@pytest.fixture
def quick_recheck(monkeypatch):
    monkeypatch.setattr(consumers, "RECHECK_PERMISSION_EVERY", 0.05)


@pytest.fixture
def dave(consumer_world):
    user = get_user_model().objects.create_user("dave", password="dave-socket-pw-1")
    grant(user, "viewer", tag="web")
    return user


@pytest.fixture
def browser(dave):
    """Dave's signed-in browser: a Django client whose session cookie the socket presents."""
    client = Client()
    client.force_login(dave)
    return client


def run_socket(consumer_world, browser, change, *, wait: float = DEADLINE) -> int | None:
    """Open the log socket with the browser's session, apply ``change``; the close code, or None if open."""
    running = consumer_world.queue("web-1")
    Deployment.objects.filter(pk=running.pk).update(status=Deployment.Status.RUNNING)
    cookie = f"sessionid={browser.cookies['sessionid'].value}".encode()
    app = AuthMiddlewareStack(URLRouter(websocket_urlpatterns))

    async def scenario():
        communicator = WebsocketCommunicator(app, f"/ws/deployments/{running.pk}/log/", headers=[(b"cookie", cookie)])
        connected, _ = await communicator.connect(timeout=5)
        assert connected, "the session may see the log at first"
        await database_sync_to_async(change)()
        code = await close_code(communicator, time.monotonic() + wait)
        await communicator.disconnect()
        return code

    return async_to_sync(scenario)()


def test_logging_out_closes_the_sockets_the_session_opened(consumer_world, browser, quick_recheck):
    assert run_socket(consumer_world, browser, lambda: browser.post("/logout/")) == 4403


def test_deactivating_the_user_closes_their_sockets(consumer_world, dave, browser, quick_recheck):
    change = lambda: get_user_model().objects.filter(pk=dave.pk).update(is_active=False)  # noqa: E731
    assert run_socket(consumer_world, browser, change) == 4403


def test_changing_the_password_closes_the_sockets_of_older_sessions(consumer_world, dave, browser, quick_recheck):
    def change():
        dave.set_password("dave-new-socket-pw-2")
        dave.save()

    assert run_socket(consumer_world, browser, change) == 4403


def test_a_socket_stays_open_while_the_session_stands(consumer_world, browser, quick_recheck):
    assert run_socket(consumer_world, browser, lambda: None, wait=0.5) is None
