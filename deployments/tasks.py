"""django-q2 entry points.  Every task has the same shape: claim, run, finish.

``run_deployment`` claims its row with a conditional UPDATE, so each
deployment runs at most once whatever the broker delivers; an expected
failure becomes ``failed`` or ``error`` with a message, anything else
``error`` with the traceback stored.  No task dies silently.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import logstream, repos
from .audit.writer import record
from .models import Deployment
from .remote.rebuild import run_rebuild
from .remote.ssh import Cancelled, HostKey, RemoteError, Target

log = logging.getLogger(__name__)
Status = Deployment.Status


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(deployment_id: int) -> bool:
    """queued → running, atomically; False if someone else has it or it was cancelled."""
    now = timezone.now()
    with transaction.atomic():
        claimed = Deployment.objects.filter(pk=deployment_id, status=Status.QUEUED).update(
            status=Status.RUNNING, started_at=now, heartbeat_at=now, worker=worker_name()
        )
        if claimed:
            deployment = Deployment.objects.select_related("node").get(pk=deployment_id)
            record("deployment.started", actor_kind="system", obj=deployment, node=deployment.node,
                   details={"worker": deployment.worker, "commit": deployment.commit_sha, "action": deployment.action})
    return bool(claimed)


def finish(deployment_id: int, status: str, **fields) -> Deployment:
    """running → a terminal state, with its audit event; refuses anything else."""
    if status not in Deployment.TERMINAL:
        raise ValueError(f"finish() needs a terminal status, not {status!r}")
    with transaction.atomic():
        updated = Deployment.objects.filter(pk=deployment_id, status=Status.RUNNING).update(
            status=status, finished_at=timezone.now(), **fields
        )
        deployment = Deployment.objects.select_related("node").get(pk=deployment_id)
        if updated:
            record(
                "deployment.finished", actor_kind="system", obj=deployment, node=deployment.node,
                outcome="success" if status == Status.SUCCEEDED else "failure",
                details={
                    "status": status, "exit_code": deployment.exit_code, "commit": deployment.commit_sha,
                    "flake_attr": deployment.flake_attr, "action": deployment.action,
                    "toplevel": deployment.toplevel, "generation_before": deployment.generation_before,
                    "generation_after": deployment.generation_after, "system_before": deployment.system_before,
                    "system_after": deployment.system_after, "log_sha256": deployment.log_sha256,
                    "archive_sha256": deployment.archive_sha256, "error": deployment.error_message[:500],
                },
            )
    logstream.notify(deployment_id, {"type": "deployment.status"})
    return deployment


def target_for(node) -> Target:
    """SSH target of ``node`` with its credential decrypted (kept only in memory)."""
    cred = node.credential
    is_key = cred.kind == cred.Kind.SSH_KEY
    return Target(
        host=node.host,
        port=node.port,
        user=node.ssh_user,
        host_key=HostKey.parse(node.host_key),
        private_key=cred.secret() if is_key else None,
        passphrase=(cred.passphrase() or None) if is_key else None,
        password=None if is_key else cred.secret(),
        sudo=node.use_sudo,
        sudo_password=cred.sudo_password() or (None if is_key else cred.secret()),
    )


class Heartbeat:
    """Beats the deployment's heartbeat and watches its cancel flag (called from the log writer thread)."""

    def __init__(self, deployment_id: int) -> None:
        self.deployment_id = deployment_id
        self.cancel = threading.Event()
        self._last = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last < min(1.0, settings.HEARTBEAT_INTERVAL):
            return
        self._last = now
        Deployment.objects.filter(pk=self.deployment_id).update(heartbeat_at=timezone.now())
        if Deployment.objects.filter(pk=self.deployment_id, cancel_requested=True).exists():
            self.cancel.set()


