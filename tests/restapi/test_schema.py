"""The OpenAPI schema validates without warnings, describes every route, and the documentation page
needs nothing from another site (the Content-Security-Policy allows none)."""

from __future__ import annotations

import re

import pytest
import yaml
from django.core.management import call_command
from django.test import Client

from .test_matrix import api_routes


def test_the_schema_validates_without_warnings(db, tmp_path):
    out = tmp_path / "schema.yaml"
    # --fail-on-warn: a view the generator cannot describe (an unknown serializer, an unresolved
    # authenticator, a guessed path parameter) fails here.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    schema = yaml.safe_load(out.read_text())
    assert schema["openapi"].startswith("3.") and schema["info"]["title"]
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token: npt_<prefix>_<secret>",
    }


def test_the_schema_describes_every_api_route_and_method(db):
    response = Client().get("/api/v1/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json()
    described = {(path, method.upper()) for path, ops in schema["paths"].items() for method in ops}
    methods_per_route = {}
    for route in api_routes():
        name, method = route.split(" ")
        methods_per_route.setdefault(name, set()).add(method)
    assert sum(len(m) for n, m in methods_per_route.items() if n not in ("schema", "docs")) == len(described)
    as_yaml = yaml.safe_load(Client().get("/api/v1/schema/").content)
    assert as_yaml == Client().get("/api/v1/schema/?format=json").json() == schema
    stream = schema["paths"]["/api/v1/deployments/{id}/log/stream/"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream
    deploy = schema["paths"]["/api/v1/deployments/"]["post"]
    assert set(deploy["responses"]) >= {"201", "400", "401", "403", "404", "409"}


@pytest.mark.parametrize("path", ["/api/v1/docs/"])
def test_the_documentation_page_loads_only_the_panels_own_files(db, path):
    response = Client().get(path)
    assert response.status_code == 200
    html = response.content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith("/") and not s.startswith("//") for s in sources), sources
    assert "<style" not in html and re.search(r"<script>", html) is None  # no inline code: the CSP refuses it
    assert "script-src 'self'" in response["Content-Security-Policy"]
    script = Client().get(path + "?script=")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.content.decode()
