"""django-q2 entry points.  Every task has the same shape: claim, run, finish.

``run_deployment`` claims its row (``lifecycle.claim``, a conditional
UPDATE), so each deployment runs at most once whatever the broker delivers; an
expected failure becomes ``failed`` or ``error`` with a message, anything else
``error`` with the traceback stored.  No task dies silently.  The runner that
does the remote work is an argument, so every outcome can be tested with a
stand-in runner as well as over real SSH.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import logstream, repos
from .audit.writer import record
from .lifecycle import claim, finish
from .models import Deployment
from .remote import Cancelled, HostKey, RebuildResult, RemoteError, Target, run_rebuild

log = logging.getLogger(__name__)
Status = Deployment.Status


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


# What does the remote work: ``run_rebuild``'s signature (target, keyword arguments) → RebuildResult.
Runner = Callable[..., RebuildResult]


def run_deployment(deployment_id: int, runner: Runner = run_rebuild) -> str:
    """Claim, run and finish one deployment with ``runner``; return its final status."""
    if not claim(deployment_id):
        log.info("deployment %s was not queued any more; nothing to do", deployment_id)
        return "skipped"
    deployment = Deployment.objects.select_related("node__credential", "node__repository").get(pk=deployment_id)
    node = deployment.node
    beat = Heartbeat(deployment_id)
    writer = logstream.LogWriter(deployment_id, start_seq=logstream.next_seq(deployment_id), on_flush=beat)
    status, fields = Status.ERROR, {}
    try:
        writer.write(
            "sys",
            f"deployment #{deployment_id}: nixos-rebuild {deployment.action} "
            f"{node.name} ({deployment.flake_attr}) at {deployment.commit_sha}",
        )
        archive = repos.archive(node.repository, deployment.commit_sha)
        fields["archive_sha256"] = archive.sha256
        result = runner(
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
                record(
                    "hostkey.mismatch",
                    actor_kind="system",
                    obj=node,
                    outcome="failure",
                    details={"pinned": node.host_key_fingerprint, "error": exc.message, "deployment": deployment_id},
                )
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
            fields["error_message"] = (
                fields.get("error_message", "") + f"\nlog could not be stored: {exc.__cause__}"
            ).strip()
        finish(deployment_id, status, **fields)
    return status
