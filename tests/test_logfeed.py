"""Followers of one deployment share one reader per process; a follower on Redis never closes for lack of traffic."""

import asyncio
import json
import threading
import time
import zlib

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from deployments import logfeed, logstream
from deployments.models import Deployment
from deployments.routing import websocket_urlpatterns
from tests.support.services import PrivateRedis

pytestmark = pytest.mark.django_db(transaction=True)


async def receive_message(comm, timeout):
    """The next message, checking its frame: ``lines`` in a binary frame (UTF-8 JSON, or its zlib stream for
    a socket that asked for ``compress=deflate``), the rest as text."""
    frame = await comm.receive_from(timeout=timeout)
    binary = isinstance(frame, bytes)
    compressed = "compress=deflate" in comm.scope["query_string"].decode()
    if binary and compressed:
        assert frame[:1] != b"{", "a compressed socket gets zlib frames"
        frame = zlib.decompress(frame)
    msg = json.loads(frame)
    assert binary == (msg["type"] == "lines"), f"a {msg['type']} message in a {'binary' if binary else 'text'} frame"
    return msg


@pytest.fixture
def running(inventory):
    return Deployment.objects.create(
        node=inventory["node"], action="switch", commit_sha=inventory["sha"], flake_attr="devm", status="running"
    )


async def open_socket(user, pk, after=-1, *, compress=False):
    path = f"/ws/deployments/{pk}/log/?after={after}" + ("&compress=deflate" if compress else "")
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    comm.scope["user"] = user
    connected, _ = await comm.connect(timeout=10)
    assert connected
    return comm


async def read_until_end(comm, timeout=30):
    lines, statuses = [], []
    deadline = time.monotonic() + timeout
    while True:
        msg = await receive_message(comm, timeout=max(0.1, deadline - time.monotonic()))
        if msg["type"] == "lines":
            lines.extend(msg["lines"])
        elif msg["type"] == "status":
            statuses.append(msg["status"])
        elif msg["type"] == "end":
            return lines, statuses


def write_then_finish(pk, lines: int, *, pause: float = 0.0) -> threading.Thread:
    def run():
        writer = logstream.LogWriter(pk, flush_interval=0.005, max_batch=500)
        for i in range(lines):
            writer.write("out", f"line {i}")
            if pause and i % 100 == 0:
                time.sleep(pause)
        writer.close()
        Deployment.objects.filter(pk=pk).update(status="succeeded", exit_code=0)
        logstream.notify(pk, {"type": "deployment.status"})

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_many_followers_share_one_reader_and_each_gets_every_line_once(running, alice):
    viewers = 30

    async def scenario():
        comms = [await open_socket(alice, running.pk) for _ in range(viewers)]
        await asyncio.sleep(0.2)  # each socket's follower task starts after its handshake
        feed = logfeed._feeds[running.pk]
        assert feed.followers == viewers, "one feed for every socket of the deployment"
        writer = await asyncio.to_thread(write_then_finish, running.pk, 5000, pause=0.01)
        results = await asyncio.gather(*(read_until_end(c) for c in comms))
        await asyncio.to_thread(writer.join)
        reads = feed.reads
        for c in comms:
            await c.disconnect()
        return results, reads

    results, reads = async_to_sync(scenario)()
    for lines, statuses in results:
        assert [line[0] for line in lines] == list(range(5000))
        assert lines[1234] == [1234, "o", "line 1234"]
        assert statuses[-1] == "succeeded"
    # One read per poll (50 ms) for all 30 sockets while ~0.5 s of lines arrive, not 30 per poll.
    assert reads < 200
    assert running.pk not in logfeed._feeds, "the last follower to leave stops the feed"


def test_a_follower_joining_mid_log_reads_the_past_then_shares_the_feed(running, alice):
    writer = logstream.LogWriter(running.pk, flush_interval=0.001, max_batch=100)
    for i in range(1000):
        writer.write("out", f"early {i}")
    writer.close()

    async def scenario():
        first = await open_socket(alice, running.pk, after=999)
        await asyncio.sleep(0.2)  # the feed starts at seq 1000
        late = await open_socket(alice, running.pk, after=10)
        thread = await asyncio.to_thread(write_then_finish_from, running.pk, 1000, 500)
        a, b = await asyncio.gather(read_until_end(first), read_until_end(late))
        await asyncio.to_thread(thread.join)
        await first.disconnect()
        await late.disconnect()
        return a, b

    (a, _), (b, _) = async_to_sync(scenario)()
    assert [line[0] for line in a] == list(range(1000, 1500))
    assert [line[0] for line in b] == list(range(11, 1500))


def write_then_finish_from(pk, start, lines):
    def run():
        writer = logstream.LogWriter(pk, start_seq=start, flush_interval=0.005, max_batch=50)
        for i in range(lines):
            writer.write("out", f"late {i}")
        writer.close()
        Deployment.objects.filter(pk=pk).update(status="succeeded", exit_code=0)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.fixture
