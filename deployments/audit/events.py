"""Every audit event name the panel writes, defined once.

``record()`` refuses a name that is not here, so the review page's filter
(which offers these names) can never miss one.  An event name is
``<subject>.<what happened>``; a refusal is the event of what was attempted
with ``outcome=denied``.  The stored field is called ``action`` (it is part of
the hashed record format, see docs/audit.md); in code it is the *event*.
"""

from __future__ import annotations

EVENTS: dict[str, str] = {
    # Sign-in
    "auth.login": "a user signed in",
    "auth.logout": "a user signed out",
    "auth.login_failed": "a sign-in was refused (wrong name or password)",
    "auth.locked_out": "a sign-in was refused: too many recent failures for the name or from the address",
    # Deployments
    "deployment.requested": "a deployment was requested (or refused: outcome denied)",
    "deployment.started": "a worker claimed the deployment and started it",
    "deployment.finished": "the deployment ended: succeeded, failed, error",
    "deployment.cancel": "a cancel was refused",
    "deployment.cancelled": "a queued deployment was cancelled before it started",
    "deployment.cancel_requested": "a running deployment was asked to stop",
    "deployment.interrupted": "the worker stopped beating; the deployment was marked interrupted",
    "deployment.reconcile": "a reconcile was refused",
    "deployment.reconciled": "the node was asked what became of an interrupted deployment: its outcome, "
    "generation and current system recorded (before/after), or that the run is still going",
    "deployment.skipped": "a rollout's node was not deployed: it was busy with another deployment",
    # Health checks and magic rollback (deployments/health.py, deployments/remote/confirm.py)
    "deployment.health_checked": "a health check ran after activation: every attempt's result and output",
    "deployment.unhealthy": "a health check failed after activation (the node keeps the system, or goes back)",
    "deployment.confirmed": "the panel confirmed an activation over a new SSH connection: the node keeps it",
    "deployment.rolled_back": "the node went back to the system before: no confirmation in time, or a "
    "failing health check with policy rollback",
    "health_check.created": "a health check was added to a node or a tag",
    "health_check.changed": "a health check was edited (before/after)",
    "health_check.deleted": "a health check was deleted",
    "health_check.change": "a change to health checks was refused",
    "health_check.viewed": "a tag's health check page was refused",
    "deployment.diffed": "a diff deployment compared its built system with what the node runs (the difference)",
    "build_location.changed": "where a node (or a tag's nodes) builds its system was changed, or refused",
    # Rollouts (deployments/rollouts.py): one revision to many nodes
    "rollout.requested": "a rollout was requested (or refused whole: outcome denied)",
    "rollout.canary_passed": "every canary node of a rollout succeeded: the rest may start",
    "rollout.canary_failed": "a canary node of a rollout did not succeed: the rest never start",
    "rollout.stopped_by_policy": "a rollout reached its failure limit: no further node starts",
    "rollout.cancel": "a rollout's cancel was refused",
    "rollout.cancelled": "a rollout was cancelled: running nodes stop, queued ones never start",
    "rollout.finished": "a rollout's last node ended: succeeded, failed or cancelled, with counts",
    # Sync status and notifications (deployments/sync/)
    "node.sync_changed": "a node's sync status changed (in sync, behind, drifted, unknown): before/after, reason",
    "node.drifted": "a node runs a system other than the one the panel last deployed to it: expected vs actual",
    "notification.sent": "a notification was delivered to a subscription's target (masked)",
    "notification.failed": "a notification could not be delivered (an attempt, or for good after its retries)",
    "subscription.changed": "a team's notification subscription was created, changed or deleted (targets masked)",
    # Host keys
    "hostkey.viewed": "the host key page was refused",
    "hostkey.scanned": "the key a node presents was fetched (nothing pinned)",
    "hostkey.pinned": "a host key was pinned after an explicit confirmation",
    "hostkey.mismatch": "a node presented a key other than the pinned one",
    # Inventory
    "node.created": "a node was added",
    "node.changed": "a node was edited (before/after)",
    "node.deleted": "a node was deleted",
    "node.generations_read": "a node's system generations were read over SSH (or the read failed, or was refused)",
    "credential.created": "a credential was added (the secret never appears)",
    "credential.changed": "a credential was edited or its secret replaced",
    "credential.deleted": "a credential was deleted",
    "credential.rotated": "a credential's secret was replaced (fingerprints before/after; never the secret)",
    "credential.viewed": "the credential pages were refused",
    "credential.use": "a node was refused a credential its editor's teams may not use",
    "jump_host.use": "a node was refused a jump host its editor may not deploy on, or whose credential their "
    "teams may not use",
    "credential.use_granted": "a team was allowed to use a credential",
    "credential.use_revoked": "a team lost the use of a credential",
    "repository.created": "a repository was added",
    "repository.changed": "a repository was edited",
    "repository.deleted": "a repository was deleted",
    "repository.viewed": "the repository pages were refused",
    "repository.use": "a node was refused a repository its editor's teams may not use",
    "repository.use_granted": "a team was allowed to use a repository",
    "repository.use_revoked": "a team lost the use of a repository",
    # User accounts (deployments/audit/accounts.py; the admin, createsuperuser, changepassword, the shell)
    "user.created": "a user account was created",
    "user.changed": "a user's name, e-mail or active/staff/superuser flag changed (before/after)",
    "user.deleted": "a user account was deleted",
    "user.password_changed": "a user's password was set or made unusable (never the hash)",
    "user.groups_changed": "a user was added to or removed from Django groups",
    "user.permissions_changed": "a user was given or lost Django permissions",
    "group.created": "a Django group was created",
    "group.changed": "a Django group was renamed",
    "group.deleted": "a Django group was deleted (its members named)",
    "group.permissions_changed": "a Django group was given or lost permissions",
    # GitOps (deployments/gitops)
    "webhook.received": "a verified push to a tracked branch arrived (before/after commits)",
    "webhook.refused": "a webhook was refused: bad or missing signature, unknown repository, stale timestamp",
    "repository.polled": "polling found a tracked branch moved (before/after commits), or saw it the first time",
    "repository.webhook_secret": "a repository's webhook secret was set or rotated (never the secret itself)",
    "sync_policy.changed": "a node's or tag's sync policy or maintenance window changed (before/after)",
    "tag.protection_changed": "a tag was marked protected (its deploys need approval) or no longer",
    "gitops.node_behind": "a node with the notify policy is behind its moved branch",
    "gitops.auto_deploy": "a push started an auto-deploy rollout, or left it waiting (window, approval)",
    "approval.requested": "a deployment or rollout touching a protected node was held for approval",
    "approval.approved": "a second person approved a held request (or was refused: outcome denied)",
    "approval.rejected": "a second person rejected a held request (or was refused: outcome denied)",
    "approval.expired": "a held request expired: its branch moved, or it waited too long",
    # Teams and grants
    "team.viewed": "the team pages were refused",
    "team.created": "a team was created",
    "team.changed": "a team was renamed or described",
    "team.deleted": "a team was deleted with its grants",
    "team.member_added": "a user joined a team",
    "team.member_removed": "a user left a team",
    "team.grant_added": "a team was given a role over a scope",
    "team.grant_removed": "a team lost a role over a scope",
    # API tokens (deployments/restapi/tokens.py): never the secret, only the prefix
    "api_token.created": "a user created an API token (its name, prefix and expiry)",
    "api_token.revoked": "a user revoked one of their API tokens",
    "api_token.used": "an API token was used (recorded at most once a minute per token)",
    "api_token.refused": "a request's API token was refused: malformed, unknown, revoked, expired, or its user deactivated",
    # The trail itself
    "audit.exported": "the trail (or a filtered part) was exported",
    "audit.verified": "the chain was verified from the command line",
    "audit.archived": "old events were archived and sealed",
    "audit.checkpoint_refused": "an alert: no checkpoint was signed, the chain or the checkpoints did not verify",
}

EVENT_NAMES: tuple[str, ...] = tuple(EVENTS)


def check_event(name: str) -> str:
    """``name`` if it is a registered event name; ValueError (a panel bug) otherwise."""
    if name not in EVENTS:
        raise ValueError(f"unregistered audit event {name!r}: add it to deployments/audit/events.py")
    return name
