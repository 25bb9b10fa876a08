"""How the REST API knows who asks: ``Authorization: Bearer <token>``, or the browser's session.

The token class goes first, so a request with a token is judged by it alone (401 if it is refused,
never a fall-back to a session cookie).  Session authentication is DRF's, which enforces CSRF on
unsafe methods: a page's fetch must send the token, and a cross-site form cannot act as the user
(``rest_framework.authentication.SessionAuthentication``, named in settings after this one).
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from . import tokens


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None  # not ours: the session may answer
        # Anything but exactly one ASCII word after "Bearer" is a malformed token (refused and recorded).
        raw = b" ".join(header[1:]).decode("ascii", "replace")
        try:
            user, token = tokens.authenticate(raw)
        except tokens.Refused as exc:
            raise exceptions.AuthenticationFailed(str(exc)) from None
        return user, token

    def authenticate_header(self, request):
        return f'{self.keyword} realm="api"'


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "deployments.restapi.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API token: npt_<prefix>_<secret>"}
