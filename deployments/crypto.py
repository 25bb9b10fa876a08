"""Encryption of credential secrets at rest (Fernet, keys from settings).

Secrets are encrypted before they reach the database and decrypted only in
the worker, right before an SSH connection needs them.
"""

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def _fernet() -> MultiFernet:
    if not any(k.strip() for k in settings.CREDENTIAL_KEYS):
        raise ImproperlyConfigured(
            f"PANEL_CREDENTIAL_KEY is not set and there is no generated key in {settings.CREDENTIAL_KEY_PATH} yet: "
            f"give it, or run `manage.py migrate` or `manage.py runpanel` once to generate it"
        )
    try:
        return MultiFernet([Fernet(k.strip().encode()) for k in settings.CREDENTIAL_KEYS if k.strip()])
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(
            "PANEL_CREDENTIAL_KEY must be one or more url-safe base64 Fernet keys (32 bytes), comma separated"
        ) from exc


def encrypt(plaintext: str) -> str:
    """Return a token for ``plaintext``; empty stays empty (meaning: not set)."""
    if not plaintext:
        return ""
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    """Return the plaintext of ``token``; raise ``ValueError`` if no key opens it."""
    if not token:
        return ""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError("credential cannot be decrypted with the configured PANEL_CREDENTIAL_KEY") from None
