"""Safe change without SSH: where nodes build (who may choose what), the diff's parsing, the deploy form's
"show the difference first", confirming a diff (pages, API, command) from the side of each persona.

Over SSH, on the testbed: tests/integration/test_change_over_ssh.py.
"""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import PermissionDenied
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from deployments import change, lifecycle
from deployments.audit.models import AuditEvent
from deployments.errors import RequestError
from deployments.models import BuildLocation, Deployment, Tag
from deployments.remote.closure import parse_diff
from tests.support import personas
from tests.support.world import IN_SCOPE, OUT_OF_SCOPE

pytestmark = pytest.mark.django_db

OLD = "/nix/store/" + "a" * 32 + "-nixos-system-web-24.05"
NEW = "/nix/store/" + "b" * 32 + "-nixos-system-web-24.11"
# What _diff_script prints, with `nix store diff-closures` as Nix 2.8 prints it (colours included).
DIFF_OUTPUT = f"""state system-41-link
state {OLD}
state {OLD}
old-kernel /nix/store/{"c" * 32}-linux-6.6.30/bzImage
new-kernel /nix/store/{"d" * 32}-linux-6.6.31/bzImage
old-initrd /nix/store/{"e" * 32}-initrd/initrd
new-initrd /nix/store/{"e" * 32}-initrd/initrd
old-systemd /nix/store/{"f" * 32}-systemd-255.4
new-systemd /nix/store/{"f" * 32}-systemd-255.4
old-size 1000000
new-size 1250000
__NIXOS_PANEL_DIFF__
curl: ∅ → 8.5.0, \x1b[31;1m+512.0 KiB\x1b[0m
hello: 2.12.1 → 2.13
linux: 6.6.30 → 6.6.31, +1.5 KiB
nginx: 1.24.0 → ∅, \x1b[32;1m-300.0 KiB\x1b[0m
python3: 3.11.8, 3.12.2 → 3.12.2
system-path: +64.4 KiB
zlib: ε → 1.3
"""


def test_a_diff_is_parsed_into_added_removed_and_changed_packages_sizes_and_a_reboot_hint():
    diff = parse_diff(DIFF_OUTPUT, NEW)
    assert diff["from"] == OLD and diff["to"] == NEW and diff["generation"] == 41
    p = diff["packages"]
    assert p["added"] == [{"name": "curl", "versions": ["8.5.0"], "size_delta": 512 * 1024}]
    assert p["removed"] == [{"name": "nginx", "versions": ["1.24.0"], "size_delta": -300 * 1024}]
    changed = {e["name"]: e for e in p["changed"]}
    assert changed["hello"] == {"name": "hello", "from": ["2.12.1"], "to": ["2.13"], "size_delta": None}
    assert changed["python3"]["from"] == ["3.11.8", "3.12.2"] and changed["python3"]["to"] == ["3.12.2"]
    assert changed["system-path"] == {"name": "system-path", "from": [], "to": [], "size_delta": round(64.4 * 1024)}
    assert changed["zlib"]["from"] == [""] and changed["zlib"]["to"] == ["1.3"]
    assert diff["size"] == {"before": 1000000, "after": 1250000, "delta": 250000}
    assert diff["reboot"] == ["kernel"]  # the initrd and systemd are the same paths
    lines = change.describe_diff(diff)
    assert lines[0] == "1 added, 1 removed, 5 changed" and "reboot advised: kernel changed" in lines


def test_an_answer_without_the_difference_is_an_error():
    from deployments.remote import RemoteError

    with pytest.raises(RemoteError, match="no closure difference"):
        parse_diff("state \nstate \nstate \n", NEW)


def person(world, name):
    return world.persona(name)


def client_for(user) -> Client:
    c = Client()
    c.force_login(user)
    return c


# -- where a node builds -------------------------------------------------------------------------


