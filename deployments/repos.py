"""The panel's mirrors of flake repositories: fetch, resolve revisions, archive commits.

git always runs with an argument list (never a shell) and ``--end-of-options``
where a user value follows, so no value can become an option or a command.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from .remote import COMMIT_SHA_RE


class RepositoryError(Exception):
    """Fetching, resolving or archiving failed; the message says why."""


@dataclass
class Archive:
    data: bytes
    sha256: str


def _mirror_path(repo) -> Path:
    # Keyed by URL, not id: a repository pointed elsewhere gets a fresh mirror, never a mix of two.
    return Path(settings.REPO_CACHE_DIR) / f"{hashlib.sha256(repo.url.encode()).hexdigest()[:24]}.git"


def _git(args: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> bytes:
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", **(env or {})}
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, env=full_env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RepositoryError(f"git {args[0]} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RepositoryError(f"git {args[0]} failed: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc.stdout


def _ssh_env(repo, keyfile: str | None) -> dict:
    if not keyfile:
        return {}
    known = settings.GIT_KNOWN_HOSTS
    # Host keys of git servers are pinned in the panel's own known_hosts, never auto-accepted.
    return {
        "GIT_SSH_COMMAND": (
            f"ssh -i {keyfile} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known}"
        )
    }


@contextlib.contextmanager
def _locked(mirror: Path):
    """One fetch per mirror at a time, across processes: concurrent git fetches fight over ref locks."""
    with open(mirror.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(repo) -> Path:
    """Clone or update the panel's bare mirror of ``repo``; return its path."""
    mirror = _mirror_path(repo)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with _locked(mirror):
        _fetch(repo, mirror)
    return mirror


def _fetch(repo, mirror: Path) -> None:
    keyfile = None
    try:
        if repo.deploy_key_id:
            fd, keyfile = tempfile.mkstemp(prefix="deploykey-")
            with os.fdopen(fd, "w") as fh:
                fh.write(repo.deploy_key.secret().rstrip("\n") + "\n")
        env = _ssh_env(repo, keyfile)
        if not (mirror / "HEAD").exists():
            _git(["clone", "--bare", "--quiet", "--end-of-options", repo.url, str(mirror)], env=env)
        _git(["fetch", "--quiet", "--prune", "--tags", "origin", "+refs/heads/*:refs/heads/*"], cwd=mirror, env=env)
    finally:
        if keyfile:
            os.unlink(keyfile)


def resolve(repo, revision: str = "") -> str:
    """Fetch ``repo`` and return the full commit SHA of ``revision`` (default: the tracked branch)."""
    rev = revision or repo.branch
    mirror = fetch(repo)
    try:
        out = _git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], cwd=mirror)
    except RepositoryError:
        raise RepositoryError(f"revision {rev!r} not found in repository {repo.name}") from None
    sha = out.decode().strip()
    if not COMMIT_SHA_RE.match(sha):
        raise RepositoryError(f"git returned an unexpected revision {sha!r}")
    return sha


# A worker process runs a rollout's nodes one after another, all at one commit: it keeps the last few
# archives (a commit's tree never changes) instead of running ``git archive`` for each node.
ARCHIVE_CACHE_ENTRIES = 4
ARCHIVE_CACHE_MAX_BYTES = 16 * 1024 * 1024  # larger archives are not kept
_archives: collections.OrderedDict[tuple[str, str], Archive] = collections.OrderedDict()
_archives_lock = threading.Lock()


def archive(repo, sha: str) -> Archive:
    """A tar of the tree at commit ``sha`` (which must already be fetched)."""
    if not COMMIT_SHA_RE.match(sha):
        raise RepositoryError(f"not a full commit SHA: {sha!r}")
    key = (str(_mirror_path(repo)), sha)
    with _archives_lock:
        if key in _archives:
            _archives.move_to_end(key)
            return _archives[key]
    made = _archive(repo, sha)
    if len(made.data) <= ARCHIVE_CACHE_MAX_BYTES:
        with _archives_lock:
            _archives[key] = made
            while len(_archives) > ARCHIVE_CACHE_ENTRIES:
                _archives.popitem(last=False)
    return made


def _archive(repo, sha: str) -> Archive:
    mirror = _mirror_path(repo)
    if not (mirror / "HEAD").exists():
        fetch(repo)
    try:
        data = _git(["archive", "--format=tar", "--end-of-options", sha], cwd=mirror)
    except RepositoryError:
        fetch(repo)
        data = _git(["archive", "--format=tar", "--end-of-options", sha], cwd=mirror)
    return Archive(data=data, sha256=hashlib.sha256(data).hexdigest())
