# services.nixos-panel: the control panel as NixOS services.
#
# Three units, as the panel runs when it is not `manage.py runpanel`:
#   nixos-panel-migrate.service  oneshot: `manage.py migrate` (also (re)creates the reaper and
#                                audit checkpoint schedules and the audit triggers, post_migrate)
#   nixos-panel-web.service      daphne: pages, JSON API, log WebSocket
#   nixos-panel-worker.service   `manage.py qcluster`: runs deployments and the schedules
# grouped by nixos-panel.target. docs/nixos.md explains the choices; tests/nix/ tests them.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.nixos-panel;
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    types
    ;

  # A secret given as a file must not be a Nix path (it would be copied into the world-readable
  # store); lib.types.pathWith enforces that where this nixpkgs has it.
  secretPath =
    if types ? pathWith then
      types.pathWith {
        inStore = false;
        absolute = true;
      }
    else
      types.str;

  redisName = "nixos-panel";
  redisServer = config.services.redis.servers.${redisName};
  redisUnit = "redis-${redisName}.service";

  # Variables the module sets from its own options; `settings` must not set them too.
  managed = [
    "PANEL_DATA_DIR"
    "PANEL_HOST"
    "PANEL_PORT"
    "PANEL_WORKERS"
    "DATABASE_URL"
    "REDIS_URL"
    "PANEL_AUDIT_SIGNING_KEY_FILE"
  ];

  # Secrets with an option of their own; secretFiles is for the rest of the table.
  dedicatedSecrets = [
    "SECRET_KEY"
    "PANEL_CREDENTIAL_KEY"
  ];

  # Credential name -> file on the host. Each becomes LoadCredential=NAME:file and, in the
  # environment, NAME_FILE=%d/NAME (%d is $CREDENTIALS_DIRECTORY), which settings.py reads.
  credentials = lib.filterAttrs (_: file: file != null) (
    {
      SECRET_KEY = cfg.secretKeyFile;
      PANEL_CREDENTIAL_KEY = cfg.credentialKeyFile;
      DATABASE_URL = cfg.database.urlFile;
      REDIS_URL = cfg.redis.urlFile;
    }
    // cfg.secretFiles
  );
  # The audit signing key is a key file, not a value: its variable already names a file.
  auditKeyCredential = "audit-signing.key";
  loadCredentialOf =
    creds:
    lib.mapAttrsToList (name: file: "${name}:${file}") creds
    ++ lib.optional (cfg.auditSigningKeyFile != null) "${auditKeyCredential}:${cfg.auditSigningKeyFile}";
  loadCredential = loadCredentialOf credentials;
  # The migrate unit may connect as the tables' owner while web and worker connect as a role
  # that cannot drop the audit triggers (docs/audit.md, "PostgreSQL roles").
  migrateLoadCredential = loadCredentialOf (
    credentials
    // lib.optionalAttrs (cfg.database.migrationUrlFile != null) {
      DATABASE_URL = cfg.database.migrationUrlFile;
    }
  );

  databaseUrl =
    if cfg.database.createLocally then
      # Peer authentication over PostgreSQL's socket: no password anywhere.
      "postgres://${cfg.database.user}@%2Frun%2Fpostgresql/${cfg.database.name}"
    else
      cfg.database.url;
  redisUrl = if cfg.redis.createLocally then "unix://${redisServer.unixSocket}" else cfg.redis.url;

  toEnv = value: if lib.isBool value then lib.boolToString value else toString value;

  # The environment as the panel reads it ...
  values = {
    PANEL_DATA_DIR = cfg.dataDir;
    PANEL_HOST = cfg.host;
    PANEL_PORT = toString cfg.port;
    PANEL_WORKERS = toString cfg.workers;
    PYTHONUNBUFFERED = "1";
  }
  // lib.optionalAttrs (databaseUrl != null) { DATABASE_URL = databaseUrl; }
  // lib.optionalAttrs (redisUrl != null) { REDIS_URL = redisUrl; }
  // lib.mapAttrs (_: toEnv) cfg.settings;
  # ... and the variables naming a file of the credentials directory (variable -> credential).
  credentialFiles =
    lib.mapAttrs' (name: _: lib.nameValuePair "${name}_FILE" name) credentials
    // lib.optionalAttrs (cfg.auditSigningKeyFile != null) {
      PANEL_AUDIT_SIGNING_KEY_FILE = auditKeyCredential;
    };
  # systemd resolves specifiers in Environment=, so a literal % (the %2F of the local
  # PostgreSQL URL) is written %%, and %d is the credentials directory.
  environment =
    lib.mapAttrs (_: lib.replaceStrings [ "%" ] [ "%%" ]) values
    // lib.mapAttrs (_: credential: "%d/${credential}") credentialFiles;

  # git (repository mirrors) and ssh (git over SSH) are run by the web process (it resolves
  # revisions when a deploy is requested) and by the worker; nix evaluates the expected systems
  # of the sync status (deployments/sync/evaluate.py).
  path = [
    pkgs.git
    pkgs.openssh
    pkgs.nix
  ];

  useStateDirectory = lib.hasPrefix "/var/lib/" cfg.dataDir;

  dbUnits = lib.optionals cfg.database.createLocally [ "postgresql.service" ];
  redisUnits = lib.optionals cfg.redis.createLocally [ redisUnit ];

  # What every panel process shares: who it runs as, where, with which secrets, and how confined.
  # Only a NixOS VM test proves these are applied (docs/nixos.md).
  commonServiceConfig = {
    User = cfg.user;
    Group = cfg.group;
    SupplementaryGroups = lib.optionals cfg.redis.createLocally [ redisServer.group ];
    WorkingDirectory = cfg.dataDir;
    StateDirectory = mkIf useStateDirectory (lib.removePrefix "/var/lib/" cfg.dataDir);
    StateDirectoryMode = mkIf useStateDirectory "0700";
    ReadWritePaths = [ cfg.dataDir ];
    LoadCredential = loadCredential;
    UMask = "0077";

    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    RemoveIPC = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
    # Not MemoryDenyWriteExecute: cffi (cryptography, psycopg) may need writable code pages,
    # and nothing here has run the panel under it.
  };

  manage = "${cfg.package}/bin/nixos-panel-manage";

  # nixos-panel-manage for administrators: manage.py as the panel's user, with the units'
  # environment and credentials, in a transient unit (systemd-run) so LoadCredential works.
  # systemd-run resolves no specifiers: values go as they are, and the credentials directory
  # (%d in the units) is spelled out, /run/credentials/<unit>.
  setenv = name: value: "--setenv=${lib.escapeShellArg "${name}=${value}"}";
  setenvCredential = name: credential: "--setenv=${name}=\"$creds\"/${lib.escapeShellArg credential}";
  manageArgs = [
    "--unit=\"$unit\""
    "--property=User=${lib.escapeShellArg cfg.user}"
    "--property=Group=${lib.escapeShellArg cfg.group}"
  ]
  ++ map (g: "--property=SupplementaryGroups=${lib.escapeShellArg g}") commonServiceConfig.SupplementaryGroups
  ++ lib.optional useStateDirectory "--property=StateDirectory=${lib.escapeShellArg (lib.removePrefix "/var/lib/" cfg.dataDir)}"
  ++ [
    "--property=WorkingDirectory=${lib.escapeShellArg cfg.dataDir}"
    "--property=UMask=0077"
  ]
  ++ map (c: "--property=LoadCredential=${lib.escapeShellArg c}") loadCredential
  ++ lib.mapAttrsToList setenv (values // { PATH = lib.makeBinPath path; })
  ++ lib.mapAttrsToList setenvCredential credentialFiles;
  manageScript = pkgs.writeShellScriptBin "nixos-panel-manage" ''
    # Runs ${manage} "$@" as ${cfg.user}, the way the panel's units run it.
    if [ "$(id -u)" != 0 ]; then
      echo "nixos-panel-manage: run it as root (sudo nixos-panel-manage ...)" >&2
      exit 1
    fi
    unit=nixos-panel-manage-$$
    creds=/run/credentials/$unit.service
    if [ -t 0 ] && [ -t 1 ]; then io=--pty; else io=--pipe; fi
    # The person behind sudo, for the audit trail's command-line events (the unit runs as ${cfg.user}).
    exec ${pkgs.systemd}/bin/systemd-run --quiet --wait --collect --service-type=exec "$io" \
      --setenv=SUDO_USER="''${SUDO_USER:-}" \
      ${lib.concatStringsSep " \\\n  " manageArgs} \
      -- ${manage} "$@"
  '';

  unitDefaults = {
    after = [
      "network-online.target"
    ]
    ++ dbUnits
    ++ lib.optionals cfg.database.createLocally [
      # NixOS >= 25.11 creates ensureUsers/ensureDatabases in postgresql-setup.service
      # (postgresql.target); ordering after units that do not exist is harmless.
      "postgresql-setup.service"
      "postgresql.target"
    ]
    ++ redisUnits;
    wants = [ "network-online.target" ] ++ lib.optionals cfg.database.createLocally [ "postgresql.target" ];
    requires = dbUnits ++ redisUnits;
    partOf = [ "nixos-panel.target" ];
    inherit environment path;
  };
in
{
  options.services.nixos-panel = {
    enable = mkEnableOption "the NixOS control panel (web and worker)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = "The panel package; its bin/ must provide nixos-panel-manage and nixos-panel-web.";
    };

    user = mkOption {
      type = types.str;
      default = "nixos-panel";
      description = "System user the panel runs as (created when left at the default).";
    };

    group = mkOption {
      type = types.str;
      default = "nixos-panel";
      description = "Group the panel runs as (created when left at the default).";
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "::";
      description = "Address the web unit listens on (PANEL_HOST). Keep it on loopback behind a TLS proxy.";
    };

    port = mkOption {
      type = types.port;
      default = 8000;
      description = "TCP port the web unit listens on (PANEL_PORT).";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open `port` in the firewall (only useful with a non-loopback `host`).";
    };

    dataDir = mkOption {
      type = types.str;
      default = "/var/lib/nixos-panel";
      description = ''
        PANEL_DATA_DIR: SQLite database (without DATABASE_URL), generated keys, repository
        mirrors, audit checkpoints. Under /var/lib it is the units' StateDirectory; elsewhere
        it is created by systemd-tmpfiles. Mode 0700, owned by `user`.
      '';
    };

    workers = mkOption {
      type = types.ints.positive;
      default = 4;
      description = "PANEL_WORKERS: deployments the worker unit runs at the same time.";
    };

    web.enable = mkOption {
      type = types.bool;
      default = true;
      description = "Run the web unit here (false: a worker-only machine of a scaled-out panel).";
    };

    web.proxyHeaders = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Run daphne with --proxy-headers: take the client address from X-Forwarded-For (the
        audit trail's source_ip). Only behind a reverse proxy, with `host` on loopback:
        anyone who reaches daphne directly could set the header.
      '';
    };

    worker.enable = mkOption {
      type = types.bool;
      default = true;
      description = "Run the worker unit (qcluster, which also runs the periodic schedules) here.";
    };

    secretKeyFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/nixos-panel/secret-key";
      description = "Django SECRET_KEY, as a systemd credential. Default: generated in the data dir.";
    };

    credentialKeyFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/nixos-panel/credential-key";
      description = ''
        PANEL_CREDENTIAL_KEY: Fernet key(s), comma-separated, encrypting the SSH credentials
        stored in the database. Default: generated in the data dir.
      '';
    };

    auditSigningKeyFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/nixos-panel/audit-signing.key";
      description = ''
        Ed25519 private key (PEM) signing audit checkpoints (PANEL_AUDIT_SIGNING_KEY_FILE),
        as a systemd credential. Default: generated in the data dir.
      '';
    };

    secretFiles = mkOption {
      type = types.attrsOf secretPath;
      default = { };
      example = {
        CSRF_TRUSTED_ORIGINS = "/run/secrets/nixos-panel/csrf-trusted-origins";
      };
      description = ''
        Any other variable of the panel's configuration table as a file: NAME = file gives the
        units LoadCredential=NAME:file and NAME_FILE=%d/NAME.
      '';
    };

    settings = mkOption {
      type = types.attrsOf (
        types.oneOf [
          types.str
          types.int
          types.bool
        ]
      );
      default = { };
      example = {
        ALLOWED_HOSTS = "panel.example.org";
        CSRF_TRUSTED_ORIGINS = "https://panel.example.org";
        PANEL_SECURE_COOKIES = true;
        PANEL_BEHIND_TLS_PROXY = true;
      };
      description = ''
        Further environment of the units (the README's configuration table); booleans become
        true/false. Secrets do not belong here (they would be in the Nix store): use the
        *File options or secretFiles.
      '';
    };

    database = {
      createLocally = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Enable PostgreSQL on this host with a database and a role named after the panel's
          user, reached over its socket with peer authentication (no password).
        '';
      };
      name = mkOption {
        type = types.str;
        default = "nixos-panel";
        description = "Database created by createLocally.";
      };
      user = mkOption {
        type = types.str;
        default = cfg.user;
        defaultText = lib.literalExpression "config.services.nixos-panel.user";
        description = "PostgreSQL role created by createLocally (peer authentication: the panel's user).";
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "postgres://nixos-panel@db.example.org/nixos-panel";
        description = "DATABASE_URL without a password (it ends up in the Nix store). Default: SQLite in the data dir.";
      };
      urlFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/secrets/nixos-panel/database-url";
        description = "A file holding DATABASE_URL (with its password), as a systemd credential.";
      };
      migrationUrlFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/secrets/nixos-panel/database-url-owner";
        description = ''
          A file holding the DATABASE_URL of the migrate unit only: the role owning the tables,
          while urlFile's role, used by web and worker, cannot drop or disable the audit
          triggers (docs/audit.md, "PostgreSQL roles"). Needs urlFile.
        '';
      };
    };

    redis = {
      createLocally = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Run a Redis instance (services.redis.servers.nixos-panel) on a unix socket only,
          for the channel layer and the task queue.
        '';
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "redis://redis.example.org:6379/0";
        description = "REDIS_URL without a password. Default: none (in-memory channel layer, ORM queue).";
      };
      urlFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        description = "A file holding REDIS_URL (with its password), as a systemd credential.";
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.database.createLocally -> cfg.database.url == null && cfg.database.urlFile == null;
        message = "services.nixos-panel.database: createLocally sets DATABASE_URL itself; leave url and urlFile unset.";
      }
      {
        assertion = cfg.database.url == null || cfg.database.urlFile == null;
        message = "services.nixos-panel.database: set url or urlFile, not both.";
      }
      {
        assertion = cfg.database.migrationUrlFile != null -> cfg.database.urlFile != null;
        message = "services.nixos-panel.database.migrationUrlFile: set urlFile too (web and worker connect with it).";
      }
      {
        assertion = cfg.database.createLocally -> cfg.database.name == cfg.database.user;
        message = "services.nixos-panel.database: createLocally needs name == user (ensureDBOwnership).";
      }
      {
        assertion = cfg.redis.createLocally -> cfg.redis.url == null && cfg.redis.urlFile == null;
        message = "services.nixos-panel.redis: createLocally sets REDIS_URL itself; leave url and urlFile unset.";
      }
      {
        assertion = cfg.redis.url == null || cfg.redis.urlFile == null;
        message = "services.nixos-panel.redis: set url or urlFile, not both.";
      }
      {
        assertion = cfg.web.enable || cfg.worker.enable;
        message = "services.nixos-panel: enable the web unit, the worker unit or both.";
      }
    ]
    ++ map (name: {
      assertion = !(cfg.settings ? ${name});
      message = "services.nixos-panel.settings.${name}: set by the module's own options; use them instead.";
    }) managed
    ++ map (name: {
      assertion = !(cfg.secretFiles ? ${name});
      message = "services.nixos-panel.secretFiles.${name}: use the module's own option for it.";
    }) (managed ++ dedicatedSecrets)
    ++ lib.mapAttrsToList (name: _: {
      assertion = !(cfg.settings ? ${name});
      message = "services.nixos-panel: ${name} is both in settings and given as a file; keep one.";
    }) credentials;

    warnings =
      lib.optional (cfg.database.url != null && builtins.match "[^:]+://[^/@]*:[^/@]+@.*" cfg.database.url != null)
        "services.nixos-panel.database.url holds a password, which ends up in the world-readable Nix store; use database.urlFile."
      ++
        lib.optional (cfg.redis.url != null && builtins.match "[^:]+://[^/@]*:[^/@]+@.*" cfg.redis.url != null)
          "services.nixos-panel.redis.url holds a password, which ends up in the world-readable Nix store; use redis.urlFile.";

    users.users = mkIf (cfg.user == "nixos-panel") {
      nixos-panel = {
        isSystemUser = true;
        group = cfg.group;
        # git and ssh (repository mirrors) look in $HOME.
        home = cfg.dataDir;
        description = "NixOS control panel";
      };
    };
    users.groups = mkIf (cfg.group == "nixos-panel") { nixos-panel = { }; };

    systemd.tmpfiles.rules = lib.optional (!useStateDirectory) "d ${cfg.dataDir} 0700 ${cfg.user} ${cfg.group} - -";

    services.postgresql = mkIf cfg.database.createLocally {
      enable = true;
      ensureDatabases = [ cfg.database.name ];
      ensureUsers = [
        {
          name = cfg.database.user;
          ensureDBOwnership = true;
        }
      ];
    };

    services.redis.servers.${redisName} = mkIf cfg.redis.createLocally {
      enable = true;
      # Unix socket only; the panel's units join the server's group to reach it.
      port = 0;
    };

    networking.firewall.allowedTCPPorts = lib.optional (cfg.openFirewall && cfg.web.enable) cfg.port;

    environment.systemPackages = [ manageScript ];

    systemd.targets.nixos-panel = {
      description = "NixOS control panel";
      wantedBy = [ "multi-user.target" ];
      wants =
        lib.optional cfg.web.enable "nixos-panel-web.service"
        ++ lib.optional cfg.worker.enable "nixos-panel-worker.service";
    };

    systemd.services = {
      nixos-panel-migrate = unitDefaults // {
        description = "NixOS control panel: database migrations";
        serviceConfig = commonServiceConfig // {
          Type = "oneshot";
          RemainAfterExit = true;
          LoadCredential = migrateLoadCredential;
          ExecStart = "${manage} migrate --no-input";
        };
      };

      nixos-panel-web = mkIf cfg.web.enable (
        unitDefaults
        // {
          description = "NixOS control panel: web (daphne)";
          after = unitDefaults.after ++ [ "nixos-panel-migrate.service" ];
          requires = unitDefaults.requires ++ [ "nixos-panel-migrate.service" ];
          wantedBy = [ "multi-user.target" ];
          serviceConfig =
            commonServiceConfig
            // {
              Type = "exec";
              ExecStart = "${cfg.package}/bin/nixos-panel-web" + lib.optionalString cfg.web.proxyHeaders " --proxy-headers";
              Restart = "on-failure";
              RestartSec = "5s";
            }
            // lib.optionalAttrs (cfg.port < 1024) {
              CapabilityBoundingSet = "CAP_NET_BIND_SERVICE";
              AmbientCapabilities = "CAP_NET_BIND_SERVICE";
            };
        }
      );

      nixos-panel-worker = mkIf cfg.worker.enable (
        unitDefaults
        // {
          description = "NixOS control panel: deployment worker (qcluster)";
          after = unitDefaults.after ++ [ "nixos-panel-migrate.service" ];
          requires = unitDefaults.requires ++ [ "nixos-panel-migrate.service" ];
          wantedBy = [ "multi-user.target" ];
          serviceConfig = commonServiceConfig // {
            Type = "exec";
            # As runpanel does: deployments left running by a worker that died are marked
            # interrupted now rather than by the first scheduled reaper run.
            ExecStartPre = "${manage} reapdeployments";
            ExecStart = "${manage} qcluster";
            Restart = "on-failure";
            RestartSec = "5s";
          };
        }
      );
    };
  };
}
