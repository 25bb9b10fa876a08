"""The expected system of a (commit, attribute): real `nix eval` of the mirror's archive, evaluated once."""

from __future__ import annotations

import pytest

from deployments.models import Credential, Node
from deployments.sync import evaluate, status
from deployments.sync.models import ExpectedSystem, NodeSync
from tests.support.keys import HOST_KEY
from tests.support.testbed import commit_change

pytestmark = pytest.mark.django_db


@pytest.fixture
def counted(monkeypatch):
    """Counts real evaluations (the call goes through to Nix)."""
    calls = []
    real = evaluate.evaluate

    def counting(repo, sha, attr):
        calls.append((sha, attr))
        return real(repo, sha, attr)

    monkeypatch.setattr(evaluate, "evaluate", counting)
    return calls


def many_nodes(repository, n: int, attrs: list[str]) -> list[Node]:
    cred = Credential.objects.create(name="c", kind="password", secret_encrypted="x")
    Node.objects.bulk_create(
        Node(name=f"n{i}", host="192.0.2.1", flake_attr=attrs[i % len(attrs)], repository=repository,
             credential=cred, host_key=HOST_KEY)
        for i in range(n)
    )  # fmt: skip
    return list(Node.objects.all())


def test_the_toplevel_is_what_nix_builds(repository, flake_repo):
    found = evaluate.expected_system(repository, flake_repo[1], "devm")
    assert found.error == ""
    assert found.out_path.startswith("/nix/store/") and found.out_path.endswith("-nixos-system-devm-24.05.testbed-1")


def test_many_nodes_cost_one_evaluation_per_commit_and_attribute(repository, flake_repo, counted):
    nodes = many_nodes(repository, 60, ["devm", "failing", "slow"])
    readings = {n.pk: status.Reading(current_system="/nix/store/something-else") for n in nodes}
    status.refresh(reader=lambda todo: readings)
    assert sorted(a for _, a in counted) == ["devm", "failing", "slow"]
    assert NodeSync.objects.filter(status="behind").count() == 60
    # A second refresh evaluates nothing; a new commit costs one evaluation per attribute again.
    status.refresh(reader=lambda todo: readings)
    assert len(counted) == 3
    new = commit_change(flake_repo[0], "devm")
    status.refresh(reader=lambda todo: readings)
    assert len(counted) == 6 and {s for s, _ in counted[3:]} == {new}
    assert ExpectedSystem.objects.count() == 6


def test_an_evaluation_error_is_cached_with_its_message_and_the_nodes_are_unknown(repository, flake_repo, counted):
    nodes = many_nodes(repository, 5, ["nosuchattr"])
    readings = {n.pk: status.Reading(current_system="/nix/store/x") for n in nodes}
    status.refresh(reader=lambda todo: readings)
    status.refresh(reader=lambda todo: readings)
    assert len(counted) == 1
    err = ExpectedSystem.objects.get()
    assert err.out_path == "" and "nosuchattr" in err.error and not err.transient
    s = NodeSync.objects.first()
    assert s.status == "unknown" and "could not be evaluated" in s.reason and "nosuchattr" in s.reason


def test_a_broken_flake_gives_nixs_message(repository, flake_repo):
    path = flake_repo[0]
    (path / "flake.nix").write_text('{ outputs = { self }: { nixosConfigurations = throw "boom in flake"; }; }\n')
    import subprocess

    subprocess.run(["git", "-C", str(path), "commit", "-qam", "break"], check=True)
    from deployments import repos

    found = evaluate.expected_system(repository, repos.resolve(repository), "devm")
    assert "boom in flake" in found.error


def test_a_timeout_is_transient_and_evaluated_again_later(repository, flake_repo, settings):
    from datetime import timedelta

    from django.utils import timezone

    settings.SYNC_EVAL_TIMEOUT = 0.001
    first = evaluate.expected_system(repository, flake_repo[1], "devm")
    assert first.transient and "timed out" in first.error
    settings.SYNC_EVAL_TIMEOUT = 60
    assert evaluate.expected_system(repository, flake_repo[1], "devm").error  # within the retry delay: cached
    ExpectedSystem.objects.update(evaluated_at=timezone.now() - timedelta(hours=1))
    again = evaluate.expected_system(repository, flake_repo[1], "devm")
    assert again.pk == first.pk and again.error == "" and again.out_path.startswith("/nix/store/")


def test_no_nix_is_said(repository, flake_repo, settings):
    settings.NIX_BIN = "/nonexistent/nix"
    found = evaluate.expected_system(repository, flake_repo[1], "devm")
    assert "PANEL_NIX" in found.error and found.transient


def test_a_bad_attribute_never_reaches_nix(tmp_path):
    with pytest.raises(evaluate.EvaluationError, match="not a flake attribute"):
        evaluate.nix_eval_toplevel(tmp_path, 'x"; builtins.exec')