def test_a_node_builds_where_it_says_else_where_its_first_tag_says_else_on_itself(world):
    web, db = world.nodes[IN_SCOPE], world.nodes[OUT_OF_SCOPE]
    assert change.effective_location(web).kind == BuildLocation.TARGET
    tag = Tag.objects.get(name="web")
    change.set_build_location(tag, BuildLocation.HOST, db)
    where = change.effective_location(web)
    assert (where.kind, where.host, where.source) == ("host", db, "tag web")
    change.set_build_location(web, BuildLocation.PANEL)
    assert change.effective_location(web).kind == "panel"  # the node beats its tag
    change.set_build_location(web, "")
    assert change.effective_location(web).source == "tag web"


def test_a_node_admin_may_build_on_a_node_they_may_deploy_and_it_is_audited(world):
    admin = personas.role_persona("admin-node", node=world.nodes[IN_SCOPE], tag="web")
    db = world.nodes[OUT_OF_SCOPE]
    personas.grant(admin, "deployer", node=db)
    change.set_build_location(world.nodes[IN_SCOPE], BuildLocation.HOST, db, user=admin)
    event = AuditEvent.objects.filter(action="build_location.changed").latest("seq")
    assert event.outcome == "success" and event.actor_name == "admin-node"
    assert event.details == {
        "before": {"location": "", "build_host": None},
        "after": {"location": "host", "build_host": OUT_OF_SCOPE},
    }


def test_a_node_admin_may_not_build_on_a_node_they_may_not_deploy(world):
    """Building there would hand that machine the node's source and run the build as its login user."""
    admin = personas.role_persona("admin-node", node=world.nodes[IN_SCOPE], tag="web")
    web, db = world.nodes[IN_SCOPE], world.nodes[OUT_OF_SCOPE]
    personas.grant(admin, "viewer", node=db)  # seeing it is not enough
    with pytest.raises(PermissionDenied, match="deploy permission"):
        change.set_build_location(web, BuildLocation.HOST, db, user=admin)
    web.refresh_from_db()
    assert web.build_location == "" and web.build_host is None
    refused = AuditEvent.objects.get(action="build_location.changed", outcome="denied")
    assert refused.actor_name == "admin-node" and refused.details["required"] == "deploy"


def test_a_forged_build_host_in_the_node_page_is_refused_and_audited(world):
    admin = personas.role_persona("admin-node", node=world.nodes[IN_SCOPE], tag="web")
    db = world.nodes[OUT_OF_SCOPE]
    response = client_for(admin).post(
        f"/nodes/{IN_SCOPE}/build-location/", {"location": "host", "build_host": str(db.pk)}
    )
    assert response.status_code == 403
    assert AuditEvent.objects.filter(action="build_location.changed", outcome="denied").count() == 1
    # The page offers only nodes the admin may deploy: not db-1.
    page = client_for(admin).get(f"/nodes/{IN_SCOPE}/").content.decode()
    assert 'id="build-location-form"' in page and f'value="{db.pk}"' not in page


def test_the_node_form_offers_the_build_location_to_its_admin(world, alice):
    page = client_for(alice).get(f"/nodes/{IN_SCOPE}/edit/").content.decode()
    assert 'id="build-location-form"' in page and f'action="/nodes/{IN_SCOPE}/build-location/"' in page
    assert "Where it builds" not in client_for(alice).get("/nodes/new/").content.decode()


def test_the_node_page_sets_a_build_location_for_its_admin(world, alice):
    db = world.nodes[OUT_OF_SCOPE]
    response = client_for(alice).post(
        f"/nodes/{IN_SCOPE}/build-location/", {"location": "host", "build_host": str(db.pk)}, follow=True
    )
    assert f"builds on build host {OUT_OF_SCOPE}" in response.content.decode()
    assert world.nodes[IN_SCOPE].__class__.objects.get(name=IN_SCOPE).build_host == db


def test_a_deployer_sees_the_build_location_but_no_form(world):
    deployer = personas.role_persona("deployer-node", node=world.nodes[IN_SCOPE], tag="web")
    page = client_for(deployer).get(f"/nodes/{IN_SCOPE}/").content.decode()
    assert 'id="build-location"' in page and "build-location-form" not in page
    response = client_for(deployer).post(f"/nodes/{IN_SCOPE}/build-location/", {"location": "panel"})
    assert response.status_code == 403


