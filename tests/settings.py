"""Settings for the test run: the project's settings, on a throwaway data directory."""

import os
import sys
import tempfile

# Tests never touch a developer's real data directory (keys, database, mirrors).
os.environ.setdefault("PANEL_DATA_DIR", tempfile.mkdtemp(prefix="panel-test-"))

from controlpanel.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins; test-only

# The throwaway data directory gets its keys as a first start would (importing the
# project's settings writes nothing).
from controlpanel.bootstrap import ensure_data_dir  # noqa: E402

ensure_data_dir(sys.modules[__name__])
