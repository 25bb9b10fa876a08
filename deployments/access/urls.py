"""Team and grant pages (namespace ``access``); superusers only."""

from django.urls import path

from . import views

app_name = "access"
urlpatterns = [
    path("", views.team_list, name="team-list"),
    path("new/", views.team_edit, name="team-add"),
    path("<int:pk>/", views.team_detail, name="team-detail"),
    path("<int:pk>/edit/", views.team_edit, name="team-edit"),
    path("<int:pk>/delete/", views.team_delete, name="team-delete"),
    path("<int:pk>/members/", views.member_add, name="member-add"),
    path("<int:pk>/members/<int:user_id>/remove/", views.member_remove, name="member-remove"),
    path("<int:pk>/grants/", views.grant_add, name="grant-add"),
    path("<int:pk>/grants/<int:grant_id>/remove/", views.grant_remove, name="grant-remove"),
]
