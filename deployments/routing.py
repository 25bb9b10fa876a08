"""WebSocket routes."""

from django.urls import path

from .consumers import DeploymentLogConsumer

websocket_urlpatterns = [
    path("ws/deployments/<int:pk>/log/", DeploymentLogConsumer.as_asgi(), name="ws-deployment-log"),
]
