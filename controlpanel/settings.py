"""Settings for the NixOS control panel, read from the environment.

Every setting has an embedded default that works on one machine with no
services (SQLite in WAL mode, the django-q2 ORM broker, the in-memory
channel layer).  Scale-out: ``DATABASE_URL`` (PostgreSQL) and ``REDIS_URL``
(channels-redis, and the django-q2 Redis broker unless ``PANEL_BROKER=orm``).
Secrets may come from ``NAME_FILE`` instead of ``NAME`` (systemd credentials).
Bad values raise ``ImproperlyConfigured`` rather than being guessed around.

Importing this module only computes paths and reads what exists: it creates
no folder and writes no file.  The data directory and the keys generated in
it are made at start-up, by ``controlpanel/bootstrap.py`` (``runpanel`` and
``migrate`` call it).
"""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str | None = None) -> str | None:
    """Return ``$NAME``, or the contents of the file named by ``$NAME_FILE``."""
    if name in os.environ:
        return os.environ[name]
    path = os.environ.get(name + "_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path}: {exc.strerror}") from exc
    return default


def envbool(name: str, default: bool) -> bool:
    value = env(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true or false)")


def envint(name: str, default: int) -> int:
    value = env(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None


def envfloat(name: str, default: float) -> float:
    value = env(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None


def read_secret(path: Path) -> str:
    """The secret kept in ``path`` (a key generated at start-up), or "" if there is none yet."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ImproperlyConfigured(f"{path}: {exc.strerror}") from exc


DATA_DIR = Path(env("PANEL_DATA_DIR", str(BASE_DIR / "var"))).resolve()

# Keys given neither as NAME nor NAME_FILE are generated in the data directory on the
# first start (controlpanel/bootstrap.py) and read from there afterwards; until then
# they are empty, and a system check names the variable.
SECRET_KEY_PATH = DATA_DIR / "secret_key"
SECRET_KEY = env("SECRET_KEY") or read_secret(SECRET_KEY_PATH)
# Fernet key(s) that encrypt credentials at rest.  Several keys, comma separated,
# allow rotation: the first encrypts, all decrypt.
CREDENTIAL_KEY_PATH = DATA_DIR / "credential.key"
CREDENTIAL_KEYS = [k for k in (env("PANEL_CREDENTIAL_KEY") or read_secret(CREDENTIAL_KEY_PATH)).split(",") if k.strip()]

DEBUG = envbool("DEBUG", False)
ALLOWED_HOSTS = [h.strip() for h in env("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in env("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]
# Behind a TLS-terminating reverse proxy: trust its X-Forwarded-Proto, send HSTS and Secure cookies
# (runpanel also has daphne take the client address from X-Forwarded-For then).
BEHIND_TLS_PROXY = envbool("PANEL_BEHIND_TLS_PROXY", False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if BEHIND_TLS_PROXY else None
SECURE_HSTS_SECONDS = envint("PANEL_HSTS_SECONDS", 365 * 24 * 3600) if BEHIND_TLS_PROXY else 0
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = envbool("PANEL_SECURE_COOKIES", BEHIND_TLS_PROXY)
SESSION_COOKIE_HTTPONLY = True
# No script of the panel reads the CSRF cookie: forms carry the token, API clients read the cookie jar.
CSRF_COOKIE_HTTPONLY = True
CSRF_FAILURE_VIEW = "deployments.views.api.csrf_failure"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_q",
    "axes",
    "csp",
    "deployments",
    "deployments.audit",
    "deployments.access",
    "deployments.gitops",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files served by the panel itself: the CSP allows no CDN
    "deployments.restapi",
    "deployments.sync",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "deployments.audit.middleware.RequestIdMiddleware",
    # Below whitenoise: static files stay cacheable; everything else is answered no-store.
    "deployments.middleware.NoStoreMiddleware",
    "deployments.middleware.ApiErrorMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: it turns a login refused for too many failures into the lockout page.
    "axes.middleware.AxesMiddleware",
]

# Content-Security-Policy (django-csp): the panel's own scripts, styles and images only, no inline
# script or style, WebSockets and fetch to the panel itself.  The templates hold no inline code.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'none'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
        "base-uri": ["'none'"],
    }
}

ROOT_URLCONF = "controlpanel.urls"
ASGI_APPLICATION = "controlpanel.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "deployments.access.context_processors.access",
                "deployments.gitops.context_processors.approvals_badge",
            ],
        },
    },
]

DATABASE_URL = env("DATABASE_URL", "")
# Seconds a database connection is kept for reuse (0: one per request or query batch), checked before
# reuse; daphne's database calls share one thread, so its log feeds reuse one connection.
DB_CONN_MAX_AGE = envint("PANEL_DB_CONN_MAX_AGE", 300)
if DATABASE_URL:
    try:
        DATABASES = {
            "default": dj_database_url.parse(DATABASE_URL, conn_max_age=DB_CONN_MAX_AGE, conn_health_checks=True)
        }
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL: {exc}") from exc
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "panel.sqlite3",
            "OPTIONS": {
                # WAL lets daphne read logs while the worker appends them;
                # IMMEDIATE avoids "database is locked" on read-then-write upgrades.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
            # A file, not memory: the log writer thread and test servers need their own connections.
            "TEST": {"NAME": DATA_DIR / "test-panel.sqlite3"},
            "CONN_MAX_AGE": DB_CONN_MAX_AGE,
            "CONN_HEALTH_CHECKS": True,
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 reads with a 5 s socket timeout by default, no longer than channels-redis's
                # blocking BZPOPMIN (5 s): an idle receiver then fails with TimeoutError (channels_redis#422).
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30, "socket_connect_timeout": 5}],
                "prefix": env("PANEL_REDIS_PREFIX", "panel"),
            },
        }
    }
else:
    # In-memory: daphne and the worker are separate processes, so live
    # consumers follow the database instead of waiting for pushes.
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# GitOps (deployments/gitops): a webhook body's size limit (bytes), how far a generic webhook's signed
# timestamp may be from now (seconds), how long delivery ids are kept against replays (seconds), and how
# long an approval request may wait before it expires (seconds).
WEBHOOK_MAX_BYTES = envint("PANEL_WEBHOOK_MAX_BYTES", 1024 * 1024)
WEBHOOK_TIMESTAMP_WINDOW = envint("PANEL_WEBHOOK_TIMESTAMP_WINDOW", 300)
WEBHOOK_DELIVERY_KEEP = envint("PANEL_WEBHOOK_DELIVERY_KEEP", 7 * 24 * 3600)
APPROVAL_MAX_AGE = envint("PANEL_APPROVAL_MAX_AGE", 24 * 3600)
if WEBHOOK_MAX_BYTES < 1024 or WEBHOOK_TIMESTAMP_WINDOW < 1 or WEBHOOK_DELIVERY_KEEP < WEBHOOK_TIMESTAMP_WINDOW:
    raise ImproperlyConfigured(
        "PANEL_WEBHOOK_MAX_BYTES must be at least 1024, PANEL_WEBHOOK_TIMESTAMP_WINDOW at least 1, "
        "PANEL_WEBHOOK_DELIVERY_KEEP at least the timestamp window"
    )

# How long one deployment may run (seconds): the default of Deployment.timeout_seconds and its ceiling.
# Past it the worker stops the run on the node like a cancel and ends it failed ("timed out").
DEPLOY_TIMEOUT = envint("PANEL_DEPLOY_TIMEOUT", 4 * 3600)
# An SSH link that answers nothing for this long is dead: keepalives every third of it, TCP_USER_TIMEOUT,
# and a probe of a silent node. The worker then reconnects and resumes following the detached run.
LINK_TIMEOUT = envfloat("PANEL_LINK_TIMEOUT", 15.0)
# How long a node may stay unreachable after a drop before its deployment ends interrupted (reconcile later).
UNREACHABLE_LIMIT = envfloat("PANEL_UNREACHABLE_LIMIT", 120.0)
if DEPLOY_TIMEOUT < 1 or LINK_TIMEOUT < 3 or UNREACHABLE_LIMIT < 0:
    raise ImproperlyConfigured(
        "PANEL_DEPLOY_TIMEOUT must be at least 1, PANEL_LINK_TIMEOUT at least 3, PANEL_UNREACHABLE_LIMIT not negative"
    )
# A running deployment whose worker has not beaten for this long is interrupted.
HEARTBEAT_INTERVAL = envfloat("PANEL_HEARTBEAT_INTERVAL", 5.0)
HEARTBEAT_STALE_AFTER = envfloat("PANEL_HEARTBEAT_STALE_AFTER", 60.0)
# A rollout's node handed to the queue but still queued while nothing of the rollout started for this long,
# the broker empty, is handed out again (its task was lost with a killed worker; rollouts.advance_active_rollouts).
ROLLOUT_REHAND_AFTER = envfloat("PANEL_ROLLOUT_REHAND_AFTER", 120.0)
# Nodes of a rollout one worker process runs at once, each in its own thread (its own SSH connection and
# database connection): a worker process per running node would cost ~85 MB each.
ROLLOUT_THREADS = envint("PANEL_ROLLOUT_THREADS", 10)
if not 1 <= ROLLOUT_THREADS <= 200:
    raise ImproperlyConfigured(f"PANEL_ROLLOUT_THREADS={ROLLOUT_THREADS}: use a number from 1 to 200")
# How often the WebSocket follower looks at the database when nothing is pushed.
LOG_POLL_INTERVAL = envfloat("PANEL_LOG_POLL_INTERVAL", 0.05)
LOG_FLUSH_INTERVAL = envfloat("PANEL_LOG_FLUSH_INTERVAL", 0.025)
# How long the log writer retries a database that does not answer before it drops the lines it holds
# (recording the gap on the deployment); meanwhile the SSH reader waits once 50,000 lines are held.
LOG_STORE_GIVE_UP_AFTER = envfloat("PANEL_LOG_GIVE_UP_AFTER", 300.0)
# How long the worker retries a deployment's status change (its claim, its end) across a database outage.
DB_RETRY_FOR = envfloat("PANEL_DB_RETRY_FOR", 120.0)

BROKER = env("PANEL_BROKER", "redis" if REDIS_URL else "orm")
if BROKER not in ("orm", "redis"):
    raise ImproperlyConfigured(f"PANEL_BROKER={BROKER!r}: use orm or redis")
Q_CLUSTER = {
    "name": env("PANEL_QUEUE_NAME", "panel"),
    # Processes; a rollout's task runs up to ROLLOUT_THREADS nodes in threads of one (1 by default: a
    # process per running node; 10 cost 19 MB a running node instead of 85, see bench/README.md).
    "workers": envint("PANEL_WORKERS", 4),
    # The worker enforces DEPLOY_TIMEOUT itself (stopping the run on the node); django-q2 kills the task only
    # if that did not end it: after a node unreachable for UNREACHABLE_LIMIT and the stop's grace and finish.
    "timeout": DEPLOY_TIMEOUT + int(UNREACHABLE_LIMIT) + 300,
    # A deploy is never re-run by the queue: a re-deploy is a human decision.
    # retry > timeout keeps the broker from re-delivering a running task, and
    # the task's atomic claim makes a stray second delivery a no-op anyway.
    "retry": DEPLOY_TIMEOUT + int(UNREACHABLE_LIMIT) + 900,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "poll": envfloat("PANEL_QUEUE_POLL", 0.05),
    # Tasks a qcluster takes off the broker ahead of a free worker (django-q2's default: workers squared). A
    # task taken ahead waits behind a worker busy with a rollout's chain, and is lost if that qcluster is
    # killed; several qclusters on one broker share a rollout's tasks more evenly with a small limit.
    "queue_limit": envint("PANEL_QUEUE_LIMIT", envint("PANEL_WORKERS", 4) ** 2),
    "save_limit": 1000,
    "label": "Task queue",
}
if BROKER == "redis":
    if not REDIS_URL:
        raise ImproperlyConfigured("PANEL_BROKER=redis needs REDIS_URL")
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
    # Cluster heartbeats go to a Django cache with the ORM broker; the default cache is per process,
    # which would hide a running cluster from `manage.py deploy` (it warns when none runs). This one
    # is shared: Redis when there is one, else files in the data directory (deployments/queue_status.py).
    Q_CLUSTER["cache"] = "qcluster-status"
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "qcluster-status": (
            {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": REDIS_URL,
                "KEY_PREFIX": env("PANEL_REDIS_PREFIX", "panel"),
            }
            if REDIS_URL
            else {"BACKEND": "deployments.queue_status.StatusFileCache", "LOCATION": str(DATA_DIR / "qcluster-status")}
        ),
    }

# Sync status (deployments/sync/): how often the fleet is read (minutes; 0: only the refresh buttons),
# how many nodes are read at once, how long reading one may take, how long one `nix eval` may take.
SYNC_MINUTES = envint("PANEL_SYNC_MINUTES", 5)
SYNC_PARALLELISM = envint("PANEL_SYNC_PARALLELISM", 20)
SYNC_READ_TIMEOUT = envfloat("PANEL_SYNC_READ_TIMEOUT", 10.0)
SYNC_EVAL_TIMEOUT = envfloat("PANEL_SYNC_EVAL_TIMEOUT", 120.0)
if SYNC_MINUTES < 0 or SYNC_PARALLELISM < 1 or SYNC_READ_TIMEOUT <= 0 or SYNC_EVAL_TIMEOUT <= 0:
    raise ImproperlyConfigured(
        "PANEL_SYNC_MINUTES must be 0 (off) or more; PANEL_SYNC_PARALLELISM, PANEL_SYNC_READ_TIMEOUT and "
        "PANEL_SYNC_EVAL_TIMEOUT must be positive"
    )
NIX_BIN = env("PANEL_NIX", "nix")
# Notifications: one attempt's timeout, and how many attempts (with back-off) before a delivery fails for good.
NOTIFY_TIMEOUT = envfloat("PANEL_NOTIFY_TIMEOUT", 10.0)
NOTIFY_MAX_ATTEMPTS = envint("PANEL_NOTIFY_MAX_ATTEMPTS", 5)
if NOTIFY_TIMEOUT <= 0 or NOTIFY_MAX_ATTEMPTS < 1:
    raise ImproperlyConfigured("PANEL_NOTIFY_TIMEOUT and PANEL_NOTIFY_MAX_ATTEMPTS must be positive")
# Webhooks never reach the panel's own network (loopback, private, link-local, multicast, reserved addresses:
# a team admin must not make the panel probe or post to internal services) except these networks (CIDRs,
# comma-separated), e.g. "10.20.0.0/16" for a chat server inside.
NOTIFY_ALLOWED_NETWORKS = [n.strip() for n in (env("PANEL_NOTIFY_ALLOWED_NETWORKS", "") or "").split(",") if n.strip()]
try:
    import ipaddress as _ipaddress

    for _network in NOTIFY_ALLOWED_NETWORKS:
        _ipaddress.ip_network(_network, strict=False)
except ValueError as _exc:
    raise ImproperlyConfigured(f"PANEL_NOTIFY_ALLOWED_NETWORKS: {_exc}") from None
# The panel's address as people reach it, for links in notifications (none when unset).
BASE_URL = (env("PANEL_BASE_URL", "") or "").rstrip("/")
if BASE_URL and not BASE_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(f"PANEL_BASE_URL={BASE_URL!r}: use an http:// or https:// URL")
# E-mail for notifications: an SMTP server (none set: e-mail subscriptions fail, saying so).
EMAIL_BACKEND = env("PANEL_EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env("PANEL_EMAIL_HOST", "")
EMAIL_PORT = envint("PANEL_EMAIL_PORT", 25)
EMAIL_HOST_USER = env("PANEL_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = env("PANEL_EMAIL_PASSWORD", "")
EMAIL_USE_TLS = envbool("PANEL_EMAIL_STARTTLS", False)
EMAIL_USE_SSL = envbool("PANEL_EMAIL_TLS", False)
EMAIL_TIMEOUT = envint("PANEL_EMAIL_TIMEOUT", 10)
DEFAULT_FROM_EMAIL = env("PANEL_EMAIL_FROM", "nixos-panel@localhost")
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("PANEL_EMAIL_STARTTLS and PANEL_EMAIL_TLS exclude each other: choose one")
# Prometheus metrics at /metrics, for a scraper sending `Authorization: Bearer <token>`; unset: /metrics is 404.
METRICS_TOKEN = env("PANEL_METRICS_TOKEN", "") or ""

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Login throttling (django-axes): after PANEL_LOGIN_FAILURE_LIMIT failures for one user name, or from one
# address, further attempts for it are refused (HTTP 429, audited as auth.locked_out) until
# PANEL_LOGIN_LOCKOUT_MINUTES have passed without another failure.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = envint("PANEL_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=envfloat("PANEL_LOGIN_LOCKOUT_MINUTES", 15.0))
if AXES_FAILURE_LIMIT < 1 or AXES_COOLOFF_TIME <= timedelta(0):
    raise ImproperlyConfigured("PANEL_LOGIN_FAILURE_LIMIT and PANEL_LOGIN_LOCKOUT_MINUTES must be positive")
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # each on its own: a user name, or an address
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_RESET_ON_SUCCESS = False  # a login of one's own account must not clear the failures from one's address
AXES_DISABLE_ACCESS_LOG = True  # successful logins are on the audit trail already
AXES_VERBOSE = False
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "deployments:dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"  # whitenoise serves from finders; it only needs the folder to exist (bootstrap)
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []
WHITENOISE_USE_FINDERS = True

REPO_CACHE_DIR = DATA_DIR / "repos"
# The panel's own known_hosts for fetching private git repositories over SSH.
GIT_KNOWN_HOSTS = Path(env("PANEL_GIT_KNOWN_HOSTS", str(DATA_DIR / "git_known_hosts")))

# The audit trail (docs/audit.md).
# Ed25519 private key (PEM) that signs checkpoints, created 0600 by a new panel's first checkpoint (never
# again once checkpoints exist); its .pub next to it.  In production a systemd credential, outside DATA_DIR.
AUDIT_SIGNING_KEY_FILE = Path(env("PANEL_AUDIT_SIGNING_KEY_FILE") or DATA_DIR / "audit-signing.key")
# The Ed25519 public key (PEM) `audit verify` checks checkpoints with; unset: derived from the signing key
# file if it exists (verification fails without either, and never creates a key).
AUDIT_PUBLIC_KEY = env("PANEL_AUDIT_PUBLIC_KEY", "")
if AUDIT_PUBLIC_KEY:
    from deployments.audit.chain import load_public_key

    try:
        load_public_key(AUDIT_PUBLIC_KEY)
    except ValueError as exc:
        raise ImproperlyConfigured(f"PANEL_AUDIT_PUBLIC_KEY: {exc}") from None
# Where checkpoints are written, one file each, never rewritten.
AUDIT_CHECKPOINT_DIR = Path(env("PANEL_AUDIT_CHECKPOINT_DIR") or DATA_DIR / "audit-checkpoints")
# Optional: every checkpoint is also POSTed here (JSON).
AUDIT_CHECKPOINT_URL = env("PANEL_AUDIT_CHECKPOINT_URL", "")
# How often the periodic checkpoint runs; 0 disables it.
AUDIT_CHECKPOINT_MINUTES = envint("PANEL_AUDIT_CHECKPOINT_MINUTES", 15)
if AUDIT_CHECKPOINT_MINUTES < 0:
    raise ImproperlyConfigured("PANEL_AUDIT_CHECKPOINT_MINUTES must be 0 (off) or more")
# PostgreSQL only: commit transactions that write an audit event with synchronous_commit = off
# (docs/audit.md: the trade-off).
AUDIT_ASYNC_COMMIT = envbool("PANEL_AUDIT_ASYNC_COMMIT", False)

# The REST API (deployments/restapi/, /api/v1/): Bearer tokens or the session (CSRF enforced), JSON only,
# the panel's error shape; every view asks the gate itself.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "deployments.restapi.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",  # CSRF enforced on unsafe methods
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["deployments.restapi.framework.LimitedJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "deployments.restapi.framework.exception_handler",
    "DEFAULT_METADATA_CLASS": None,  # no OPTIONS answers describing forms: the schema does that
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "NixOS control panel API",
    "DESCRIPTION": "Nodes, deployments and their logs, rollouts, the audit trail and your API tokens. "
    "Authenticate with `Authorization: Bearer npt_…` (create a token on the API tokens page).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # Several models have a "kind" and an "action" of their own: each choice set gets its own name.
    "ENUM_NAME_OVERRIDES": {
        "DeploymentKindEnum": "deployments.models.Deployment.Kind",
        "DeploymentActionEnum": "deployments.models.Deployment.Action",
        "RollbackActionEnum": "deployments.remote.generations.ROLLBACK_ACTIONS",
        "HealthCheckKindEnum": "deployments.healthchecks.HealthCheck.Kind",
        "ApprovalKindEnum": "deployments.gitops.models.ApprovalRequest.Kind",
        "SubscriptionKindEnum": "deployments.sync.models.Subscription.Kind",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
    # "django-q" is the logger django-q2 writes to (django_q.conf.logger).
    "loggers": {"paramiko": {"level": "WARNING"}, "django-q": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}