def test_tag_defaults_need_the_inventory_capability(world):
    admin_all = personas.role_persona("admin-all", node=world.nodes[IN_SCOPE], tag="web")
    with pytest.raises(PermissionDenied):
        change.set_build_location(Tag.objects.get(name="web"), BuildLocation.PANEL, user=admin_all)
    assert Tag.objects.get(name="web").build_location == ""


def test_bad_build_locations_are_refused_with_a_reason(world):
    web, db = world.nodes[IN_SCOPE], world.nodes[OUT_OF_SCOPE]
    with pytest.raises(RequestError, match="needs the build host"):
        change.set_build_location(web, BuildLocation.HOST)
    with pytest.raises(RequestError, match="its own build host"):
        change.set_build_location(web, BuildLocation.HOST, web)
    with pytest.raises(RequestError, match="only used with"):
        change.set_build_location(web, BuildLocation.PANEL, db)
    with pytest.raises(RequestError, match="Unknown build location"):
        change.set_build_location(web, "elsewhere")
    db.host_key = ""
    db.save()
    with pytest.raises(RequestError, match="no pinned host key"):
        change.set_build_location(web, BuildLocation.HOST, db)


def test_the_buildlocation_command_sets_and_says_where_a_node_builds(world, capsys):
    call_command("buildlocation", "--node", IN_SCOPE, "host", "--build-host", OUT_OF_SCOPE)
    call_command("buildlocation", "--node", IN_SCOPE)
    assert f"builds on build host {OUT_OF_SCOPE} (node)" in capsys.readouterr().out
    call_command("buildlocation", "--tag", "web", "panel")
    assert Tag.objects.get(name="web").build_location == "panel"
    with pytest.raises(CommandError) as refused:
        call_command("buildlocation", "--node", IN_SCOPE, "host", "--build-host", OUT_OF_SCOPE, "--as", "bob")
    assert refused.value.returncode == 2


# -- the difference first, and its confirmation ----------------------------------------------------


def test_the_deploy_form_shows_the_difference_first_by_default(world, alice):
    page = client_for(alice).get(f"/nodes/{IN_SCOPE}/").content.decode()
    assert (
        'name="diff"' in page
        and "checked" in page.split('name="diff"')[1].split(">")[0] + page.split('name="diff"')[0].rsplit("<", 1)[1]
    )
    client_for(alice).post(f"/nodes/{IN_SCOPE}/deploy/", {"action": "switch", "diff": "on"})
    assert Deployment.objects.filter(node__name=IN_SCOPE, kind="diff", action="switch").count() == 1


def test_a_difference_is_shown_only_before_an_activation(world, alice):
    with pytest.raises(RequestError, match="not before build"):
        lifecycle.request_deployment(world.nodes[IN_SCOPE], action="build", user=alice, kind="diff")


def finished_diff(world, **fields) -> Deployment:
    values = dict(
        node=world.nodes[IN_SCOPE],
        kind=Deployment.Kind.DIFF,
        action="switch",
        commit_sha=world.finished[IN_SCOPE].commit_sha,
        flake_attr=IN_SCOPE,
        status=Deployment.Status.SUCCEEDED,
        toplevel=NEW,
        diff=parse_diff(DIFF_OUTPUT, NEW),
        finished_at=timezone.now(),
    )
    values.update(fields)
    return Deployment.objects.create(**values)


@pytest.fixture
def resolvable(monkeypatch):
    """The world's commit is not in its repository: resolving a revision gives it back as it is."""
    from deployments import repos

    monkeypatch.setattr(repos, "resolve", lambda repository, revision: revision or "0" * 40)


def test_the_diff_page_shows_the_difference_and_a_deployer_confirms_it(world, resolvable):
    diff = finished_diff(world)
    deployer = personas.role_persona("deployer-node", node=world.nodes[IN_SCOPE], tag="web")
    page = client_for(deployer).get(f"/deployments/{diff.pk}/").content.decode()
    assert "~ hello 2.12.1 → 2.13" in page and "Reboot advised: kernel changed" in page
    assert 'id="confirm-button"' in page
    response = client_for(deployer).post(f"/deployments/{diff.pk}/confirm/")
    activation = Deployment.objects.get(diff_of=diff)
    assert response.status_code == 302 and response["Location"] == f"/deployments/{activation.pk}/"
    assert activation.kind == "activate" and activation.action == "switch" and activation.commit_sha == diff.commit_sha
    requested = AuditEvent.objects.filter(action="deployment.requested").latest("seq")
    assert requested.details["kind"] == "activate" and requested.details["diff_of"] == diff.pk
    # Twice: refused, and the page says so.
    again = client_for(deployer).post(f"/deployments/{diff.pk}/confirm/", follow=True)
    assert "confirmed already" in again.content.decode()
    assert Deployment.objects.filter(diff_of=diff).count() == 1