def redis_layer(settings):
    """The channels-redis layer as the panel configures it, on a private Redis of this test's own."""
    from controlpanel import settings as panel_settings

    with PrivateRedis() as redis:
        config = {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{**panel_settings_hosts(panel_settings), "address": redis.url}],
                "prefix": "feedtest",
            },
        }
        settings.CHANNEL_LAYERS = {"default": config}
        yield redis


def panel_settings_hosts(panel_settings) -> dict:
    """The host options settings.py gives channels-redis (read from the module, whatever REDIS_URL is)."""
    import importlib
    import os

    saved = os.environ.get("REDIS_URL")
    os.environ["REDIS_URL"] = "redis://127.0.0.1:1/0"
    try:
        fresh = importlib.reload(panel_settings)
        return dict(fresh.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0])
    finally:
        if saved is None:
            os.environ.pop("REDIS_URL")
        else:
            os.environ["REDIS_URL"] = saved
        importlib.reload(panel_settings)


def test_a_follower_on_redis_idle_for_over_10_seconds_still_gets_the_next_line(
    running, alice, redis_layer, monkeypatch
):
    # Only a push can deliver the line in time: the safety-net poll is pushed far out.
    monkeypatch.setattr(logfeed, "PUSH_SAFETY_POLL", 60.0)

    async def scenario():
        comm = await open_socket(alice, running.pk)
        first = await receive_message(comm, timeout=5)
        assert first["type"] == "status"
        assert await comm.receive_nothing(timeout=11, interval=0.5), "nothing to say while idle, and still open"
        sent = time.monotonic()
        await asyncio.to_thread(write_one, running.pk)
        msg = await receive_message(comm, timeout=5)
        took = time.monotonic() - sent
        await comm.disconnect()
        return msg, took

    msg, took = async_to_sync(scenario)()
    assert msg == {"type": "lines", "lines": [[0, "o", "after the quiet"]]}
    assert took < 2, f"the push arrived {took:.1f} s after the line was stored"


def write_one(pk):
    writer = logstream.LogWriter(pk, flush_interval=0.001)
    writer.write("out", "after the quiet")
    writer.close()


def test_followers_far_apart_share_a_small_cache_and_still_get_every_line_once(running, alice, monkeypatch):
    monkeypatch.setattr(logfeed, "BATCH_LINES", 50)
    monkeypatch.setattr(logfeed, "CACHE_LINES", 250)  # far less than the log: messages are evicted and read again
    writer = logstream.LogWriter(running.pk, flush_interval=0.001, max_batch=120)
    for i in range(3000):
        writer.write("out", f"line {i}")
    writer.close()
    Deployment.objects.filter(pk=running.pk).update(status="succeeded")

    async def scenario():
        comms = [await open_socket(alice, running.pk, after=after) for after in (-1, 499, 1733, 2990)]
        results = await asyncio.gather(*(read_until_end(c) for c in comms))
        feed_lines = [f.cached_lines for f in logfeed._feeds.values()]
        for c in comms:
            await c.disconnect()
        return results, feed_lines

    results, feed_lines = async_to_sync(scenario)()
    for (lines, _), after in zip(results, (-1, 499, 1733, 2990), strict=True):
        assert [line[0] for line in lines] == list(range(after + 1, 3000))
        assert all(line[2] == f"line {line[0]}" for line in lines)
    assert all(n <= 250 + 50 for n in feed_lines)


def test_a_closed_feed_ends_even_when_redis_turns_the_cancel_into_a_timeout(running, redis_layer, monkeypatch):
    """redis-py reads under its own timeout; a cancel landing as it expires comes out as TimeoutError.

    The feed must end anyway: a task that swallowed its cancel would keep a closing event loop (the
    one ``async_to_sync`` runs, in tests and management commands) waiting for ever.
    """
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    real_receive = layer.receive
    swallowed = []

    async def receive_like_redis_py(channel):
        try:
            return await real_receive(channel)
        except asyncio.CancelledError:
            swallowed.append(channel)
            raise TimeoutError("Timeout reading from socket") from None

    monkeypatch.setattr(layer, "receive", receive_like_redis_py)

    async def scenario():
        feed = logfeed.join(running.pk)
        assert feed.push, "the Redis layer pushes"
        await asyncio.sleep(0.5)  # the listener is in receive()
        logfeed.leave(feed)
        done, pending = await asyncio.wait(feed._tasks, timeout=5)
        return len(done), len(pending), [t.cancelled() for t in done]

    done, pending, cancelled = async_to_sync(scenario)()
    assert swallowed, "the cancel reached receive() and was turned into a timeout"
    assert (done, pending) == (2, 0), f"{pending} feed task(s) still running 5 s after the feed was closed"
    assert all(cancelled)


