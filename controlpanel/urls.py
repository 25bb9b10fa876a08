"""Root URLs: the panel, the Django admin, and login/logout."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from deployments.access import gate
from deployments.gitops import views as gitops_views
from deployments.sync.metrics import metrics_view

admin.site.site_header = "NixOS control panel"
admin.site.site_title = "NixOS control panel"
# The Django admin bypasses the node permission gate, so it is for superusers only;
# everyone else works through the panel's pages, which ask the gate.
admin.site.has_permission = lambda request: gate.may(request.user, gate.ADMIN_SITE)

# A refused search or filter says why (``BadRequest`` raised by a view).
handler400 = "deployments.views.errors.bad_request"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("audit/", include("deployments.audit.urls")),
    path("teams/", include("deployments.access.urls")),
    path("gitops/", include("deployments.gitops.urls")),
    path("hooks/<str:provider>/", gitops_views.webhook, name="webhook"),
    path("api/v1/", include("deployments.restapi.api_urls")),
    path("tokens/", include("deployments.restapi.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("", include("deployments.sync.urls")),
    path("", include("deployments.urls")),
]
