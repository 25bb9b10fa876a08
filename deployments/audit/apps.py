"""The audit trail: append-only, hash-chained events (Django app label ``audit``)."""

from django.apps import AppConfig
from django.db.models.signals import post_migrate

SCHEDULE_NAME = "audit-checkpoint"
SCHEDULE_FUNC = "deployments.audit.checkpoint.write_checkpoint"


class AuditConfig(AppConfig):
    name = "deployments.audit"
    label = "audit"
    verbose_name = "Audit trail"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import signals

        from . import signals as handlers

        signals.user_logged_in.connect(handlers.logged_in, dispatch_uid="audit-login")
        signals.user_logged_out.connect(handlers.logged_out, dispatch_uid="audit-logout")
        signals.user_login_failed.connect(handlers.login_failed, dispatch_uid="audit-login-failed")
        from axes.signals import user_locked_out

        user_locked_out.connect(handlers.locked_out, dispatch_uid="audit-locked-out")
        from . import accounts

        accounts.connect()
        post_migrate.connect(after_migrate, sender=self, dispatch_uid="audit-post-migrate")


def after_migrate(sender, using="default", **kwargs) -> None:
    """Keep the triggers and the checkpoint schedule in place after every migrate."""
    from django.conf import settings
    from django.db import connections

    from .db import SEARCH_TABLE, SQLITE_SEARCH_TRIGGERS, SQLITE_TRIGGERS, TABLE

    connection = connections[using]
    # SQLite rebuilds a table (dropping its triggers) when a later migration alters it.
    if connection.vendor == "sqlite":
        tables = connection.introspection.table_names()
        if TABLE in tables:
            with connection.cursor() as cur:
                for sql in SQLITE_TRIGGERS.values():
                    cur.execute(sql)
                if SEARCH_TABLE in tables:
                    for sql in SQLITE_SEARCH_TRIGGERS.values():
                        cur.execute(sql)

    from django_q.models import Schedule

    minutes = settings.AUDIT_CHECKPOINT_MINUTES
    if minutes == 0:
        Schedule.objects.using(using).filter(name=SCHEDULE_NAME).delete()
        return
    Schedule.objects.using(using).update_or_create(
        name=SCHEDULE_NAME,
        defaults={"func": SCHEDULE_FUNC, "schedule_type": Schedule.MINUTES, "minutes": minutes, "repeats": -1},
    )
