"""Forms: validation of everything a user types, before it nears a shell or git."""

from __future__ import annotations

from django import forms

from .models import Credential, Deployment, Node, Repository
from .validators import validate_revision, validate_tag


class DeployForm(forms.Form):
    action = forms.ChoiceField(choices=Deployment.Action.choices, initial=Deployment.Action.SWITCH)
    revision = forms.CharField(
        required=False,
        max_length=200,
        validators=[validate_revision],
        help_text="Branch, tag or commit; empty means the tracked branch's head.",
        widget=forms.TextInput(attrs={"placeholder": "tracked branch"}),
    )


class TagsField(forms.CharField):
    """Comma- or space-separated tags."""

    def to_python(self, value):
        value = super().to_python(value) or ""
        tags = sorted({t.strip().lower() for t in value.replace(",", " ").split() if t.strip()})
        for tag in tags:
            validate_tag(tag)
        return tags

    def prepare_value(self, value):
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value)
        return value


class NodeForm(forms.ModelForm):
    tag_names = TagsField(label="Tags", required=False, help_text="Free labels, separated by commas.")

    class Meta:
        model = Node
        fields = ["name", "host", "port", "ssh_user", "use_sudo", "flake_attr", "repository", "credential"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["tag_names"].initial = [t.name for t in self.instance.tags.all()]


class CredentialForm(forms.ModelForm):
    """Secrets are write-only: the form never renders a stored secret back."""

    secret = forms.CharField(
        label="Private key or password",
        required=False,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 6, "autocomplete": "off", "spellcheck": "false"}),
        help_text="Ed25519, RSA or ECDSA private key (OpenSSH/PEM), or the password. Leave empty to keep the stored one.",
    )
    passphrase = forms.CharField(
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Only for an encrypted private key.",
    )
    sudo_password = forms.CharField(
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Only for a non-root user with sudo; leave empty to keep.",
    )

    class Meta:
        model = Credential
        fields = ["name", "kind"]

    def clean(self):
        data = super().clean()
        secret, kind = data.get("secret"), data.get("kind")
        if not self.instance.pk and not secret:
            self.add_error("secret", "A new credential needs its private key or password.")
        if secret and kind == Credential.Kind.SSH_KEY:
            from .remote import load_private_key

            try:
                load_private_key(secret, data.get("passphrase") or None)
            except ValueError as exc:
                self.add_error("secret", str(exc))
        return data


class RepositoryForm(forms.ModelForm):
    class Meta:
        model = Repository
        fields = ["name", "url", "branch", "deploy_key"]


class PinHostKeyForm(forms.Form):
    key = forms.CharField(widget=forms.HiddenInput)
    fingerprint = forms.CharField(widget=forms.HiddenInput)
