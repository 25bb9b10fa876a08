from django.apps import AppConfig
from django.db.models.signals import post_migrate


def ensure_schedules(sender, **kwargs) -> None:
    """The fleet's sync refresh (every ``PANEL_SYNC_MINUTES``) and the notifications' retries (every minute)."""
    from django.conf import settings
    from django_q.models import Schedule

    wanted = {"notification-retries": ("deployments.sync.notify.retry_due", 1)}
    if settings.SYNC_MINUTES:
        wanted["sync-refresh"] = ("deployments.sync.status.refresh_fleet", settings.SYNC_MINUTES)
    else:
        Schedule.objects.filter(name="sync-refresh").delete()
    for name, (func, minutes) in wanted.items():
        Schedule.objects.update_or_create(
            name=name,
            defaults={"func": func, "schedule_type": Schedule.MINUTES, "minutes": minutes, "repeats": -1},
        )


class SyncConfig(AppConfig):
    name = "deployments.sync"
    label = "sync"
    verbose_name = "Sync status, notifications and metrics"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from deployments.audit.writer import recorded

        from . import notify

        # Every audit event, after its transaction commits, may be one a team subscribed to.
        recorded.connect(notify.on_event_recorded, dispatch_uid="sync-notify")
        post_migrate.connect(ensure_schedules, sender=self)