def test_a_viewer_may_not_confirm_a_diff(world):
    diff = finished_diff(world)
    viewer = personas.role_persona("viewer-node", node=world.nodes[IN_SCOPE], tag="web")
    assert 'id="confirm-button"' not in client_for(viewer).get(f"/deployments/{diff.pk}/").content.decode()
    assert client_for(viewer).post(f"/deployments/{diff.pk}/confirm/").status_code == 403
    assert client_for(viewer).post(f"/api/deployments/{diff.pk}/confirm/").status_code == 403
    assert not Deployment.objects.filter(diff_of=diff).exists()
    assert AuditEvent.objects.filter(action="deployment.requested", outcome="denied").count() == 2


def test_a_failed_or_expired_diff_cannot_be_confirmed(world, alice, resolvable):
    failed = finished_diff(world, status=Deployment.Status.FAILED, toplevel="")
    with pytest.raises(RequestError, match="did not build a system"):
        change.confirm_diff(failed, user=alice)
    old = finished_diff(world, finished_at=timezone.now() - change.DIFF_KEEP * 2)
    with pytest.raises(RequestError, match="older than 24 hours"):
        change.confirm_diff(old, user=alice)
    with pytest.raises(RequestError, match="not a difference"):
        change.confirm_diff(world.finished[IN_SCOPE], user=alice)


def test_the_api_asks_for_a_diff_and_confirms_it_once(world, alice, resolvable):
    c = client_for(alice)
    response = c.post(
        f"/api/nodes/{IN_SCOPE}/deploy/",
        json.dumps({"action": "switch", "diff": True}),
        content_type="application/json",
    )
    assert response.status_code == 201 and response.json()["deployment"]["kind"] == "diff"
    assert (
        c.post(
            f"/api/nodes/{IN_SCOPE}/deploy/", json.dumps({"diff": "yes"}), content_type="application/json"
        ).status_code
        == 400
    )
    Deployment.objects.filter(kind="diff").update(status=Deployment.Status.CANCELLED)
    diff = finished_diff(world)
    first = c.post(f"/api/deployments/{diff.pk}/confirm/", "{}", content_type="application/json")
    assert first.status_code == 201 and first.json()["deployment"]["kind"] == "activate"
    second = c.post(f"/api/deployments/{diff.pk}/confirm/", "{}", content_type="application/json")
    assert second.status_code == 409 and "confirmed already" in second.json()["error"]


def test_the_deploy_command_asks_for_a_diff_and_confirms_it(world, resolvable, capsys):
    call_command("deploy", IN_SCOPE, "--diff")  # queued, not followed: exit 0
    assert Deployment.objects.filter(kind="diff", trigger="cli").count() == 1
    Deployment.objects.filter(kind="diff").update(status=Deployment.Status.CANCELLED)
    diff = finished_diff(world)
    call_command("deploy", "--confirm", str(diff.pk))
    assert Deployment.objects.get(diff_of=diff).trigger == "cli"
    with pytest.raises(SystemExit) as again:
        call_command("deploy", "--confirm", str(diff.pk))
    assert again.value.code == 2 and "confirmed already" in capsys.readouterr().err
    with pytest.raises(CommandError, match="for one NODE"):
        call_command("deploy", "--tag", "web", "--diff")


def test_only_diffs_activations_and_off_node_rebuilds_leave_run_rebuild(world):
    web = world.nodes[IN_SCOPE]
    rebuild = world.finished[IN_SCOPE]
    assert change.runner_for(rebuild, "default") == "default"
    assert change.runner_for(finished_diff(world), "default") != "default"
    other = Deployment(node=web, kind="rollback", action="switch")  # a kind of another module
    change.set_build_location(web, BuildLocation.PANEL)
    assert change.runner_for(other, "default") == "default"
    assert change.runner_for(rebuild, "default") != "default"


