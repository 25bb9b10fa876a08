"""Response headers: a Content-Security-Policy with no inline code, no-store on everything that is not a
static file, an HttpOnly CSRF cookie, HSTS and Secure cookies behind a TLS proxy, no Server banner."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client, override_settings

from deployments.management.commands.runpanel import daphne_command
from deployments.models import Deployment

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def signed_in(alice):
    c = Client()
    c.force_login(alice)
    return c


def csp(response) -> dict[str, list[str]]:
    policy = response["Content-Security-Policy"]
    return {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}


def test_pages_carry_a_policy_without_inline_code(signed_in):
    policy = csp(signed_in.get("/"))
    assert policy["default-src"] == ["'none'"]
    for directive in ("script-src", "style-src", "connect-src"):
        assert policy[directive] == ["'self'"], directive
    assert policy["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in json.dumps(policy) and "'unsafe-eval'" not in json.dumps(policy)


def test_no_template_holds_inline_script_or_style():
    # The policy above would block them; data blocks (json_script) are not code and stay allowed.
    found = []
    for path in (ROOT / "templates").rglob("*.html"):
        text = path.read_text()
        for m in re.finditer(r"<script\b([^>]*)>", text):
            if "src=" not in m.group(1) and 'type="application/json"' not in m.group(1):
                found.append(f"{path.name}: inline <script>")
        if re.search(r"<style\b", text):
            found.append(f"{path.name}: <style>")
        if re.search(r"\sstyle=", text):
            found.append(f"{path.name}: style= attribute")
        if re.search(r"\son[a-z]+=", text) or "javascript:" in text:
            found.append(f"{path.name}: inline event handler or javascript: URL")
    assert not found, found


@pytest.mark.parametrize("url", ["/", "/deployments/", "/login/", "/api/nodes/", "/audit/", "/nope/"])
def test_every_answer_is_no_store(signed_in, url):
    assert "no-store" in signed_in.get(url)["Cache-Control"]


def test_the_log_download_is_no_store(signed_in, inventory):
    d = Deployment.objects.create(node=inventory["node"], action="switch", commit_sha="0" * 40, flake_attr="devm")
    response = signed_in.get(f"/deployments/{d.pk}/log.txt")
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    assert "no-store" in signed_in.get(f"/api/deployments/{d.pk}/log/")["Cache-Control"]


def test_static_files_stay_cacheable(client):
    response = client.get("/static/panel.js")
    assert response.status_code == 200
    assert "no-store" not in response.get("Cache-Control", "")


def test_the_csrf_cookie_is_http_only(client):
    response = client.get("/login/")
    assert response.cookies["csrftoken"]["httponly"]


def test_the_pages_scripts_do_not_read_cookies():
    # What makes an HttpOnly CSRF cookie possible: forms carry the token.
    for path in (ROOT / "static").glob("*.js"):
        assert "document.cookie" not in path.read_text(), path.name


def _settings_with(env: dict) -> dict:
    """The project's settings as a fresh process with ``env`` would read them."""
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        "print(json.dumps({k: getattr(s, k) for k in "
        "('SECURE_HSTS_SECONDS', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_PROXY_SSL_HEADER', "
        "'BEHIND_TLS_PROXY', 'CSRF_COOKIE_HTTPONLY')}))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANEL_") and k != "DJANGO_SETTINGS_MODULE"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "controlpanel.settings", "PANEL_DATA_DIR": "/nonexistent", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_behind_a_tls_proxy_hsts_and_secure_cookies_are_on():
    s = _settings_with({"PANEL_BEHIND_TLS_PROXY": "true"})
    assert s["SECURE_HSTS_SECONDS"] >= 180 * 24 * 3600
    assert s["SESSION_COOKIE_SECURE"] and s["CSRF_COOKIE_SECURE"] and s["CSRF_COOKIE_HTTPONLY"]
    assert s["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]


def test_without_a_proxy_neither_hsts_nor_secure_cookies():
    s = _settings_with({})
    assert s["SECURE_HSTS_SECONDS"] == 0 and not s["SESSION_COOKIE_SECURE"] and s["SECURE_PROXY_SSL_HEADER"] is None


@override_settings(SECURE_HSTS_SECONDS=3600, SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))
def test_hsts_is_sent_on_https_through_the_proxy(client):
    response = client.get("/login/", HTTP_X_FORWARDED_PROTO="https")
    assert response["Strict-Transport-Security"] == "max-age=3600"


def test_daphne_runs_without_a_server_banner_and_trusts_proxy_headers_only_behind_the_proxy(settings):
    settings.BEHIND_TLS_PROXY = False
    plain = daphne_command("127.0.0.1", 8000)
    assert "--no-server-name" in plain and "--proxy-headers" not in plain
    settings.BEHIND_TLS_PROXY = True
    assert "--proxy-headers" in daphne_command("127.0.0.1", 8000)


def test_the_nixos_web_command_has_no_server_banner_either():
    assert "--no-server-name" in (ROOT / "nix" / "bin" / "nixos-panel-web.in").read_text()
