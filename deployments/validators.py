"""Validators for every value that may reach a remote shell or git.

They run at input (forms, admin, management commands, API) so a bad value is
refused with a clear message long before anything is quoted for a shell.
"""

import re
import unicodedata
from urllib.parse import unquote

from django.core.exceptions import ValidationError

from .remote import COMMIT_SHA_RE, FLAKE_ATTR_RE  # noqa: F401  (defined once, beside the code that quotes them)
from .remote.generations import GENERATION_RE

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


def validate_generation(value: str) -> None:
    """A system generation number, as a user types it (it reaches a remote shell: digits only)."""
    if not GENERATION_RE.match(value or ""):
        raise ValidationError(
            "A generation is a number from 1 to 999999999%(hint)s.",
            code="invalid_generation",
            params={"hint": _shell_hint(value or "")},
        )


# --- repository URLs ------------------------------------------------------------

# What git fetches from: these URL schemes, an absolute local path, or scp-like [user@]host:path.
# Anything else (ext::, fd::, other schemes) would run a remote helper of the attacker's choosing.
REPO_URL_SCHEMES = ("https", "http", "ssh", "git", "file")
_SCHEME_RE = re.compile(r"\A(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)\Z", re.S)
_HELPER_RE = re.compile(r"\A[A-Za-z0-9._~+-]*::")  # git's "<transport>::<address>" remote-helper syntax
# git takes a colon before any slash as scp-like syntax.
_SCP_RE = re.compile(r"\A(?:(?P<user>[^@/]*)@)?(?P<host>\[[^\]/]*\]|[^:/\[\]@]+):(?P<path>.*)\Z", re.S)
_URL_USER_RE = re.compile(r"\A[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}\Z")
_PORT_RE = re.compile(r"\A[0-9]{1,5}\Z")
_REPO_URL_HELP = "Enter a git URL (https://host/path, ssh://[user@]host/path, user@host:path) or an absolute local path"
TOKEN_IN_URL_MESSAGE = (
    "Put no password or token in the URL (nor a user name in an https:// URL): it would be stored and shown. "
    "Store the secret as a credential (an SSH deploy key) and use an ssh:// or user@host:path URL."
)


def _invisible(value: str, *, undecodable: bool = False) -> list[str]:
    """Control, format (bidi, zero-width), separator and unassigned characters, as U+XXXX
    (and U+FFFD, what bytes that are not UTF-8 decode to, with ``undecodable``).

    A plain space is left to the shell-character check, whose message names it.
    """
    return sorted(
        {
            f"U+{ord(c):04X}"
            for c in value
            if (unicodedata.category(c)[0] in "CZ" and c != " ") or (undecodable and c == "\ufffd")
        }
    )


def _repo_url_error(message: str, code: str = "invalid_repo") -> ValidationError:
    return ValidationError(message, code=code)


def _check_path(path: str) -> None:
    if any(part.startswith("-") for part in path.split("/")):
        raise _repo_url_error(
            f"{_REPO_URL_HELP}: no part of the path may start with '-' (git could take it for an option)."
        )


def _check_host(host: str) -> None:
    if host.startswith("[") and host.endswith("]") and IPV6_RE.match(host[1:-1]) and ":" in host:
        return
    if not HOST_RE.match(host) or len(host) > 253:
        raise _repo_url_error(f"{_REPO_URL_HELP}: {host[:60]!r} is not a host name or address.")


def _check_user(user: str, *, allowed: bool) -> None:
    if ":" in user or not allowed:
        raise _repo_url_error(TOKEN_IN_URL_MESSAGE, code="token_in_url")
    if not _URL_USER_RE.match(user):
        raise _repo_url_error(f"{_REPO_URL_HELP}: the user name must not start with '-' or hold odd characters.")


def validate_repo_url(value: str) -> None:
    """A URL git fetches from safely: a known transport, no option-like host, user or path, no secret.

    git percent-decodes URLs before it splits them (``ssh://%2doProxyCommand=…``), so every check
    also runs on the decoded text.  Messages never repeat a token found in the URL.
    """
    value = value or ""
    decoded = unquote(value)
    hidden = _invisible(value + decoded)
    if hidden:
        raise _repo_url_error(
            f"The URL contains invisible or control characters ({', '.join(hidden[:5])}), which could make it "
            "read differently from what git fetches."
        )
    if decoded.startswith("-") or any(c in decoded for c in " ;`$|&<>\"'\\") or "?" in value or "#" in value:
        raise ValidationError(f"{_REPO_URL_HELP}%(hint)s.", code="invalid_repo", params={"hint": _shell_hint(decoded)})
    if _HELPER_RE.match(decoded):
        raise _repo_url_error(f"{_REPO_URL_HELP}: git remote helpers (<transport>::) are not allowed.")
    url = _SCHEME_RE.match(value)
    if url:
        scheme = url["scheme"]
        if scheme not in REPO_URL_SCHEMES:
            raise _repo_url_error(f"{_REPO_URL_HELP}: the {scheme}:// transport is not allowed.")
        authority, slash, path = url["rest"].partition("/")
        userinfo, at, hostport = authority.rpartition("@")
        if at:
            _check_user(unquote(userinfo), allowed=scheme == "ssh")
        hostport = unquote(hostport)
        if scheme == "file":
            if hostport not in ("", "localhost"):
                raise _repo_url_error(f"{_REPO_URL_HELP}: a file:// URL names a local path (file:///srv/flake).")
        else:
            host, port = hostport, ""
            if not host.startswith("[") and ":" in host:
                host, _, port = host.rpartition(":")
            elif "]:" in host:
                host, _, port = host.rpartition(":")
            if port and not _PORT_RE.match(port):
                raise _repo_url_error(f"{_REPO_URL_HELP}: the port must be a number.")
            _check_host(host)
        if not slash or not path.strip("/"):
            raise _repo_url_error(f"{_REPO_URL_HELP}: the URL names no repository path.")
        _check_path(unquote(path))
        return
    if value.startswith("/"):
        _check_path(decoded)
        return
    scp = _SCP_RE.match(value)
    if scp:
        if scp["user"] is not None:
            _check_user(scp["user"], allowed=True)
        _check_host(scp["host"])
        path = scp["path"]
        if not path or path.startswith("-"):
            raise _repo_url_error(f"{_REPO_URL_HELP}: the path after ':' must not be empty or start with '-'.")
        _check_path(path)
        return
    raise _repo_url_error(f"{_REPO_URL_HELP}.")


