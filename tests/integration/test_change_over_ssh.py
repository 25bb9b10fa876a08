"""Safe change over real SSH to NixOS-like testbed nodes: each build location (the node, the panel host, a
build host) ending with the node running the new system, a rollout that builds once on its build host, the
diff and its confirmation, and the errors: a build host that is down, a build that fails there, a target
whose disk fills during the copy, a diff whose system vanished before its confirmation.

The worker runs in-process (``tasks.run_deployment``), as in test_deploy_over_ssh.py.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.core.exceptions import PermissionDenied
from django.db import connection

from deployments import change, lifecycle, logstream, rollouts, tasks
from deployments.audit.models import AuditEvent
from deployments.errors import RequestError
from deployments.models import BuildLocation, BuiltSystem, Deployment, Tag
from deployments.remote.build import GCROOTS
from deployments.rollouts import Options
from tests.support.testbed import NodeConfigSpec, commit_change, make_flake_repo

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def _change_repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("change-flake") / "flake"
    configs = {
        "devm": NodeConfigSpec(version_tag="initial"),
        "broken": NodeConfigSpec(build_exit=3),
    }
    return path, make_flake_repo(path, configs)


@pytest.fixture
def flake_repo(tmp_path, _change_repo):
    """A copy of this module's flake (devm as the nodes start, and broken, whose build fails)."""
    import shutil

    template, sha = _change_repo
    path = tmp_path / "flake"
    shutil.copytree(template, path, symlinks=True)
    return path, sha


def new_version(flake_repo, **changes) -> str:
    """A commit whose devm differs from the testbed nodes' initial system (hello 2.12.1, nginx 1.24.0, kernel
    6.6.30): hello 2.13, curl added, nginx gone, another kernel (a reboot hint); ``changes`` override."""
    spec = dict(packages={"hello": "2.13", "curl": "8.5.0"}, kernel_version="6.6.31", payload_kib=64)
    spec.update(changes)
    return commit_change(flake_repo[0], "devm", **spec)


def run(d: Deployment) -> Deployment:
    tasks.run_deployment(d.pk)
    d.refresh_from_db()
    return d


def deploy(node, action="switch", revision="", kind=Deployment.Kind.REBUILD) -> Deployment:
    return run(lifecycle.request_deployment(node, action=action, revision=revision, kind=kind))


def log_text(d: Deployment) -> str:
    return "\n".join(text for _, _, text in logstream.lines_after(d.pk))


def roots(tb) -> list[str]:
    out = tb.run(f"ls {GCROOTS} 2>/dev/null || true").stdout
    return sorted(out.split())


@pytest.fixture
def build_host(add_node):
    host, tb_host = add_node()
    return host, tb_host


def test_a_node_that_builds_on_a_build_host_runs_the_system_copied_from_it(add_node, build_host, flake_repo):
    node, tb = add_node()
    host, tb_host = build_host
    change.set_build_location(node, BuildLocation.HOST, host)
    sha = new_version(flake_repo)
    before = tb.current_system()

    d = deploy(node, revision=sha)

    assert d.status == Deployment.Status.SUCCEEDED, (d.error_message, log_text(d))
    assert d.built_on == f"host:{host.name}"
    assert d.toplevel == tb.current_system() != before
    assert "hello-2.13" in tb.run(f"nix-store -qR {d.toplevel}").stdout
    # Built on the build host (it has the system, with a GC root); the node only activated it.
    assert tb_host.run(f"nix-store --check-validity {d.toplevel}").returncode == 0
    assert [r for r in roots(tb_host) if r.startswith("built-")]
    assert tb.rebuild_runs() == []  # no nixos-rebuild ran on the node
    text = log_text(d)
    assert "build -L --out-link /nix/var/nix/gcroots/nixos-panel/built-" in text
    assert "copied " in text and " paths (" in text
    assert tb.generations()[-1] == d.generation_after and d.generation_after == d.generation_before + 1
    assert tb.system_profile() == d.toplevel
    assert roots(tb) == []  # the copy's root went once the profile held the system


def test_a_copy_sends_only_the_paths_the_node_lacks(add_node, build_host, flake_repo):
    node, tb = add_node()
    host, _ = build_host
    change.set_build_location(node, BuildLocation.HOST, host)
    first = deploy(node, revision=new_version(flake_repo))
    assert first.status == Deployment.Status.SUCCEEDED, first.error_message
    second = deploy(node, revision=new_version(flake_repo, packages={"hello": "2.14", "curl": "8.5.0"}))
    assert second.status == Deployment.Status.SUCCEEDED, second.error_message
    closure = len(tb.run(f"nix-store -qR {second.toplevel}").stdout.split())
    # toplevel, system-path and hello-2.14 are new; curl, the kernel, initrd, systemd are on the node already.
    assert f"copied 3 of {closure} paths" in log_text(second)


