"""Forms: validation of everything a user types, before it nears a shell or git."""

from __future__ import annotations

from django import forms
from django.db.models import Q

from .access import gate
from .access.models import Team
from .healthchecks import HealthCheck
from .models import BuildLocation, Credential, Deployment, Node, Repository
from .remote.generations import ROLLBACK_ACTIONS
from .validators import validate_generation, validate_node_name, validate_revision, validate_search_text, validate_tag


class DeployForm(forms.Form):
    action = forms.ChoiceField(choices=Deployment.Action.choices, initial=Deployment.Action.SWITCH)
    revision = forms.CharField(
        required=False,
        max_length=200,
        validators=[validate_revision],
        help_text="Branch, tag or commit; empty means the tracked branch's head.",
        widget=forms.TextInput(attrs={"placeholder": "tracked branch"}),
    )
    diff = forms.BooleanField(
        required=False,
        initial=True,
        label="Show the difference first",
        help_text="Build the system and show what would change (packages, sizes, a reboot hint); switch only "
        "once you confirm, to exactly that built system.",
    )


class BuildLocationForm(forms.Form):
    """Where a node builds (``change.set_build_location``); the build host among the nodes its editor may
    deploy (``build_hosts``)."""

    location = forms.ChoiceField(
        choices=[("", "its tags' default (else on the node)"), *BuildLocation.choices], required=False
    )
    build_host = forms.ModelChoiceField(queryset=Node.objects.none(), required=False)

    def __init__(self, *args, build_hosts=None, **kwargs):
        super().__init__(*args, **kwargs)
        if build_hosts is not None:
            self.fields["build_host"].queryset = build_hosts


class RollbackForm(forms.Form):
    """Back to ``generation`` (empty: the previous one), then switch to it now or boot it next time."""

    generation = forms.CharField(
        required=False,
        max_length=9,
        strip=False,  # " 3" is not a generation number: refused, not silently trimmed
        validators=[validate_generation],
        help_text="Empty: the previous generation.",
    )
    action = forms.ChoiceField(
        choices=[(a, a) for a in ROLLBACK_ACTIONS],
        initial="switch",
        help_text="switch: run it now and boot it; boot: boot it next time, the running system unchanged.",
    )

    def clean_generation(self) -> int | None:
        value = self.cleaned_data["generation"]
        return int(value) if value else None


class NamesField(forms.CharField):
    """Comma- or space-separated node names."""

    def to_python(self, value):
        value = super().to_python(value) or ""
        validate_search_text(value, max_length=100_000)
        names = sorted({n.strip() for n in value.replace(",", " ").split() if n.strip()})
        for name in names:
            validate_node_name(name)
        return names


class TagsField(forms.CharField):
    """Comma- or space-separated tags."""

    def to_python(self, value):
        value = super().to_python(value) or ""
        validate_search_text(value, max_length=1000)  # one text input: no control or invisible characters
        tags = sorted({t.strip().lower() for t in value.replace(",", " ").split() if t.strip()})
        for tag in tags:
            validate_tag(tag)
        return tags

    def prepare_value(self, value):
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value)
        return value


class NodeForm(forms.ModelForm):
    """A node; with ``user``, only the credentials and repositories their teams may use are offered.

    The node's current ones stay offered, so other fields can be edited; moving the node to
    another host, port or SSH user with them is still refused unless they are usable
    (``inventory.require_node_uses``).
    """

    tag_names = TagsField(label="Tags", required=False, help_text="Free labels, separated by commas.")

    class Meta:
        model = Node
        fields = [
            "name", "host", "port", "ssh_user", "use_sudo", "flake_attr", "repository", "credential", "jump_host",
        ]  # fmt: skip

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["tag_names"].initial = [t.name for t in self.instance.tags.all()]
        if user is not None:
            for name, usable, plural in (
                ("credential", gate.usable_credentials, "credentials"),
                ("repository", gate.usable_repositories, "repositories"),
            ):
                current = Q(pk=getattr(self.instance, f"{name}_id")) if self.instance.pk else Q(pk__in=[])
                field = self.fields[name]
                field.queryset = field.queryset.model.objects.filter(Q(pk__in=usable(user).values("pk")) | current)
                field.help_text = f"Only the {plural} your teams may use are offered."
            # Bastions: nodes the user may deploy on whose credential they may use (gate.jump_hosts_for).
            current = Q(pk=self.instance.jump_host_id) if self.instance.jump_host_id else Q(pk__in=[])
            field = self.fields["jump_host"]
            # Names only: a fleet of thousands renders one option each, without loading the nodes' other fields.
            field.queryset = Node.objects.filter(Q(pk__in=gate.jump_hosts_for(user).values("pk")) | current).only(
                "pk", "name"
            )
            if self.instance.pk:
                field.queryset = field.queryset.exclude(pk=self.instance.pk)
            field.help_text += " Offered: nodes you may deploy on whose credential your teams may use."


