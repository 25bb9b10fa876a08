# The few NixOS options nix/module.nix sets, declared as plain options so the module can be
# evaluated with the real lib.evalModules on a machine without nixpkgs. Only the shape is
# NixOS's (names, types, the defaults the module reads); none of their implementation is here:
# what systemd, users, PostgreSQL and Redis then do with these values only a NixOS VM proves.
{ lib, ... }:

let
  inherit (lib) mkOption types;
  anything = mkOption {
    type = types.anything;
    default = null;
  };
  strList = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };
  unitOptions = {
    description = mkOption {
      type = types.str;
      default = "";
    };
    after = strList;
    before = strList;
    wants = strList;
    requires = strList;
    wantedBy = strList;
    requiredBy = strList;
    partOf = strList;
    bindsTo = strList;
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    systemd.services = mkOption {
      default = { };
      type = types.attrsOf (
        types.submodule {
          options = unitOptions // {
            # NixOS turns these into Environment= lines and PATH=<each>/bin:<each>/sbin.
            environment = mkOption {
              type = types.attrsOf types.str;
              default = { };
            };
            path = mkOption {
              type = types.listOf (types.either types.package types.str);
              default = [ ];
            };
            serviceConfig = mkOption {
              type = types.attrsOf types.anything;
              default = { };
            };
          };
        }
      );
    };
    systemd.targets = mkOption {
      default = { };
      type = types.attrsOf (types.submodule { options = unitOptions; });
    };
    systemd.tmpfiles.rules = strList;

    users.users = mkOption {
      default = { };
      type = types.attrsOf (
        types.submodule {
          options = {
            isSystemUser = mkOption {
              type = types.bool;
              default = false;
            };
            group = mkOption {
              type = types.str;
              default = "";
            };
            home = mkOption {
              type = types.str;
              default = "/var/empty";
            };
            description = mkOption {
              type = types.str;
              default = "";
            };
            extraGroups = strList;
          };
        }
      );
    };
    users.groups = mkOption {
      default = { };
      type = types.attrsOf (types.submodule { });
    };

    services.postgresql = {
      enable = mkOption {
        type = types.bool;
        default = false;
      };
      ensureDatabases = strList;
      ensureUsers = mkOption {
        default = [ ];
        type = types.listOf (
          types.submodule {
            options = {
              name = mkOption { type = types.str; };
              ensureDBOwnership = mkOption {
                type = types.bool;
                default = false;
              };
            };
          }
        );
      };
    };

    # services.redis.servers.<name>, with the defaults of nixpkgs' redis module that the
    # panel's module reads (unixSocket, group).
    services.redis.servers = mkOption {
      default = { };
      type = types.attrsOf (
        types.submodule (
          { name, config, ... }:
          {
            options = {
              enable = mkOption {
                type = types.bool;
                default = false;
              };
              port = mkOption {
                type = types.port;
                default = if name == "" then 6379 else 0;
              };
              unixSocket = mkOption {
                type = types.nullOr types.str;
                default = "/run/redis${lib.optionalString (name != "") "-${name}"}/redis.sock";
              };
              user = mkOption {
                type = types.str;
                default = if name == "" then "redis" else "redis-${name}";
              };
              group = mkOption {
                type = types.str;
                default = config.user;
              };
            };
          }
        )
      );
    };

    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };

    environment.systemPackages = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
  };
}