def run_deployment(deployment_id: int) -> str:
    """Claim, run and finish one deployment; return its final status."""
    if not claim(deployment_id):
        log.info("deployment %s was not queued any more; nothing to do", deployment_id)
        return "skipped"
    deployment = Deployment.objects.select_related("node__credential", "node__repository").get(pk=deployment_id)
    node = deployment.node
    beat = Heartbeat(deployment_id)
    writer = logstream.LogWriter(deployment_id, start_seq=logstream.next_seq(deployment_id), on_flush=beat)
    status, fields = Status.ERROR, {}
    try:
        writer.write("sys", f"deployment #{deployment_id}: nixos-rebuild {deployment.action} "
                            f"{node.name} ({deployment.flake_attr}) at {deployment.commit_sha}")
        archive = repos.archive(node.repository, deployment.commit_sha)
        fields["archive_sha256"] = archive.sha256
        result = run_rebuild(
            target_for(node),
            deployment_id=deployment_id,
            archive=archive.data,
            attr=deployment.flake_attr,
            action=deployment.action,
            on_output=writer.write,
            should_cancel=beat.cancel.is_set,
        )
        fields.update(
            exit_code=result.exit_code,
            generation_before=result.before.generation,
            generation_after=result.after.generation,
            system_before=result.before.current_system,
            system_after=result.after.current_system,
            toplevel=result.toplevel or "",
        )
        if result.exit_code == 0:
            status = Status.SUCCEEDED
        else:
            status = Status.FAILED
            fields["error_message"] = f"nixos-rebuild {deployment.action} exited with code {result.exit_code}"
    except Cancelled:
        status, fields["error_message"] = Status.CANCELLED, "cancelled on request"
    except RemoteError as exc:
        if exc.kind == "disconnected":
            # The node may still be activating on its own: we only lost sight of it.
            status = Status.INTERRUPTED
            fields["error_message"] = f"{exc.message}; the activation may still complete on the node: check it"
        else:
            status, fields["error_message"] = Status.ERROR, exc.message
        if exc.kind == "host-key-mismatch":
            # Security-relevant on its own, not only as a failed deployment: someone may be in the middle.
            with transaction.atomic():
                record("hostkey.mismatch", actor_kind="system", obj=node, outcome="failure",
                       details={"pinned": node.host_key_fingerprint, "error": exc.message,
                                "deployment": deployment_id})
    except repos.RepositoryError as exc:
        status, fields["error_message"] = Status.ERROR, f"flake source: {exc}"
    except Exception:  # noqa: BLE001 - a panel bug must still end the deployment, with its traceback
        log.exception("deployment %s crashed", deployment_id)
        status, fields["error_message"] = Status.ERROR, "internal error:\n" + traceback.format_exc(limit=20)
    finally:
        if fields.get("error_message"):
            try:
                writer.write("sys", f"{status}: {fields['error_message'].splitlines()[0]}")
            except RuntimeError:
                pass
        try:
            summary = writer.close()
            fields.update(line_count=summary.line_count, byte_count=summary.byte_count, log_sha256=summary.sha256)
        except RuntimeError as exc:
            status = Status.ERROR
            fields["error_message"] = (fields.get("error_message", "") + f"\nlog could not be stored: {exc.__cause__}").strip()
        finish(deployment_id, status, **fields)
    return status


def reap_stale(stale_after: float | None = None) -> int:
    """Mark running deployments whose worker stopped beating as interrupted (never re-run them)."""
    stale_after = settings.HEARTBEAT_STALE_AFTER if stale_after is None else stale_after
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    count = 0
    for pk in Deployment.objects.filter(status=Status.RUNNING, heartbeat_at__lt=cutoff).values_list("pk", flat=True):
        with transaction.atomic():
            updated = Deployment.objects.filter(pk=pk, status=Status.RUNNING, heartbeat_at__lt=cutoff).update(
                status=Status.INTERRUPTED, finished_at=timezone.now(),
                error_message=f"the worker stopped responding (no heartbeat for {stale_after:.0f} s); the node may be mid-change: check it and deploy again",
            )
            if updated:
                d = Deployment.objects.select_related("node").get(pk=pk)
                record("deployment.interrupted", actor_kind="system", obj=d, node=d.node, outcome="failure",
                       details={"worker": d.worker, "last_heartbeat": d.heartbeat_at.isoformat()})
                count += 1
        logstream.notify(pk, {"type": "deployment.status"})
    return count
