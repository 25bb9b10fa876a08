"""ASGI entry point: Django views over HTTP, log followers over WebSocket."""

import os

from django.core.asgi import get_asgi_application

from controlpanel.malloc import tune_malloc

# daphne copies each log message once per viewer: keep those blocks on the heap (controlpanel/malloc.py).
tune_malloc()

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlpanel.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from deployments.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
