"""What a commit builds: ``nixosConfigurations.<attr>.config.system.build.toplevel.outPath``, evaluated once.

The source is ``git archive`` of the panel's mirror unpacked into a temporary folder and evaluated as a
``path:`` flake (no git needed, nothing fetched: offline, an empty flake registry, no lock file written),
with a timeout.  The answer is kept in ``ExpectedSystem`` per (repository, commit, attribute), errors too,
so a fleet costs one evaluation per distinct pair whatever its size.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from deployments import repos
from deployments.remote import COMMIT_SHA_RE, FLAKE_ATTR_RE

from .models import ExpectedSystem

# A store path as `nix eval --raw` prints it.
_STORE_PATH_PREFIX = "/nix/store/"
_EMPTY_REGISTRY = '{"flakes": [], "version": 2}\n'


# A transient failure is tried again after this long; Nix's own errors for a commit are kept for good.
RETRY_TRANSIENT_AFTER = timedelta(minutes=10)


class EvaluationError(Exception):
    """Nix could not evaluate the attribute; the message is Nix's own last lines.

    ``transient``: the failure is not the commit's (a timeout, no nix): worth trying again later.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def nix_eval_toplevel(source: Path, attr: str, *, timeout: float | None = None) -> str:
    """The toplevel's store path of ``nixosConfigurations.<attr>`` of the flake in ``source``.

    Raises EvaluationError (Nix's message, a timeout, or no Nix at all).
    """
    if not FLAKE_ATTR_RE.match(attr):
        raise EvaluationError(f"not a flake attribute: {attr!r}")
    timeout = settings.SYNC_EVAL_TIMEOUT if timeout is None else timeout
    registry = source.parent / "registry.json"
    registry.write_text(_EMPTY_REGISTRY)
    env = {
        **os.environ,
        "NIX_CONFIG": "experimental-features = nix-command flakes\n"
        f"flake-registry = {registry}\nsubstituters =\nwarn-dirty = false\n",
        "LC_ALL": "C",
    }
    ref = f'path:{source}#nixosConfigurations."{attr}".config.system.build.toplevel.outPath'
    argv = [settings.NIX_BIN, "eval", "--offline", "--no-write-lock-file", "--raw", ref]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EvaluationError(f"nix eval timed out after {timeout:g} s", transient=True) from None
    except FileNotFoundError:
        raise EvaluationError(f"nix not found ({settings.NIX_BIN}): set PANEL_NIX", transient=True) from None
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip() and "nixbld" not in ln]
        raise EvaluationError("\n".join(lines[-5:]) or f"nix eval exited with code {proc.returncode}")
    if not out.startswith(_STORE_PATH_PREFIX) or "\n" in out:
        raise EvaluationError(f"nix eval gave no store path: {out[:200]!r}")
    return out


def _unpack(data: bytes, dest: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, links out of dest, devices


def evaluate(repo, sha: str, attr: str) -> tuple[str, str, bool, float]:
    """(out path, error, transient, seconds) of one evaluation, uncached."""
    started = time.monotonic()
    try:
        if not COMMIT_SHA_RE.match(sha):
            raise EvaluationError(f"not a full commit SHA: {sha!r}")
        archive = repos.archive(repo, sha)
        with tempfile.TemporaryDirectory(prefix="panel-eval-") as tmp:
            source = Path(tmp) / "src"
            source.mkdir()
            _unpack(archive.data, source)
            path = nix_eval_toplevel(source, attr)
        return path, "", False, time.monotonic() - started
    except EvaluationError as exc:
        return "", str(exc), exc.transient, time.monotonic() - started
    except repos.RepositoryError as exc:
        return "", str(exc), True, time.monotonic() - started
    except tarfile.TarError as exc:
        return "", f"cannot unpack the commit: {exc}", False, time.monotonic() - started


def expected_system(repo, sha: str, attr: str) -> ExpectedSystem:
    """The cached evaluation of (``repo``, ``sha``, ``attr``), evaluating it the first time it is asked for."""
    found = ExpectedSystem.objects.filter(repository=repo, commit_sha=sha, flake_attr=attr).first()
    if found is not None and not (found.transient and found.evaluated_at < timezone.now() - RETRY_TRANSIENT_AFTER):
        return found
    out_path, error, transient, seconds = evaluate(repo, sha, attr)
    if found is not None:
        fields = {"out_path": out_path, "error": error, "transient": transient, "seconds": seconds}
        ExpectedSystem.objects.filter(pk=found.pk).update(evaluated_at=timezone.now(), **fields)
        found.refresh_from_db()
        return found
    try:
        with transaction.atomic():
            return ExpectedSystem.objects.create(
                repository=repo,
                commit_sha=sha,
                flake_attr=attr,
                out_path=out_path,
                error=error,
                transient=transient,
                seconds=seconds,
            )
    except IntegrityError:
        # Another refresh evaluated the same pair meanwhile: the same commit gives the same answer.
        return ExpectedSystem.objects.get(repository=repo, commit_sha=sha, flake_attr=attr)
