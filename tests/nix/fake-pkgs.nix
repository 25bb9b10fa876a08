# Stand-ins for the few pkgs attributes nix/module.nix uses. The module only puts their paths in
# units, so each is a plain path: /usr gives git, ssh and systemd-run from this machine's PATH.
# `panelPackage` is the derivation-like value the tests give as services.nixos-panel.package
# (and what callPackage ./package.nix returns, the module's default); `systemdPath` lets a test
# give the admin wrapper a stand-in systemd-run.
{ panelPath, systemdPath ? "/usr" }:

rec {
  panelPackage = {
    type = "derivation";
    name = "nixos-panel";
    outPath = panelPath;
  };
  callPackage = _fn: _args: panelPackage;

  git = "/usr";
  openssh = "/usr";
  nix = "/usr";
  systemd = systemdPath;

  writeShellScriptBin = name: text: {
    type = "derivation";
    inherit name text;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
}
