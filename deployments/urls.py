"""Panel URLs (namespace ``deployments``)."""

from django.urls import path

from .views import api, change, inventory, pages, reconcile, rollouts

app_name = "deployments"

urlpatterns = [
    path("", pages.dashboard, name="dashboard"),
    path("nodes/new/", pages.node_edit, name="node-add"),
    path("nodes/<str:name>/", pages.node_detail, name="node-detail"),
    path("nodes/<str:name>/edit/", pages.node_edit, name="node-edit"),
    path("nodes/<str:name>/deploy/", pages.node_deploy, name="node-deploy"),
    path("nodes/<str:name>/hostkey/", pages.node_hostkey, name="node-hostkey"),
    path("nodes/<str:name>/build-location/", change.node_build_location, name="node-build-location"),
    path("deployments/", pages.deployment_list, name="deployment-list"),
    path("deployments/<int:pk>/", pages.deployment_detail, name="deployment-detail"),
    path("deployments/<int:pk>/cancel/", pages.deployment_cancel, name="deployment-cancel"),
    path("deployments/<int:pk>/reconcile/", reconcile.deployment_reconcile, name="deployment-reconcile"),
    path("deployments/<int:pk>/confirm/", change.deployment_confirm, name="deployment-confirm"),
    path("deployments/<int:pk>/log.txt", pages.deployment_log, name="deployment-log"),
    path("rollouts/", rollouts.rollout_list, name="rollout-list"),
    path("rollouts/new/", rollouts.rollout_new, name="rollout-add"),
    path("rollouts/<int:pk>/", rollouts.rollout_detail, name="rollout-detail"),
    path("rollouts/<int:pk>/cancel/", rollouts.rollout_cancel, name="rollout-cancel"),
    path("credentials/", inventory.object_list, {"kind": "credential"}, name="credential-list"),
    path("credentials/new/", inventory.object_edit, {"kind": "credential"}, name="credential-add"),
    path("credentials/<int:pk>/", inventory.object_edit, {"kind": "credential"}, name="credential-edit"),
    path("credentials/<int:pk>/delete/", inventory.object_delete, {"kind": "credential"}, name="credential-delete"),
    path("credentials/<int:pk>/uses/", inventory.use_add, {"kind": "credential"}, name="credential-use-add"),
    path(
        "credentials/<int:pk>/uses/<int:team_id>/remove/",
        inventory.use_remove,
        {"kind": "credential"},
        name="credential-use-remove",
    ),
    path("repositories/", inventory.object_list, {"kind": "repository"}, name="repository-list"),
    path("repositories/new/", inventory.object_edit, {"kind": "repository"}, name="repository-add"),
    path("repositories/<int:pk>/", inventory.object_edit, {"kind": "repository"}, name="repository-edit"),
    path("repositories/<int:pk>/delete/", inventory.object_delete, {"kind": "repository"}, name="repository-delete"),
    path("repositories/<int:pk>/uses/", inventory.use_add, {"kind": "repository"}, name="repository-use-add"),
    path(
        "repositories/<int:pk>/uses/<int:team_id>/remove/",
        inventory.use_remove,
        {"kind": "repository"},
        name="repository-use-remove",
    ),
    path("api/nodes/", api.api_nodes, name="api-nodes"),
    path("api/nodes/<str:name>/deploy/", api.api_deploy, name="api-deploy"),
    path("api/deployments/<int:pk>/", api.api_deployment, name="api-deployment"),
    path("api/deployments/<int:pk>/log/", api.api_deployment_log, name="api-deployment-log"),
    path("api/deployments/<int:pk>/cancel/", api.api_cancel, name="api-cancel"),
    path("api/deployments/<int:pk>/confirm/", change.api_confirm, name="api-confirm"),
    path("api/rollouts/", rollouts.api_rollouts, name="api-rollouts"),
    path("api/rollouts/<int:pk>/", rollouts.api_rollout, name="api-rollout"),
    path("api/rollouts/<int:pk>/cancel/", rollouts.api_rollout_cancel, name="api-rollout-cancel"),
]
