"""Root URLs: the panel, the Django admin, and login/logout."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

admin.site.site_header = "NixOS control panel"
admin.site.site_title = "NixOS control panel"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("audit/", include("deployments.audit.urls")),
    path("teams/", include("deployments.access.urls")),
    path("", include("deployments.urls")),
]
