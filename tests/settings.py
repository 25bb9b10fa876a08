"""Settings for the test run: the project's settings, on a throwaway data directory."""

import os
import tempfile

# Tests never touch a developer's real data directory (keys, database, mirrors).
os.environ.setdefault("PANEL_DATA_DIR", tempfile.mkdtemp(prefix="panel-test-"))

from controlpanel.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins; test-only
