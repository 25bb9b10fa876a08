"""Every value that may reach a remote shell is refused at input when it carries shell syntax."""

import pytest
from django.core.exceptions import ValidationError

from deployments import validators

HOSTILE = [
    "a;rm -rf /",
    "web\n",
    "main\n",
    "$(reboot)",
    "`id`",
    "x|y",
    "x&y",
    "a b",
    "x>y",
    "x\ny",
    "'q'",
    '"q"',
    "-oProxyCommand=x",
    "",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_flake_attr_rejects_shell_metacharacters(value):
    with pytest.raises(ValidationError):
        validators.validate_flake_attr(value)


@pytest.mark.parametrize("value", HOSTILE + ["Web1", "web_1", "-web"])
def test_node_name_rejects_anything_but_lowercase_dns_labels(value):
    with pytest.raises(ValidationError):
        validators.validate_node_name(value)


@pytest.mark.parametrize("value", HOSTILE + ["a..b", "refs/heads/x.lock", "a//b"])
def test_revision_rejects_options_and_shell_syntax(value):
    with pytest.raises(ValidationError):
        validators.validate_revision(value)


@pytest.mark.parametrize("value", HOSTILE[:-1] + ["host_with_underscore"])
def test_host_rejects_shell_syntax(value):
    with pytest.raises(ValidationError):
        validators.validate_host(value)


@pytest.mark.parametrize("value", ["-u", "root;id", "$USER", "Root"])
def test_ssh_user_rejects_odd_names(value):
    with pytest.raises(ValidationError):
        validators.validate_ssh_user(value)


@pytest.mark.parametrize("value", ["--upload-pack=touch /tmp/x", "https://x/$(id)", "repo; id", "relative/path"])
def test_repo_url_rejects_option_injection_and_shell_syntax(value):
    with pytest.raises(ValidationError):
        validators.validate_repo_url(value)


def test_the_message_names_the_offending_characters():
    with pytest.raises(ValidationError) as exc:
        validators.validate_flake_attr("web;reboot")
    assert "';'" in exc.value.messages[0]


@pytest.mark.parametrize("good", ["devm", "web-01.prod", "host_2"])
def test_ordinary_attrs_pass(good):
    validators.validate_flake_attr(good)


@pytest.mark.parametrize("good", ["main", "release/2026.11", "v1.2.3", "0123456789abcdef0123456789abcdef01234567"])
def test_ordinary_revisions_pass(good):
    validators.validate_revision(good)


@pytest.mark.parametrize("good", ["10.0.0.5", "node1.example.org", "fe80::1", "localhost"])
def test_ordinary_hosts_pass(good):
    validators.validate_host(good)


@pytest.mark.parametrize(
    "validate",
    [
        validators.validate_flake_attr,
        validators.validate_node_name,
        validators.validate_revision,
        validators.validate_host,
        validators.validate_ssh_user,
        validators.validate_tag,
    ],
)
def test_a_trailing_newline_is_refused_by_every_pattern(validate):
    # "$" in a pattern matches before a final newline; every pattern is anchored with \Z instead.
    with pytest.raises(ValidationError):
        validate("devm\n")
