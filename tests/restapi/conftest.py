"""Fixtures for the REST API tests: clients that authenticate with a token or with the session."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from deployments.restapi import tokens


class ApiClient:
    """A Django test client for ``/api/v1/``: JSON bodies; a Bearer token if given."""

    def __init__(self, token: str | None = None, *, client: Client | None = None) -> None:
        self.client = client or Client()
        self.headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}

    def get(self, url: str, **params):
        return self.client.get(url, params, **self.headers)

    def post(self, url: str, data=None, *, raw: bytes | None = None, content_type: str = "application/json"):
        body = raw if raw is not None else json.dumps(data if data is not None else {})
        return self.client.generic("POST", url, body, content_type=content_type, **self.headers)

    def send(self, method: str, url: str, data=None):
        """Any method with a JSON body (PATCH, DELETE)."""
        body = json.dumps(data) if data is not None else ""
        return self.client.generic(method, url, body, content_type="application/json", **self.headers)


def token_for(user, name: str = "script", **kwargs) -> str:
    """A new API token of ``user`` (the whole text)."""
    return tokens.create_token(user, name=name, **kwargs)[1]


@pytest.fixture
def token_client():
    """``token_client(user)``: an ApiClient with a new token of ``user``."""
    return lambda user, **kwargs: ApiClient(token_for(user, **kwargs))


@pytest.fixture
def session_client():
    """``session_client(user)``: an ApiClient signed in as ``user`` (the test client skips CSRF)."""

    def make(user):
        client = Client()
        client.force_login(user)
        return ApiClient(client=client)

    return make
