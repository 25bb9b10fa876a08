# Evaluates nix/module.nix with the real lib.evalModules, the stub NixOS options and fake pkgs;
# returns what tests/nix/test_module.py asserts on. Usage:
#   nix-instantiate --eval --strict --json tests/nix/eval.nix \
#     --argstr configJSON '{"services":{"nixos-panel":{"enable":true}}}' --argstr panelPath /tmp/pkg -A units
{
  configJSON,
  panelPath ? "/nix/store/00000000000000000000000000000000-nixos-panel",
  systemdPath ? "/usr",
  libPath ? ../../nix/vendor/nixpkgs-lib/lib,
}:

let
  lib = import libPath;
  pkgs = import ./fake-pkgs.nix { inherit panelPath systemdPath; };
  evaluated = lib.evalModules {
    modules = [
      ./stub-nixos-options.nix
      ../../nix/module.nix
      { _module.args.pkgs = pkgs; }
      (builtins.fromJSON configJSON)
    ];
  };
  c = evaluated.config;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  inherit (c) warnings users networking;
  units = {
    services = c.systemd.services;
    targets = c.systemd.targets;
    tmpfiles = c.systemd.tmpfiles.rules;
  };
  postgresql = c.services.postgresql;
  redis = c.services.redis.servers;
  # writeShellScriptBin stand-ins keep their text.
  systemPackages = map (p: { inherit (p) name text; }) c.environment.systemPackages;
}
