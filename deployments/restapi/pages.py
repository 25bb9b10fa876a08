"""The API tokens page: every signed-in user lists, creates and revokes their own tokens.

A new token's whole text is in the one answer to its creation (a page, not a redirect, so it is
never stored in the session or a message); afterwards only its prefix is ever shown.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from deployments.errors import RequestError

from . import tokens
from .models import ApiToken


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, validators=[tokens.validate_token_name], help_text="What the token is for.")
    expires_in_days = forms.IntegerField(
        label="Expires after (days)",
        min_value=1,
        max_value=tokens.MAX_EXPIRY_DAYS,
        required=False,
        help_text="Empty: until revoked.",
    )


@login_required
@require_http_methods(["GET", "POST"])
def token_list(request):
    form = TokenForm(request.POST or None)
    created = None
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                token, secret = tokens.create_token(
                    request.user, name=form.cleaned_data["name"], expires_in_days=form.cleaned_data["expires_in_days"]
                )
            except RequestError as exc:
                form.add_error(None, str(exc))
                status = 400
            else:
                created = {"token": token, "secret": secret}
                form = TokenForm()
        else:
            status = 400
    return render(
        request,
        "restapi/token_list.html",
        {"tokens": ApiToken.objects.filter(user=request.user), "form": form, "created": created, "section": "tokens"},
        status=status,
    )


@login_required
@require_POST
def token_revoke(request, pk):
    token = ApiToken.objects.filter(user=request.user, pk=pk).first()
    if token is None:
        raise Http404("No such token")
    try:
        tokens.revoke_token(token, user=request.user)
        messages.info(request, f"Revoked the token {token.name} ({token.display}).")
    except RequestError as exc:
        messages.error(request, str(exc))
    return redirect("restapi:token-list")
