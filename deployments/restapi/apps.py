from django.apps import AppConfig


class RestApiConfig(AppConfig):
    """The REST API under ``/api/v1/`` and its per-user API tokens."""

    name = "deployments.restapi"
    label = "restapi"
    verbose_name = "REST API"
    default_auto_field = "django.db.models.BigAutoField"
