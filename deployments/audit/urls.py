"""Audit trail pages (namespace ``audit``)."""

from django.urls import path

from . import views

app_name = "audit"
urlpatterns = [
    path("", views.event_list, name="event-list"),
    path("events/<int:seq>/", views.event_detail, name="event-detail"),
    path("export.<str:fmt>", views.event_export, name="export"),
]
