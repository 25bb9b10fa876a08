"""Panel URLs (namespace ``deployments``)."""

from django.urls import path

from . import views

app_name = "deployments"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("nodes/new/", views.node_edit, name="node-add"),
    path("nodes/<str:name>/", views.node_detail, name="node-detail"),
    path("nodes/<str:name>/edit/", views.node_edit, name="node-edit"),
    path("nodes/<str:name>/deploy/", views.node_deploy, name="node-deploy"),
    path("nodes/<str:name>/hostkey/", views.node_hostkey, name="node-hostkey"),
    path("deployments/", views.deployment_list, name="deployment-list"),
    path("deployments/<int:pk>/", views.deployment_detail, name="deployment-detail"),
    path("deployments/<int:pk>/cancel/", views.deployment_cancel, name="deployment-cancel"),
    path("deployments/<int:pk>/log.txt", views.deployment_log, name="deployment-log"),
    path("api/nodes/", views.api_nodes, name="api-nodes"),
    path("api/nodes/<str:name>/deploy/", views.api_deploy, name="api-deploy"),
    path("api/deployments/<int:pk>/", views.api_deployment, name="api-deployment"),
    path("api/deployments/<int:pk>/log/", views.api_deployment_log, name="api-deployment-log"),
    path("api/deployments/<int:pk>/cancel/", views.api_cancel, name="api-cancel"),
]
