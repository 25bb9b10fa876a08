from django.apps import AppConfig
from django.db.models.signals import post_migrate


def ensure_schedules(sender, **kwargs) -> None:
    """The GitOps minute schedule: due auto-deploys, polling, approval expiry (idempotent)."""
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name="gitops-tick",
        defaults={
            "func": "deployments.gitops.tasks.tick",
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
        },
    )


class GitopsConfig(AppConfig):
    name = "deployments.gitops"
    label = "gitops"
    verbose_name = "GitOps"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        post_migrate.connect(ensure_schedules, sender=self)
