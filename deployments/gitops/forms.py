"""The GitOps pages' forms (validation only)."""

from __future__ import annotations

from django import forms

from deployments.validators import validate_comment

from .changes import MAX_POLL_INTERVAL
from .models import SyncPolicy

WEEKDAYS = [(1, "Mon"), (2, "Tue"), (3, "Wed"), (4, "Thu"), (5, "Fri"), (6, "Sat"), (7, "Sun")]


class PolicyForm(forms.Form):
    mode = forms.ChoiceField(choices=SyncPolicy.Mode.choices)
    action = forms.ChoiceField(choices=[("switch", "switch"), ("boot", "boot"), ("test", "test")], initial="switch")
    days = forms.TypedMultipleChoiceField(
        choices=WEEKDAYS,
        coerce=int,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Maintenance window days (UTC)",
    )
    start = forms.TimeField(required=False, label="Window start (UTC, HH:MM)")
    end = forms.TimeField(required=False, label="Window end (UTC, HH:MM)", help_text="Before the start: past midnight.")


class TagForm(PolicyForm):
    protected = forms.BooleanField(required=False, label="Protected: deploys need a second person's approval")


class PollForm(forms.Form):
    poll_interval = forms.IntegerField(min_value=0, max_value=MAX_POLL_INTERVAL, label="Polling interval (s, 0 = off)")


class DecisionForm(forms.Form):
    comment = forms.CharField(
        required=False, max_length=1000, widget=forms.Textarea(attrs={"rows": 3}), validators=[validate_comment]
    )
