"""Validators for every value that may reach a remote shell or git.

They run at input (forms, admin, management commands, API) so a bad value is
refused with a clear message long before anything is quoted for a shell.
"""

import re
import unicodedata

from django.core.exceptions import ValidationError

from .remote import COMMIT_SHA_RE, FLAKE_ATTR_RE  # noqa: F401  (defined once, beside the code that quotes them)

# Every pattern is anchored with \A…\Z: "$" would also accept a trailing newline.
NODE_NAME_RE = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
HOST_RE = re.compile(
    r"\A(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z"
)
IPV6_RE = re.compile(r"\A[0-9A-Fa-f:.]+\Z")
USER_RE = re.compile(r"\A[a-z_][a-z0-9_-]{0,31}\Z")
TAG_RE = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,49}\Z")
# A branch, tag or commit a user names (resolved to a COMMIT_SHA_RE by the mirror): no leading dash
# (option injection), no "..", no spaces or shell characters.
GIT_REF_RE = re.compile(r"\A(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,200}(?<!\.lock)(?<!/)\Z")
BAD_SHELL_CHARS = set(";&|`$<>()\\\"' \t\n*?[]{}!#~")


def _shell_hint(value: str) -> str:
    bad = sorted({c for c in value if c in BAD_SHELL_CHARS})
    if not bad:
        return ""
    shown = ", ".join("space" if c == " " else repr(c) for c in bad)
    return f" (it contains {shown}, which is not allowed)"


def validate_node_name(value: str) -> None:
    if not NODE_NAME_RE.match(value or ""):
        raise ValidationError(
            "Node names use lowercase letters, digits and dashes, up to 63 characters%(hint)s.",
            code="invalid_node_name",
            params={"hint": _shell_hint(value or "")},
        )


def validate_flake_attr(value: str) -> None:
    if not FLAKE_ATTR_RE.match(value or ""):
        raise ValidationError(
            "A flake attribute (nixosConfigurations.<attr>) uses letters, digits, '_', '.', '-'%(hint)s.",
            code="invalid_attr",
            params={"hint": _shell_hint(value or "")},
        )


def validate_host(value: str) -> None:
    value = value or ""
    if ":" in value and IPV6_RE.match(value):
        return
    if not HOST_RE.match(value) or len(value) > 253:
        raise ValidationError(
            "Enter a host name or IP address%(hint)s.", code="invalid_host", params={"hint": _shell_hint(value)}
        )


def validate_ssh_user(value: str) -> None:
    if not USER_RE.match(value or ""):
        raise ValidationError(
            "SSH user names use lowercase letters, digits, '_' and '-'%(hint)s.",
            code="invalid_user",
            params={"hint": _shell_hint(value or "")},
        )


def validate_tag(value: str) -> None:
    if not TAG_RE.match(value or ""):
        raise ValidationError(
            "Tags use lowercase letters, digits, '_', '.', '-', up to 50 characters%(hint)s.",
            code="invalid_tag",
            params={"hint": _shell_hint(value or "")},
        )


def validate_revision(value: str) -> None:
    if not GIT_REF_RE.match(value or ""):
        raise ValidationError(
            "A revision is a branch, tag or commit SHA (letters, digits, '.', '_', '/', '-', not starting with '-')%(hint)s.",
            code="invalid_revision",
            params={"hint": _shell_hint(value or "")},
        )


def validate_repo_url(value: str) -> None:
    value = value or ""
    if value.startswith("-") or any(c in value for c in "\n\r\t ;`$|&<>\"'\\"):
        raise ValidationError(
            "Enter a git URL (https://, ssh://, git@host:path) or an absolute local path%(hint)s.",
            code="invalid_repo",
            params={"hint": _shell_hint(value)},
        )
    if not (
        value.startswith(("https://", "http://", "ssh://", "git://", "file://", "/"))
        or re.match(r"^[\w.-]+@[\w.-]+:", value)
    ):
        raise ValidationError(
            "Enter a git URL (https://, ssh://, git@host:path) or an absolute local path.", code="invalid_repo"
        )


# --- search and filter fields ----------------------------------------------------

SEARCH_MAX_LENGTH = 200


def validate_search_text(value: str, *, max_length: int = SEARCH_MAX_LENGTH) -> None:
    """Text typed into a search or filter field: at most ``max_length`` visible characters.

    Refused: control characters (a NUL made the database fail), bidi overrides, zero-width and other
    invisible or unassigned characters, and U+FFFD, which is what bytes that are not UTF-8 decode to.
    Anything else, shell characters and look-alike letters included, is searched for as typed: a
    reviewer may well look for ``$(id)`` in the audit trail.
    """
    value = value or ""
    if len(value) > max_length:
        raise ValidationError(
            "At most %(max)d characters (this has %(length)d).",
            code="too_long",
            params={"max": max_length, "length": len(value)},
        )
    bad = sorted(
        {f"U+{ord(c):04X}" for c in value if c == "\ufffd" or (unicodedata.category(c)[0] in "CZ" and c != " ")}
    )
    if bad:
        raise ValidationError(
            "Control, invisible or undecodable characters are not allowed (%(chars)s).",
            code="invisible_characters",
            params={"chars": ", ".join(bad[:5])},
        )
