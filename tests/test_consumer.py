"""The log WebSocket: permission on connect, replay after a sequence number, the tail, the end."""

import json

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from deployments import logstream
from deployments.models import Deployment
from deployments.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)


async def receive_message(comm, timeout):
    """The next message, checking its frame: ``lines`` in a binary frame (UTF-8 JSON), the rest as text."""
    frame = await comm.receive_from(timeout=timeout)
    msg = json.loads(frame)
    binary = isinstance(frame, bytes)
    assert binary == (msg["type"] == "lines"), f"a {msg['type']} message in a {'binary' if binary else 'text'} frame"
    return msg


@pytest.fixture
def finished(inventory):
    d = Deployment.objects.create(
        node=inventory["node"], action="switch", commit_sha=inventory["sha"], flake_attr="devm", status="running"
    )
    writer = logstream.LogWriter(d.pk, max_batch=7, flush_interval=0.001)
    for i in range(100):
        writer.write("err" if i % 10 == 0 else "out", f"line {i}")
    writer.close()
    Deployment.objects.filter(pk=d.pk).update(status="succeeded", exit_code=0)
    return d


async def _session(user, path):
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    comm.scope["user"] = user
    connected, code = await comm.connect(timeout=10)
    messages = []
    if connected:
        while True:
            msg = await receive_message(comm, timeout=10)
            messages.append(msg)
            if msg["type"] == "end":
                break
        await comm.disconnect()
    return connected, code, messages


def session(user, path):
    return async_to_sync(_session)(user, path)


def lines_of(messages):
    return [line for m in messages if m["type"] == "lines" for line in m["lines"]]


def test_a_client_resuming_after_a_sequence_number_gets_only_the_rest(finished, alice):
    connected, _, messages = session(alice, f"/ws/deployments/{finished.pk}/log/?after=49")
    assert connected
    assert [seq for seq, _, _ in lines_of(messages)] == list(range(50, 100))
    assert messages[-1] == {"type": "end", "last_seq": 99}
    assert any(m["type"] == "status" and m["status"] == "succeeded" for m in messages)


def test_streams_arrive_with_each_line(finished, alice):
    _, _, messages = session(alice, f"/ws/deployments/{finished.pk}/log/")
    lines = lines_of(messages)
    assert lines[0] == [0, "e", "line 0"] and lines[1] == [1, "o", "line 1"]


def test_a_page_asking_for_the_tail_skips_the_earlier_lines(finished, alice):
    _, _, messages = session(alice, f"/ws/deployments/{finished.pk}/log/?tail=10")
    assert messages[0] == {"type": "skipped", "count": 90}
    assert [seq for seq, _, _ in lines_of(messages)] == list(range(90, 100))


def test_a_malformed_sequence_number_replays_from_the_start(finished, alice):
    _, _, messages = session(alice, f"/ws/deployments/{finished.pk}/log/?after=abc")
    assert len(lines_of(messages)) == 100


def test_a_user_without_rights_is_refused_before_any_line(finished, bob):
    connected, code, messages = session(bob, f"/ws/deployments/{finished.pk}/log/")
    assert not connected and code == 4404 and messages == []


def test_an_unknown_deployment_is_refused(finished, alice):
    connected, code, _ = session(alice, "/ws/deployments/999999/log/")
    assert not connected and code == 4404