def test_a_node_that_builds_on_the_panel_host_runs_the_system_copied_from_it(
    add_node, flake_repo, monkeypatch, tmp_path
):
    registry = tmp_path / "registry.json"
    registry.write_text('{"flakes":[],"version":2}\n')
    monkeypatch.setenv(
        "NIX_CONFIG",
        "build-users-group =\nsandbox = false\nsubstituters =\n"
        f"flake-registry = {registry}\nexperimental-features = nix-command flakes\nwarn-dirty = false",
    )
    node, tb = add_node()
    tag = Tag.objects.create(name="panel-built")
    node.tags.add(tag)
    change.set_build_location(tag, BuildLocation.PANEL)  # the tag's default: the node has none of its own
    sha = new_version(flake_repo)

    d = deploy(node, revision=sha)

    try:
        assert d.status == Deployment.Status.SUCCEEDED, (d.error_message, log_text(d))
        assert d.built_on == "panel"
        assert tb.current_system() == d.toplevel
        assert "running on the panel host: nix" in log_text(d)
        assert tb.rebuild_runs() == []
    finally:
        for row in BuiltSystem.objects.all():
            link = f"{GCROOTS}/built-{row.pk}"
            if os.path.islink(link):
                os.unlink(link)


def test_a_diff_on_the_node_shows_the_change_and_its_confirmation_switches_to_exactly_that_system(
    add_node, flake_repo, alice
):
    node, tb = add_node()
    before = tb.current_system()
    sha = new_version(flake_repo)
    # A diff nobody confirmed two days ago, and one of an hour ago: the first's root goes, the second's stays.
    tb.run(
        f"mkdir -p {GCROOTS} && ln -s {before} {GCROOTS}/diff-old && touch -h -d '2 days ago' {GCROOTS}/diff-old"
        f" && ln -s {before} {GCROOTS}/diff-recent && touch -h -d '1 hour ago' {GCROOTS}/diff-recent"
    )

    diff = deploy(node, revision=sha, kind=Deployment.Kind.DIFF)

    assert diff.status == Deployment.Status.SUCCEEDED, (diff.error_message, log_text(diff))
    assert tb.current_system() == before and tb.generations() == [1]  # nothing switched
    packages = diff.diff["packages"]
    assert {"name": "curl", "versions": ["8.5.0"], "size_delta": None} in packages["added"]
    assert packages["removed"] == [{"name": "nginx", "versions": ["1.24.0"], "size_delta": None}]
    changed = {e["name"]: (e["from"], e["to"]) for e in packages["changed"]}
    assert changed["hello"] == (["2.12.1"], ["2.13"])
    assert changed["linux"] == (["6.6.30"], ["6.6.31"])
    assert sorted(diff.diff["reboot"]) == ["initrd", "kernel"]  # systemd is the same store path
    assert diff.diff["size"]["delta"] > 64 * 1024
    assert diff.diff["from"] == before and diff.diff["to"] == diff.toplevel
    event = AuditEvent.objects.get(action="deployment.diffed", object_id=str(diff.pk))
    assert event.details["reboot"] == diff.diff["reboot"] and event.details["counts"]["changed"] == len(
        packages["changed"]
    )
    assert roots(tb) == sorted([f"diff-{diff.pk}", "diff-recent"])  # the built system waits under a GC root

    activation = run(change.confirm_diff(diff, user=alice))

    assert activation.status == Deployment.Status.SUCCEEDED, (activation.error_message, log_text(activation))
    assert activation.kind == Deployment.Kind.ACTIVATE and activation.diff_of_id == diff.pk
    assert tb.current_system() == diff.toplevel == activation.toplevel
    assert "no new evaluation" in log_text(activation) and "nix build" not in log_text(activation)
    assert roots(tb) == ["diff-recent"]
    with pytest.raises(RequestError, match="confirmed already"):
        change.confirm_diff(diff, user=alice)


def test_a_diff_off_the_node_is_built_there_and_copied_before_it_is_compared(add_node, build_host, flake_repo, alice):
    node, tb = add_node()
    host, tb_host = build_host
    change.set_build_location(node, BuildLocation.HOST, host)
    diff = deploy(node, revision=new_version(flake_repo), kind=Deployment.Kind.DIFF)
    assert diff.status == Deployment.Status.SUCCEEDED, (diff.error_message, log_text(diff))
    assert "copied " in log_text(diff)
    assert tb.run(f"nix-store --check-validity {diff.toplevel}").returncode == 0
    assert tb.generations() == [1]
    activation = run(change.confirm_diff(diff, user=alice))
    assert activation.status == Deployment.Status.SUCCEEDED, activation.error_message
    assert tb.current_system() == diff.toplevel


def test_confirming_a_diff_whose_system_vanished_from_the_node_is_a_clear_error(add_node, flake_repo, alice):
    node, tb = add_node()
    before = tb.current_system()
    diff = deploy(node, revision=new_version(flake_repo), kind=Deployment.Kind.DIFF)
    assert diff.status == Deployment.Status.SUCCEEDED, diff.error_message
    tb.run(f"rm -f {GCROOTS}/diff-{diff.pk} && nix-store --delete {diff.toplevel}")

    activation = run(change.confirm_diff(diff, user=alice))

    assert activation.status == Deployment.Status.ERROR
    assert (
        "is no longer in the store" in activation.error_message
        and "request the difference again" in activation.error_message
    )
    assert tb.current_system() == before and tb.generations() == [1]


