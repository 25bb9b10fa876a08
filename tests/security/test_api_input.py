"""The JSON API refuses hostile bodies with a clean 4xx and a JSON error, never a 500."""

import json

import pytest
from django.test import Client

from deployments.models import Deployment
from deployments.views.api import MAX_BODY_BYTES, MAX_JSON_DEPTH, json_depth

pytestmark = pytest.mark.django_db

DEPLOY = "/api/nodes/web1/deploy/"


@pytest.fixture
def api(alice):
    c = Client()
    c.force_login(alice)
    return c


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    return body


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_it_refuses_json_sent_as_anything_but_application_json(api, inventory, content_type):
    response = api.generic("POST", DEPLOY, b'{"action": "switch"}', content_type=content_type)
    assert "application/json" in assert_json_error(response, 415)["error"]
    assert not Deployment.objects.exists()


def test_it_refuses_a_multipart_body_with_415_not_500(api, inventory):
    response = api.post(DEPLOY, {"action": "switch"})  # the test client sends multipart/form-data
    assert_json_error(response, 415)
    assert not Deployment.objects.exists()


def test_it_refuses_deeply_nested_json_with_400(api, inventory):
    body = '{"action": ' + "[" * 5000 + "]" * 5000 + "}"  # json.loads alone fails with RecursionError
    response = api.post(DEPLOY, body, content_type="application/json")
    assert "nested deeper" in assert_json_error(response, 400)["error"]


def test_nesting_just_inside_the_limit_reaches_the_field_check(api, inventory):
    body = json.dumps({"action": json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))})
    assert (
        "must be a string" in assert_json_error(api.post(DEPLOY, body, content_type="application/json"), 400)["error"]
    )


def test_it_refuses_a_body_over_the_limit_with_413(api, inventory):
    body = json.dumps({"action": "switch", "revision": "a" * MAX_BODY_BYTES})
    assert_json_error(api.post(DEPLOY, body, content_type="application/json"), 413)


@pytest.mark.parametrize(
    "body,message",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"action": "switch"', "malformed JSON"),
        (b"[]", "JSON object"),
        (b'"switch"', "JSON object"),
        (b'{"action": "switch", "extra": 1}', "unknown field"),
        (b'{"action": 1}', "must be a string"),
        (b'{"revision": {"$ne": ""}}', "must be a string"),
        (b'{"action": "switch", "revision": "main\\u0000"}', "invalid input"),
    ],
)
def test_it_says_what_is_wrong_with_a_body(api, inventory, body, message):
    response = api.generic("POST", DEPLOY, body, content_type="application/json")
    assert message in json.dumps(assert_json_error(response, 400))
    assert not Deployment.objects.exists()


def test_no_body_at_all_means_the_defaults(api, inventory):
    assert api.generic("POST", DEPLOY).status_code == 201


def test_cancel_also_takes_only_json(api, inventory):
    d = Deployment.objects.create(node=inventory["node"], action="switch", commit_sha="0" * 40, flake_attr="devm")
    assert_json_error(api.post(f"/api/deployments/{d.pk}/cancel/", {"x": "y"}), 415)
    assert api.post(f"/api/deployments/{d.pk}/cancel/", "{}", content_type="application/json").status_code == 200


@pytest.mark.parametrize(
    "method,url,status",
    [
        ("GET", "/api/no-such-thing/", 404),
        ("GET", "/api/nodes/no-such-node/deploy/", 405),
        ("DELETE", "/api/nodes/", 405),
        ("GET", "/api/deployments/99999/", 404),
        ("GET", "/api/deployments/1/log/?after=x", 404),
    ],
)
def test_every_api_4xx_has_a_json_body(api, inventory, method, url, status):
    assert_json_error(api.generic(method, url), status)


def test_a_405_keeps_its_allow_header(api, inventory):
    response = api.get(DEPLOY)
    assert_json_error(response, 405)
    assert response["Allow"] == "POST"


def test_a_csrf_failure_on_the_api_is_json(alice, inventory):
    c = Client(enforce_csrf_checks=True)
    c.force_login(alice)
    assert "CSRF" in assert_json_error(c.post(DEPLOY, "{}", content_type="application/json"), 403)["error"]


def test_a_csrf_failure_on_a_page_stays_a_page(alice, inventory):
    c = Client(enforce_csrf_checks=True)
    c.force_login(alice)
    response = c.post("/nodes/web1/deploy/", {"action": "switch"})
    assert response.status_code == 403 and response["Content-Type"].startswith("text/html")


def test_json_depth_skips_brackets_inside_strings():
    assert json_depth('{"a": "[[[[[[[[[[[[", "b": [1, {"c": "\\"]]]"}]}') == 3
    assert json_depth("") == 0
