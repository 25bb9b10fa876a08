"""Forms of the team pages."""

from __future__ import annotations

from django import forms
from django.contrib.auth import get_user_model

from deployments.models import Node
from deployments.validators import validate_search_text, validate_team_name

from .models import Grant, Team


class TeamForm(forms.ModelForm):
    class Meta:
        model = Team
        fields = ["name", "description"]

    def clean_name(self):
        validate_team_name(self.cleaned_data["name"])
        return self.cleaned_data["name"]

    def clean_description(self):
        # Free text, but nothing invisible: a description is read next to the team's grants.
        validate_search_text(self.cleaned_data["description"], max_length=300)
        return self.cleaned_data["description"]


class MemberForm(forms.Form):
    username = forms.CharField(
        max_length=150, widget=forms.TextInput(attrs={"placeholder": "username", "autocomplete": "off"})
    )

    def clean_username(self):
        username = self.cleaned_data["username"].strip()
        try:
            return get_user_model().objects.get(username=username, is_active=True)
        except get_user_model().DoesNotExist:
            raise forms.ValidationError(f"No active user named {username!r}.") from None


class GrantForm(forms.ModelForm):
    """A role over one node (by name), a tag or tag prefix, or all nodes."""

    node = forms.ModelChoiceField(
        queryset=Node.objects.all(),
        to_field_name="name",
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "node name", "autocomplete": "off"}),
        error_messages={"invalid_choice": "No node with this name."},
        help_text="Only for the one-node scope.",
    )

    class Meta:
        model = Grant
        fields = ["role", "scope", "node", "tag"]
        widgets = {"tag": forms.TextInput(attrs={"placeholder": "web or db-*", "autocomplete": "off"})}

    def __init__(self, *args, team: Team, **kwargs):
        super().__init__(*args, instance=Grant(team=team), **kwargs)