def test_confirming_a_diff_needs_deploy_on_its_node(add_node, flake_repo, bob):
    node, tb = add_node()
    diff = deploy(node, revision=new_version(flake_repo), kind=Deployment.Kind.DIFF)
    assert diff.status == Deployment.Status.SUCCEEDED, diff.error_message
    with pytest.raises(PermissionDenied):
        change.confirm_diff(diff, user=bob)
    assert not Deployment.objects.filter(diff_of=diff).exists()
    assert AuditEvent.objects.filter(action="deployment.requested", outcome="denied", actor_name="bob").exists()


def test_a_build_host_that_is_down_is_a_clear_error_and_the_node_is_untouched(add_node, build_host, flake_repo):
    node, tb = add_node()
    host, tb_host = build_host
    change.set_build_location(node, BuildLocation.HOST, host)
    before, generations = tb.current_system(), tb.generations()
    tb_host.stop()

    d = deploy(node, revision=new_version(flake_repo))

    assert d.status == Deployment.Status.ERROR
    assert (
        d.error_message.startswith(f"build host {host.name}: ")
        and "nothing was changed on the target" in d.error_message
    )
    assert tb.current_system() == before and tb.generations() == generations
    assert tb.run("ls /tmp").stdout.strip() == ""  # not even a run folder on the node


def test_a_build_that_fails_on_the_build_host_fails_the_deployment(add_node, build_host, flake_repo):
    node, tb = add_node("broken")
    host, _ = build_host
    change.set_build_location(node, BuildLocation.HOST, host)
    before = tb.current_system()

    d = deploy(node)

    assert d.status == Deployment.Status.FAILED and d.exit_code == 1
    assert d.error_message == f"nix build exited with code 1 on build host {host.name} (nothing reached the node)"
    text = log_text(d)
    assert "builder for the testbed system failed on purpose" in text
    assert "the build failed: nix build exited with code 1 on build host" in text
    assert tb.current_system() == before and tb.generations() == [1]
    assert BuiltSystem.objects.get().status == BuiltSystem.Status.FAILED


def test_a_node_whose_disk_fills_during_the_copy_keeps_its_system_and_profile(add_node, build_host, flake_repo):
    node, tb = add_node()
    host, _ = build_host
    change.set_build_location(node, BuildLocation.HOST, host)
    before, profile, generations = tb.current_system(), tb.system_profile(), tb.generations()
    # The node's store on a filesystem with 256 KiB to spare (a copy of what it holds), the new closure 2 MiB.
    tb.run(
        "set -e; used=$(du -sk /nix/store | cut -f1); mkdir -p /run/small-store; "
        "mount -t tmpfs -o size=$((used + 256))k small-store /run/small-store; "
        "cp -a /nix/store/. /run/small-store/; mount --bind /run/small-store /nix/store"
    )
    try:
        d = deploy(node, revision=new_version(flake_repo, payload_kib=2048))
        assert d.status == Deployment.Status.ERROR
        assert "importing the system into the store of" in d.error_message
        assert "No space left on device" in d.error_message
        assert tb.current_system() == before and tb.system_profile() == profile and tb.generations() == generations
        assert tb.run(f"nix-store --check-validity {before}").returncode == 0
    finally:
        tb.run("umount /nix/store; umount /run/small-store", check=False)


def test_a_rollout_builds_each_system_once_on_its_build_host(add_node, build_host, flake_repo, monkeypatch):
    host, tb_host = build_host
    tag = Tag.objects.create(name="built-elsewhere")
    change.set_build_location(tag, BuildLocation.HOST, host)
    nodes = []
    for _ in range(4):
        node, tb = add_node()
        node.tags.add(tag)
        nodes.append((node, tb))
    sha = new_version(flake_repo)
    pool = ThreadPoolExecutor(max_workers=8)

    def run_node(*pks):
        try:
            rollouts.run_node(*pks)
        finally:
            connection.close()

    monkeypatch.setattr(rollouts, "hand_out", lambda *pks: pool.submit(run_node, *pks))
    rollout = rollouts.request_rollout(
        Options(action="switch", revision=sha, tags=[tag.name], parallelism=4), trigger=Deployment.Trigger.CLI
    )
    pool.shutdown(wait=True)
    rollout.refresh_from_db()
    deployments = list(rollout.deployments.all())

    assert rollout.status == "succeeded", [(d.status, d.error_message) for d in deployments]
    toplevels = {d.toplevel for d in deployments}
    assert len(toplevels) == 1 and all(tb.current_system() in toplevels for _, tb in nodes)
    built = [d for d in deployments if "build -L --out-link" in log_text(d)]
    assert len(built) == 1  # one build on the build host; the others waited for it or found it built
    assert BuiltSystem.objects.count() == 1
    assert sum(1 for r in roots(tb_host) if r.startswith("built-")) == 1
    assert all("copied " in log_text(d) for d in deployments)
