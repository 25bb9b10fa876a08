"""The REST API's URLs (namespace ``api-v1``), mounted at ``/api/v1/``.

Adding an endpoint is one line: ``router.register("<path>", <ViewSet>, basename="<name>")``, plus its
row in tests/restapi/test_matrix.py (the matrix fails until every route has one).
"""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.routers import SimpleRouter

from . import views

app_name = "api-v1"

router = SimpleRouter()
router.register("nodes", views.NodeViewSet, basename="node")
router.register("deployments", views.DeploymentViewSet, basename="deployment")
router.register("rollouts", views.RolloutViewSet, basename="rollout")
router.register("audit/events", views.AuditEventViewSet, basename="audit-event")
router.register("tokens", views.TokenViewSet, basename="token")
router.register("approvals", views.ApprovalViewSet, basename="approval")
router.register("health-checks", views.HealthCheckViewSet, basename="health-check")
router.register("subscriptions", views.SubscriptionViewSet, basename="subscription")

urlpatterns = [
    # The schema and its documentation page describe the API to anyone (they hold no data).
    path("schema/", SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[]), name="schema"),
    path(
        "docs/",
        SpectacularSwaggerSplitView.as_view(url_name="api-v1:schema", authentication_classes=[], permission_classes=[]),
        name="docs",
    ),
    *router.urls,
]