# -- one build per (location, commit, attribute) ----------------------------------------------------

BUILT = "/nix/store/" + "9" * 32 + "-nixos-system-web-1-24.11"


@pytest.fixture
def builds(world, monkeypatch):
    """A ChangeRun's build claim with the build itself stood in (it records who built, and succeeds
    unless told otherwise): ``builds.run(deployment)`` → (code, toplevel, log lines)."""
    from deployments.change import ChangeRun, Location, _finish_build

    class Builds:
        def __init__(self):
            self.built_by: list[int] = []
            self.still_there = True

        def run(self, deployment):
            lines = []
            where = Location(BuildLocation.PANEL, None, "node")
            code, toplevel, _ = ChangeRun(deployment)._obtain(
                where, b"", IN_SCOPE, lambda s, line: lines.append(line.decode()), None
            )
            return code, toplevel, lines

    b = Builds()

    def build(self, row, where, archive, attr, on_output, should_cancel):
        b.built_by.append(self.deployment.pk)
        _finish_build(row, BUILT, "")
        row.toplevel = BUILT
        return 0

    monkeypatch.setattr(ChangeRun, "_build", build)
    monkeypatch.setattr(ChangeRun, "_still_built", lambda self, where, row: b.still_there)
    return b


def node_run(world, status=Deployment.Status.RUNNING, **fields) -> Deployment:
    return Deployment.objects.create(
        node=world.nodes[IN_SCOPE], action="switch", commit_sha="1" * 40, flake_attr=IN_SCOPE, status=status, **fields
    )


def test_the_first_deployment_builds_and_the_next_uses_its_build(world, builds):
    first = node_run(world, Deployment.Status.SUCCEEDED)
    assert builds.run(first)[:2] == (0, BUILT)
    second = node_run(world)
    code, toplevel, lines = builds.run(second)
    assert (code, toplevel) == (0, BUILT) and builds.built_by == [first.pk]
    assert f"built on the panel host by deployment #{first.pk}" in lines[0]


def test_a_build_whose_system_is_gone_is_built_again(world, builds):
    first = node_run(world, Deployment.Status.SUCCEEDED)
    builds.run(first)
    builds.still_there = False
    second = node_run(world)
    assert builds.run(second)[:2] == (0, BUILT) and builds.built_by == [first.pk, second.pk]


def test_the_build_of_a_deployment_that_died_is_taken_over(world, builds):
    from deployments.models import BuiltSystem

    dead = node_run(world, Deployment.Status.INTERRUPTED)
    BuiltSystem.objects.create(location="panel", commit_sha="1" * 40, flake_attr=IN_SCOPE, built_by=dead)
    waiter = node_run(world)
    assert builds.run(waiter)[:2] == (0, BUILT) and builds.built_by == [waiter.pk]


def test_a_build_that_failed_after_the_request_fails_its_waiters_and_an_older_failure_is_built_again(world, builds):
    from deployments.models import BuiltSystem

    waiter = node_run(world)
    builder = node_run(world, Deployment.Status.FAILED)
    row = BuiltSystem.objects.create(
        location="panel",
        commit_sha="1" * 40,
        flake_attr=IN_SCOPE,
        built_by=builder,
        status=BuiltSystem.Status.FAILED,
        error_message="nix build exited with code 1 on the panel host",
        finished_at=timezone.now(),
    )
    code, _, lines = builds.run(waiter)
    assert code == 1 and builds.built_by == []
    assert lines == [f"the build by deployment #{builder.pk} failed: nix build exited with code 1 on the panel host"]
    waiter.status = Deployment.Status.FAILED
    waiter.save()
    later = node_run(world)  # requested after that failure: tries again
    assert builds.run(later)[:2] == (0, BUILT) and builds.built_by == [later.pk]
    row.refresh_from_db()
    assert row.status == BuiltSystem.Status.BUILT and row.built_by_id == later.pk
