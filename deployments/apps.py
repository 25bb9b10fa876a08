from django.apps import AppConfig
from django.db.models.signals import post_migrate


def ensure_schedules(sender, **kwargs) -> None:
    """The periodic reaper of deployments whose worker died, and the rollouts' safety net (idempotent)."""
    from django_q.models import Schedule

    for name, func in (
        ("reap-stale-deployments", "deployments.lifecycle.reap_stale"),
        ("advance-rollouts", "deployments.rollouts.advance_active_rollouts"),
    ):
        Schedule.objects.update_or_create(
            name=name,
            defaults={"func": func, "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
        )


class DeploymentsConfig(AppConfig):
    name = "deployments"
    verbose_name = "Deployments"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from controlpanel.bootstrap import check_keys

        # Missing generated keys (secret key, credential key) are named with their variable.
        checks.register(check_keys)
        post_migrate.connect(ensure_schedules, sender=self)
