"""End to end through the REST API: a token made from a signed-in session (CSRF), a deployment requested
with it on a testbed node, and its log followed as server-sent events from daphne while it runs."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import pytest

from .conftest import CHATTY_LINES

pytestmark = pytest.mark.e2e


def _api(panel, token: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", panel.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, json.dumps(body) if body is not None else None, headers)
    response = conn.getresponse()
    data = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, data


def _sse(response):
    """(event, data) pairs as they arrive."""
    block: dict[str, str] = {}
    while True:
        raw = response.readline()
        if not raw:
            return
        line = raw.decode().rstrip("\n")
        if not line:
            if "event" in block:
                yield block["event"], json.loads(block["data"])
            block = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            block[name] = value


def test_a_token_deploys_and_follows_the_log_as_it_is_written(panel, browser):
    status, _, body = browser.request("POST", "/api/v1/tokens/", json_body={"name": "e2e script"})
    assert status == 201, body[:300]
    token = json.loads(body)["token"]
    # Without the CSRF token the same session is refused.
    status, _, _ = browser.request("POST", "/api/v1/tokens/", json_body={"name": "forged"}, csrf=False)
    assert status == 403

    status, deployment = _api(panel, token, "POST", "/api/v1/deployments/", {"node": "chatty"})
    assert status == 201, deployment
    pk = deployment["id"]

    conn = http.client.HTTPConnection("127.0.0.1", panel.port, timeout=60)
    conn.request(
        "GET",
        f"/api/v1/deployments/{pk}/log/stream/?{urllib.parse.urlencode({'after': -1})}",
        headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
    )
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    lines, end, status_at_first_line = [], None, None
    started = time.monotonic()
    for name, data in _sse(response):
        if name == "line":
            if not lines:
                # The first line arrives while the run goes on: the stream is not read whole first.
                status_at_first_line = _api(panel, token, "GET", f"/api/v1/deployments/{pk}/")[1]["status"]
            lines.append(data)
        elif name == "end":
            end = data
            break
        assert time.monotonic() - started < 120, "the stream did not end"
    conn.close()
    assert status_at_first_line == "running", panel.logs()
    assert end == {"status": "succeeded", "next_after": lines[-1]["seq"]}, panel.logs()
    assert [line["seq"] for line in lines] == list(range(len(lines))), "gap-free, in order, no duplicates"
    assert sum(" paced line " in line["text"] for line in lines) == CHATTY_LINES
    status, final = _api(panel, token, "GET", f"/api/v1/deployments/{pk}/")
    assert final["line_count"] == len(lines) and final["status"] == "succeeded"
    # The paged log says the same.
    status, page = _api(panel, token, "GET", f"/api/v1/deployments/{pk}/log/?after=-1&limit=5000")
    assert [line["seq"] for line in page["lines"]] == [line["seq"] for line in lines] and page["finished"]
