"""The API tokens page (namespace ``restapi``), mounted at ``/tokens/``."""

from django.urls import path

from . import pages

app_name = "restapi"
urlpatterns = [
    path("", pages.token_list, name="token-list"),
    path("<int:pk>/revoke/", pages.token_revoke, name="token-revoke"),
]