class WriteOnlyTextarea(forms.Textarea):
    """A textarea that never renders a value: not the stored secret, nor one just typed into a form shown again."""

    def format_value(self, value):
        return None


class CredentialForm(forms.ModelForm):
    """Secrets are write-only: the form never renders a secret back, stored or just typed."""

    secret = forms.CharField(
        label="Private key or password",
        required=False,
        strip=False,
        widget=WriteOnlyTextarea(attrs={"rows": 6, "autocomplete": "off", "spellcheck": "false"}),
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
        if self.instance.pk and not secret and "kind" in self.changed_data:
            self.add_error("secret", "Changing the kind needs the new private key or password.")
        if secret and kind == Credential.Kind.SSH_KEY:
            from .remote import load_private_key

            try:
                load_private_key(secret, data.get("passphrase") or None)
            except ValueError as exc:
                self.add_error("secret", str(exc))
        return data


class RepositoryForm(forms.ModelForm):
    """A repository.  A URL stored with a token (before URLs were validated) is shown redacted and must be
    replaced to save; a URL typed with a token is refused and not shown back."""

    class Meta:
        model = Repository
        fields = ["name", "url", "branch", "deploy_key"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["url"] = self.instance.display_url

    def _post_clean(self):
        super()._post_clean()
        if any(e.code == "token_in_url" for e in self.errors.as_data().get("url", [])) and self.is_bound:
            # The page shows the form again: never with the token in it.
            self.data = self.data.copy()
            self.data[self.add_prefix("url")] = ""


class UseForm(forms.Form):
    """Which team may use a credential or repository."""

    team = forms.ModelChoiceField(queryset=Team.objects.order_by("name"), empty_label="Choose a team")


class RolloutForm(forms.Form):
    """A rollout from the web: the same options as the API and ``deploy --tag``; ``rollouts.Options`` judges
    them against the nodes."""

    action = forms.ChoiceField(choices=Deployment.Action.choices, initial=Deployment.Action.SWITCH)
    revision = DeployForm.base_fields["revision"]
    tags = TagsField(required=False, help_text="Every node carrying one of these tags.")
    nodes = NamesField(required=False, help_text="Node names, separated by commas or spaces.")
    all_nodes = forms.BooleanField(required=False, label="All nodes I may deploy")
    confirm_all = forms.BooleanField(required=False, label="Yes, every one of them")
    parallelism = forms.IntegerField(
        min_value=1, max_value=500, initial=10, required=False, help_text="Nodes deployed at once (default 10)."
    )
    canary = forms.IntegerField(
        min_value=0,
        initial=0,
        required=False,
        help_text="The first this many nodes must succeed before the rest start.",
    )
    canary_tag = forms.CharField(
        required=False, max_length=50, validators=[validate_tag], help_text="Or: the nodes with this tag go first."
    )
    max_failures = forms.IntegerField(
        min_value=1, required=False, help_text="Start no further node after this many failures; empty: continue."
    )
    timeout = forms.IntegerField(min_value=1, required=False, help_text="Seconds per node; empty: the panel's default.")

    def options(self):
        from .rollouts import DEFAULT_PARALLELISM, Options

        data = self.cleaned_data
        return Options(
            action=data["action"],
            revision=data["revision"],
            tags=data["tags"],
            nodes=data["nodes"],
            all_nodes=data["all_nodes"],
            confirm_all=data["confirm_all"],
            parallelism=data["parallelism"] or DEFAULT_PARALLELISM,
            max_failures=data["max_failures"],
            canary=data["canary"] or 0,
            canary_tag=data["canary_tag"],
            timeout=data["timeout"],
        )


class PinHostKeyForm(forms.Form):
    key = forms.CharField(widget=forms.HiddenInput)
    fingerprint = forms.CharField(widget=forms.HiddenInput)


class HealthCheckForm(forms.ModelForm):
    """A health check of a node or a tag (the owner is set by the view, never by the form)."""

    class Meta:
        model = HealthCheck
        fields = [
            "name",
            "kind",
            "command",
            "host",
            "port",
            "url",
            "expected_status",
            "timeout_seconds",
            "retries",
            "interval_seconds",
            "on_failure",
        ]
        widgets = {"command": forms.TextInput(attrs={"size": 60})}


class ConfirmTimeoutForm(forms.Form):
    """A node's magic-rollback deadline."""

    confirm_timeout = forms.IntegerField(
        label="Confirmation deadline (s)",
        min_value=0,
        max_value=3600,
        help_text="After switch or test the node waits this long for the panel to confirm over a new SSH "
        "connection, then goes back to the system before by itself. 0 turns magic rollback off.",
    )
