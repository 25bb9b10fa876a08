from django.apps import AppConfig


class AccessConfig(AppConfig):
    name = "deployments.access"
    label = "access"
    verbose_name = "Teams and roles"
    default_auto_field = "django.db.models.BigAutoField"
