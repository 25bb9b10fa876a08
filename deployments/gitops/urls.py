"""GitOps pages (namespace ``gitops``, under ``/gitops/``); the webhook is ``/hooks/<provider>/`` (root URLs)."""

from django.urls import path

from . import views

app_name = "gitops"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("repositories/<int:pk>/secret/", views.repository_secret, name="repository-secret"),
    path("repositories/<int:pk>/poll/", views.repository_poll, name="repository-poll"),
    path("tags/<str:name>/", views.tag_policy, name="tag-policy"),
    path("nodes/<str:name>/policy/", views.node_policy, name="node-policy"),
    path("approvals/", views.approval_list, name="approval-list"),
    path("approvals/<int:pk>/", views.approval_detail, name="approval-detail"),
    path("approvals/<int:pk>/approve/", views.approval_decide, {"decision": "approved"}, name="approval-approve"),
    path("approvals/<int:pk>/reject/", views.approval_decide, {"decision": "rejected"}, name="approval-reject"),
]