# "scheme://userinfo@" and scp-like "user:secret@host:", wherever they stand in a text.
_URL_USERINFO_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s\"'<>]*)@")
_SCP_SECRET_RE = re.compile(r"(?<![\w.:/-])[\w.-]+:[^\s@/\"'<>]+@(?=[\w.\[-]+:)")


def redact_url_secrets(text: str) -> str:
    """``text`` with any password or token in a URL replaced by ``***`` (an ssh:// user name stays).

    For rows and audit events stored before URLs were validated; only what is shown is redacted.
    """

    def userinfo(m: re.Match) -> str:
        if m["scheme"].lower() == "ssh://" and ":" not in m["userinfo"]:
            return m.group(0)
        return f"{m['scheme']}***@"

    return _SCP_SECRET_RE.sub("***@", _URL_USERINFO_RE.sub(userinfo, text or ""))


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
    bad = _invisible(value, undecodable=True)
    if bad:
        raise ValidationError(
            "Control, invisible or undecodable characters are not allowed (%(chars)s).",
            code="invisible_characters",
            params={"chars": ", ".join(bad[:5])},
        )


# A team name is what grants and the audit trail show to identify who may do what: plain ASCII, so
# "ops" and a look-alike "оps" (Cyrillic о) can never both be teams.
TEAM_NAME_RE = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,98}[A-Za-z0-9_.-])?\Z")


def validate_team_name(value: str) -> None:
    if not TEAM_NAME_RE.match(value or ""):
        raise ValidationError(
            "Team names use letters, digits, spaces, '_', '.' and '-' (ASCII), up to 100 characters%(hint)s.",
            code="invalid_team_name",
            params={"hint": _shell_hint(value or "")},
        )


# --- GitOps ---------------------------------------------------------------------

# A comment on an approval decision: words, digits, spaces, newlines and plain punctuation; never a shell
# character (it is shown, audited and sent on by notifications, which may hand it to scripts).
COMMENT_RE = re.compile(r"\A[\w .,:!?/@%+=\r\n-]{0,1000}\Z")
# A webhook delivery id (a UUID, GitHub's GUID, GitLab's idempotency key, a generic sender's id).
DELIVERY_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,99}\Z")


def validate_comment(value: str) -> None:
    if not COMMENT_RE.match(value or ""):
        raise ValidationError(
            "A comment is up to 1000 letters, digits, spaces and plain punctuation (. , : ! ? / @ %% + = -)%(hint)s.",
            code="invalid_comment",
            params={"hint": _shell_hint(value or "")},
        )


# -- health checks (deployments/healthchecks.py) ----------------------------------------------------
CHECK_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,49}\Z")
# An http(s) URL probed from the panel: a host name, IPv4 or [IPv6] address, or the placeholder {host}
# (the node's host), an optional port, then a path and query of URL-safe characters only (no spaces,
# quotes, backslashes or shell characters; no user:password@).
CHECK_URL_RE = re.compile(
    r"\Ahttps?://(?:\{host\}|\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
    r"(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%/=&+,:@-]*)?(?:\?[A-Za-z0-9._~%/=&+,:@-]*)?\Z"
)
CHECK_COMMAND_MAX = 1000


def validate_check_name(value: str) -> None:
    if not CHECK_NAME_RE.match(value or ""):
        raise ValidationError(
            "A check name uses letters, digits, '_', '.', '-', up to 50 characters%(hint)s.",
            code="invalid_check_name",
            params={"hint": _shell_hint(value or "")},
        )


def validate_check_url(value: str) -> None:
    value = value or ""
    if not CHECK_URL_RE.match(value):
        raise ValidationError(
            "Enter an http:// or https:// URL: a host name, an IP address or {host} (the node's), an optional "
            "port, a path; no spaces, quotes or shell characters, no user or password%(hint)s.",
            code="invalid_check_url",
            params={"hint": _shell_hint(value.replace("{host}", ""))},
        )
    m = re.search(r"\]?:([0-9]{1,5})(?:/|\?|\Z)", value.split("://", 1)[1])
    if m and not 1 <= int(m.group(1)) <= 65535:
        raise ValidationError("The URL's port must be 1-65535.", code="invalid_check_url")


def validate_check_command(value: str) -> None:
    """A health check's command is a shell command by design (it runs on the node with ``sh -c``, as the
    node's SSH user): only its size and characters are checked, and only node admins may set one."""
    value = value or ""
    if not value.strip():
        raise ValidationError("Enter the command to run on the node.", code="invalid_check_command")
    if len(value) > CHECK_COMMAND_MAX:
        raise ValidationError(
            f"A check command has at most {CHECK_COMMAND_MAX} characters.", code="invalid_check_command"
        )
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
        raise ValidationError("A check command is one line, without control characters.", code="invalid_check_command")
