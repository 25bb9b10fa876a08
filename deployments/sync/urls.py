"""Sync status buttons and notification subscriptions (namespace ``sync``); ``/metrics`` is in the root URLs."""

from django.urls import path

from . import views

app_name = "sync"

urlpatterns = [
    path("nodes/<str:name>/sync/refresh/", views.node_refresh, name="node-refresh"),
    path("nodes/<str:name>/sync/redeploy/", views.node_redeploy, name="node-redeploy"),
    path("notifications/", views.subscription_list, name="subscription-list"),
    path("notifications/new/", views.subscription_edit, name="subscription-add"),
    path("notifications/<int:pk>/", views.subscription_edit, name="subscription-edit"),
    path("notifications/<int:pk>/delete/", views.subscription_delete, name="subscription-delete"),
]
