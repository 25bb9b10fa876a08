"""The panel's repository mirrors: revisions resolve to commits, concurrent fetches don't collide."""

import io
import tarfile
import threading

import pytest

from deployments import repos
from deployments.models import Repository
from tests.support.testbed import commit_change

pytestmark = pytest.mark.django_db


@pytest.fixture
def repo(flake_repo):
    return Repository.objects.create(name="fleet", url=str(flake_repo[0]), branch="main")


def test_the_tracked_branch_resolves_to_its_head(repo, flake_repo):
    assert repos.resolve(repo) == flake_repo[1]


def test_a_new_commit_is_seen_at_the_next_request(repo, flake_repo):
    repos.resolve(repo)
    new = commit_change(flake_repo[0], "devm")
    assert repos.resolve(repo) == new


def test_the_archive_holds_the_flake_at_that_commit(repo, flake_repo):
    sha = repos.resolve(repo)
    archive = repos.archive(repo, sha)
    names = tarfile.open(fileobj=io.BytesIO(archive.data)).getnames()
    assert "flake.nix" in names and len(archive.sha256) == 64


def test_archive_refuses_anything_but_a_full_sha(repo):
    with pytest.raises(repos.RepositoryError, match="full commit SHA"):
        repos.archive(repo, "main")


def test_an_unreachable_repository_says_git_failed(db):
    repo = Repository.objects.create(name="gone", url="/nonexistent/repo", branch="main")
    with pytest.raises(repos.RepositoryError, match="git clone failed"):
        repos.resolve(repo)


def test_concurrent_fetches_of_one_mirror_all_succeed(repo, flake_repo):
    repos.resolve(repo)
    commit_change(flake_repo[0], "devm")
    results, errors = [], []

    def fetch():
        try:
            results.append(repos.resolve(repo))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(set(results)) == 1


def test_a_commit_is_archived_once_per_process_and_kept_only_within_bounds(repo, flake_repo, monkeypatch):
    """A rollout's nodes share one commit: the worker archives it once, not once per node."""
    sha = repos.resolve(repo)
    runs = []
    real_git = repos._git

    def counting_git(args, **kwargs):
        if args[0] == "archive":
            runs.append(args[-1])
        return real_git(args, **kwargs)

    monkeypatch.setattr(repos, "_git", counting_git)
    monkeypatch.setattr(repos, "_archives", type(repos._archives)())
    first = repos.archive(repo, sha)
    again = repos.archive(repo, sha)
    assert runs == [sha] and again.data == first.data and again.sha256 == first.sha256

    new = commit_change(flake_repo[0], "devm")
    assert repos.resolve(repo) == new
    assert repos.archive(repo, new).data != first.data
    assert runs == [sha, new], "another commit is another archive"

    # Archives over the size limit are made each time; the cache holds at most ARCHIVE_CACHE_ENTRIES.
    monkeypatch.setattr(repos, "ARCHIVE_CACHE_MAX_BYTES", len(first.data) - 1)
    monkeypatch.setattr(repos, "_archives", type(repos._archives)())
    repos.archive(repo, sha)
    repos.archive(repo, sha)
    assert runs == [sha, new, sha, sha] and not repos._archives
    monkeypatch.setattr(repos, "ARCHIVE_CACHE_MAX_BYTES", 1 << 30)
    monkeypatch.setattr(repos, "ARCHIVE_CACHE_ENTRIES", 1)
    repos.archive(repo, sha)
    repos.archive(repo, new)
    assert list(repos._archives) == [(str(repos._mirror_path(repo)), new)]
