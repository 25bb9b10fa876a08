"""The sync status and notifications in a real panel: the qcluster runs the refresh task and delivers a
failed deployment's notification to a real HTTP server, off the request path."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from tests.support.panel import Browser, Panel
from tests.support.testbed import NodeConfigSpec, make_flake_repo
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def receiver():
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()
    server.server_close()


def test_a_real_worker_refreshes_the_fleet_and_notifies_a_failed_deployment(tmp_path, testbed, receiver):
    url, received = receiver
    repo = tmp_path / "flake"
    make_flake_repo(repo, {"devm": NodeConfigSpec(), "failing": NodeConfigSpec(activation_exit=4)})
    panel = Panel(tmp_path / "panel")
    panel.env["PANEL_NOTIFY_ALLOWED_NETWORKS"] = "127.0.0.0/8"  # the receiver runs on this machine
    try:
        ok_name, bad_name = f"sy-ok-{testbed.token}", f"sy-bad-{testbed.token}"
        panel.register_nodes(
            [(ok_name, "devm", testbed.add_node(ok_name)), (bad_name, "failing", testbed.add_node(bad_name))],
            repo_path=repo,
        )
        panel.manage(
            "shell",
            "-c",
            "from deployments.access.models import Team, Grant\n"
            "from deployments.sync.models import Subscription\n"
            "from deployments.sync import notify\n"
            "t = Team.objects.create(name='ops')\n"
            "Grant.objects.create(team=t, role='viewer', scope='all')\n"
            f"notify.save_subscription(Subscription(team=t, name='hook', kind='webhook', events=['deployment.failed']),"
            f" target={url + '/hook/secret'!r}, user=None)\n",
        )
        panel.start()
        browser = Browser(panel)
        browser.login()
        deployment = browser.deploy(bad_name)
        wait_for(lambda: received, timeout=60, what="the failed deployment's notification")
        [(path, doc)] = received
        assert path == "/hook/secret"
        assert (doc["kind"], doc["node"], doc["object"]["id"]) == ("deployment.failed", bad_name, str(deployment))

        # The scheduled job's function, run by the real worker.
        panel.manage(
            "shell", "-c", "from django_q.tasks import async_task\nasync_task('deployments.sync.status.refresh_fleet')"
        )

        def statuses():
            out = panel.manage(
                "shell", "-c",
                "import json\nfrom deployments.sync.models import NodeSync\n"
                "print(json.dumps(dict(NodeSync.objects.values_list('node__name', 'status'))))",
            ).stdout.strip().splitlines()  # fmt: skip
            found = json.loads(out[-1]) if out else {}
            return found if len(found) == 2 else None
            return found if len(found) == 2 else None

        found = wait_for(statuses, timeout=60, interval=1, what="the worker's refresh")
        # The good node, never deployed by the panel, runs the testbed's initial system: behind its branch.
        # The failing one runs the branch head's system: switch-to-configuration had switched
        # /run/current-system before a unit failed (exit 4), as on NixOS: in sync, though its deployment failed.
        assert found == {ok_name: "behind", bad_name: "in_sync"}
        status, _, body = browser.request("GET", "/?sync=behind")
        assert status == 200 and ok_name in body.decode() and bad_name not in body.decode()
    finally:
        panel.stop()