def test_a_closed_feed_ends_even_when_redis_drops_the_cancel_and_reads_on(running, redis_layer, monkeypatch):
    """redis-py 8 on Python 3.11 drops a cancel that lands as it finishes sending a command (its
    ``wait_for`` around the socket drain) and goes on to BZPOPMIN, which channels-redis repeats until a
    message comes: seen as a 600 s CI hang.  The receive below does just that; the feed still ends."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    real_receive = layer.receive
    dropped = []

    async def receive_dropping_the_first_cancel(channel):
        try:
            await asyncio.sleep(3600)  # "sending the command"
        except asyncio.CancelledError:
            dropped.append(channel)  # dropped, as redis-py's wait_for does
        return await real_receive(channel)  # on to the blocking read, as if nothing happened

    monkeypatch.setattr(layer, "receive", receive_dropping_the_first_cancel)

    async def scenario():
        feed = logfeed.join(running.pk)
        assert feed.push, "the Redis layer pushes"
        await asyncio.sleep(0.5)  # the listener is in receive()
        logfeed.leave(feed)
        done, pending = await asyncio.wait(feed._tasks, timeout=5)
        return len(done), len(pending)

    done, pending = async_to_sync(scenario)()
    assert dropped, "the first cancel reached receive() and was dropped"
    assert (done, pending) == (2, 0), f"{pending} feed task(s) still running 5 s after the feed was closed"


def test_a_closed_feed_ends_even_when_its_wait_ended_in_the_same_step_as_the_cancel(running):
    """Python 3.11's ``asyncio.wait_for`` returns the result, swallowing the cancel, when the awaited thing
    finished in the same loop step as the cancel came.  The reader's wait for a poke must not keep it
    polling for ever: the loop ``async_to_sync`` closes would wait for it (a 600 s CI hang)."""

    async def scenario():
        feed = logfeed.join(running.pk)
        await asyncio.sleep(0.5)  # the reader has read once and waits for a poke or its next poll
        reads = feed.reads
        feed._poke.set()  # the wait ends in the same step as the cancel below
        logfeed.leave(feed)
        done, pending = await asyncio.wait(feed._tasks, timeout=5)
        return reads, feed.reads, len(pending), [t.cancelled() for t in done]

    reads_before, reads_after, pending, cancelled = async_to_sync(scenario)()
    assert reads_before >= 1
    assert pending == 0, f"{pending} feed task(s) still running 5 s after the feed was closed"
    assert all(cancelled)
    assert reads_after == reads_before, "a closed feed read the database again"


async def _follower_task(comm):
    """The consumer's follower task of the communicator's socket."""
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        if getattr(coro, "__qualname__", "") == "DeploymentLogConsumer._follow":
            return task
    raise AssertionError("no follower task")


def test_a_follower_cancelled_as_its_wait_ends_stops(running, alice):
    """The same race in the socket's follower: a cancel that lands as the feed wakes it still ends it."""

    async def scenario():
        comm = await open_socket(alice, running.pk)
        await receive_message(comm, timeout=10)  # the status: the follower waits for the next change
        follower = await _follower_task(comm)
        feed = logfeed._feeds[running.pk]
        feed._wake()  # the follower's wait ends in the same step as the cancel
        follower.cancel()
        done, pending = await asyncio.wait({follower}, timeout=5)
        state = (len(pending), follower.cancelled() if done else None, running.pk in logfeed._feeds)
        await comm.disconnect()
        return state

    pending, cancelled, feed_left = async_to_sync(scenario)()
    assert pending == 0, "the follower kept following after its cancel"
    assert cancelled
    assert not feed_left, "the follower left the feed"


def test_compressed_and_plain_followers_get_the_same_lines_each_message_compressed_once(running, alice, monkeypatch):
    """``?compress=deflate``: the page's sockets get each ``lines`` message as one zlib stream, made once for
    all of them (and afresh only for a follower that starts inside a message); plain sockets are unchanged."""
    writer = logstream.LogWriter(running.pk, flush_interval=0.001, max_batch=1000)
    for i in range(3000):
        writer.write("out", f"early {i} " + "x" * 60)
    writer.close()
    made = []
    real_deflate = logfeed.deflate

    def counting_deflate(data):
        made.append(data)
        return real_deflate(data)

    monkeypatch.setattr(logfeed, "deflate", counting_deflate)

    async def scenario():
        plain = await open_socket(alice, running.pk)
        packed = [await open_socket(alice, running.pk, compress=True) for _ in range(5)]
        inside = await open_socket(alice, running.pk, after=1500, compress=True)  # starts inside a message
        thread = await asyncio.to_thread(write_then_finish_from, running.pk, 3000, 2000)
        results = await asyncio.gather(*(read_until_end(c) for c in [plain, *packed, inside]))
        await asyncio.to_thread(thread.join)
        for c in [plain, *packed, inside]:
            await c.disconnect()
        return results

    results = async_to_sync(scenario)()
    plain_lines = results[0][0]
    assert [line[0] for line in plain_lines] == list(range(5000))
    for lines, statuses in results[1:6]:
        assert lines == plain_lines and statuses[-1] == "succeeded"
    assert results[6][0] == plain_lines[1501:]
    # Six compressed sockets, and each message was compressed once for all of them.
    assert made and len(made) == len(set(made)), f"{len(made) - len(set(made))} messages compressed twice"
