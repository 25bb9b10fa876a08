"""A real panel for end-to-end tests and the benchmarks: its own data directory (or PostgreSQL
database and Redis prefix), daphne and the qcluster worker as real processes, an HTTP client
that logs in with CSRF like a browser, and a WebSocket log reader."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .net import free_port
from .wait import wait_for

ROOT = Path(__file__).resolve().parents[2]


class Panel:
    """One running panel.  Processes are started with ``start()`` and stopped with ``stop()``."""

    def __init__(self, workdir: Path, *, database_url: str | None = None, redis_url: str | None = None) -> None:
        """``database_url``/``redis_url``: a server of the caller's own (tests/support/services.py);
        by default those of the environment, if any."""
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.token = secrets.token_hex(4)
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "controlpanel.settings",
            "PANEL_DATA_DIR": str(workdir / "data"),
            "PANEL_QUEUE_NAME": f"e2e{self.token}",
            "PANEL_REDIS_PREFIX": f"e2e{self.token}",
            "PANEL_HEARTBEAT_INTERVAL": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
        if database_url is not None:
            self.env["DATABASE_URL"] = database_url
        if redis_url is not None:
            self.env["REDIS_URL"] = redis_url
        self.database_url = self.env.get("DATABASE_URL", "")
        self._pg_db = None
        if self.database_url.startswith("postgres"):
            self._pg_db = f"panel_e2e_{self.token}"
            self._pg_admin(f'CREATE DATABASE "{self._pg_db}"')
            parsed = urllib.parse.urlsplit(self.database_url)
            self.env["DATABASE_URL"] = urllib.parse.urlunsplit(parsed._replace(path="/" + self._pg_db))
        # alice, the superuser persona; a password of this run's own, as the panel listens on the machine.
        self.user = "alice"
        self.password = "e2e-" + secrets.token_urlsafe(12)
        self.manage("migrate", "--verbosity", "0")
        self.manage(
            "shell",
            "-c",
            (
                "from django.contrib.auth import get_user_model;"
                f"get_user_model().objects.create_superuser({self.user!r}, '', {self.password!r})"
            ),
        )

    def _pg_admin(self, sql: str) -> None:
        import psycopg

        parsed = urllib.parse.urlsplit(self.database_url)
        admin = urllib.parse.urlunsplit(parsed._replace(path="/postgres"))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql)

    def manage(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            input=input,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def register_nodes(self, nodes: list[tuple[str, str, object]], *, repo_path: Path, tags: tuple = ()) -> None:
        """Register testbed nodes as an operator would, with the management commands (one process).

        ``nodes`` holds (name, flake attribute, testbed node), each tagged ``tags``.  Each host key is
        pinned only if the node presents the fingerprint known out of band (the testbed's key).
        """
        tag_args = "".join(f", '--tag', {t!r}" for t in tags)
        from deployments.remote import openssh_fingerprint

        calls = [f"call_command('addrepo', 'fleet', {str(repo_path)!r}, '--branch', 'main')"]
        for name, attr, tb_node in nodes:
            keyfile = self.workdir / f"{name}.key"
            keyfile.write_text(tb_node.client_key_private)
            keyfile.chmod(0o600)
            fingerprint = openssh_fingerprint(tb_node.host_key_public)
            calls += [
                f"call_command('addcredential', '{name}-key', '--key-file', {str(keyfile)!r})",
                f"call_command('addnode', {name!r}, {tb_node.host!r}, '--port', '{tb_node.port}', '--attr', {attr!r},"
                f" '--repo', 'fleet', '--credential', '{name}-key'{tag_args})",
                f"call_command('hostkey', {name!r}, '--pin', {fingerprint!r})",
            ]
        self.manage("shell", "-c", "from django.core.management import call_command\n" + "\n".join(calls))

    def register_node(self, tb_node, *, name: str, attr: str, repo_path: Path) -> None:
        self.register_nodes([(name, attr, tb_node)], repo_path=repo_path)

    # -- processes --------------------------------------------------------------
    def start(self, *, daphne: bool = True, worker: bool = True) -> None:
        if daphne and "daphne" not in self.procs:
            # The command runpanel runs (no Server banner).
            from deployments.management.commands.runpanel import daphne_command

            self.procs["daphne"] = self._spawn("daphne", daphne_command("127.0.0.1", self.port))
            wait_for(self._http_up, timeout=30, what="daphne to listen")
        if worker and "worker" not in self.procs:
            self.procs["worker"] = self._spawn("worker", [sys.executable, str(ROOT / "manage.py"), "qcluster"])

    def start_qcluster(self, name: str) -> subprocess.Popen:
        """One more ``manage.py qcluster`` (its own process group, log ``<name>.log``) on the same broker and
        database; ``kill(name)`` kills its whole group."""
        if name in self.procs:
            raise ValueError(f"{name} is already running")
        proc = self.procs[name] = self._spawn(name, [sys.executable, str(ROOT / "manage.py"), "qcluster"])
        return proc

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        # Own process group: killing the worker kills its django-q2 children too.
        return subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _http_up(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/login/", timeout=1)
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            # SIGTERM to the leader only: it shuts its own children down in order.
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        if self._pg_db:
            self._pg_admin(f'DROP DATABASE IF EXISTS "{self._pg_db}" WITH (FORCE)')
            self._pg_db = None

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}" for p in self.workdir.glob("*.log")
        )


class Browser:
    """An HTTP client with cookies and CSRF, like a logged-in browser tab."""

    def __init__(self, panel: Panel) -> None:
        self.panel = panel
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def request(
        self, method: str, path: str, data: dict | None = None, *, csrf: bool = True, json_body: object | None = None
    ) -> tuple[int, dict, bytes]:
        headers = {"Referer": self.panel.url + "/", "Origin": self.panel.url}
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            if csrf:
                data = {**data, "csrfmiddlewaretoken": self.cookie("csrftoken") or ""}
            body = urllib.parse.urlencode(data).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if csrf and method == "POST":
            headers["X-CSRFToken"] = self.cookie("csrftoken") or ""
        req = urllib.request.Request(self.panel.url + path, data=body, method=method, headers=headers)
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def login(self, username: str | None = None, password: str | None = None) -> None:
        """Log in as ``username`` (the panel's superuser by default)."""
        self.request("GET", "/login/")
        status, headers, _ = self.request(
            "POST", "/login/", {"username": username or self.panel.user, "password": password or self.panel.password}
        )
        assert status == 302, f"login failed with {status}"

    def deploy(self, node: str, action: str = "switch") -> int:
        status, headers, body = self.request("POST", f"/nodes/{node}/deploy/", {"action": action, "revision": ""})
        assert status == 302 and "/deployments/" in headers["Location"], (status, body[:500])
        return int(re.search(r"/deployments/(\d+)/", headers["Location"]).group(1))

    def ws_headers(self) -> dict[str, str]:
        return {"Cookie": f"sessionid={self.cookie('sessionid')}", "Origin": self.panel.url}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


async def read_log(
    panel: Panel,
    browser: Browser,
    deployment_id: int,
    *,
    after: int = -1,
    stop_after_lines: int | None = None,
    timeout: float = 120,
) -> dict:
    """Follow the deployment's WebSocket; return {'lines': [...], 'statuses': [...], 'ended': bool, 'close_code'}."""
    import asyncio

    import websockets

    url = f"ws://127.0.0.1:{panel.port}/ws/deployments/{deployment_id}/log/?after={after}"
    out = {"lines": [], "statuses": [], "ended": False, "close_code": None, "received_at": []}
    try:
        ws = await websockets.connect(url, additional_headers=browser.ws_headers(), max_size=None)
    except websockets.InvalidStatus as exc:
        # Refused before the handshake completed (the consumer closed in connect()).
        out["close_code"] = exc.response.status_code
        return out
    async with ws:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=deadline - time.monotonic()))
                if msg["type"] == "lines":
                    now = time.time()
                    out["lines"].extend(msg["lines"])
                    out["received_at"].extend([now] * len(msg["lines"]))
                    if stop_after_lines is not None and len(out["lines"]) >= stop_after_lines:
                        return out
                elif msg["type"] == "status":
                    out["statuses"].append(msg)
                elif msg["type"] == "end":
                    out["ended"] = True
                    return out
        except websockets.ConnectionClosed as exc:
            out["close_code"] = exc.rcvd.code if exc.rcvd else None
    return out
