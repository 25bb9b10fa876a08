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

# Another run of this suite (or other work) may share the machine's PostgreSQL and Redis:
# this run's test database, channel-layer prefix and queue name are its own.
_RUN = os.environ.setdefault("PANEL_TEST_RUN_ID", f"{os.getpid()}")
if DATABASES["default"]["ENGINE"].endswith("postgresql"):  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": f"test_panel_{_RUN}"}  # noqa: F405
if "prefix" in CHANNEL_LAYERS["default"].get("CONFIG", {}):  # noqa: F405
    CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = f"panel-test-{_RUN}"  # noqa: F405
Q_CLUSTER["name"] = f"panel-test-{_RUN}"  # noqa: F405

# Connections persist in the panel (PANEL_DB_CONN_MAX_AGE); in the test process they would keep
# threads' sessions open on the test database, which then cannot be dropped at the end of the run.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
