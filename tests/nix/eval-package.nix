# Evaluates nix/package.nix and nix/flake.nix without nixpkgs: stdenvNoCC.mkDerivation returns
# its arguments, python3.withPackages records the package names it is given (each must be a
# name from requirements.txt, or evaluation fails), and the flake's outputs are called with a
# stand-in nixpkgs. Nothing is built.
{
  libPath ? ../../nix/vendor/nixpkgs-lib/lib,
  # JSON list of paths relative to the repository: does the package's source keep each one?
  sourcePathsJSON ? "[]",
}:

let
  lib = import libPath;

  # requirements.txt's names as nixpkgs spells them: lower case, "-", no extras.
  requirementNames = lib.pipe (builtins.readFile ../../requirements.txt) [
    (lib.splitString "\n")
    (map (line: lib.trim (builtins.head (lib.splitString "#" line))))
    (lib.filter (line: line != ""))
    (map (line: builtins.head (builtins.match "([A-Za-z0-9_.-]+).*" line)))
    (map (name: lib.toLower (builtins.replaceStrings [ "_" "." ] [ "-" "-" ] name)))
  ];
  pythonPackageSet = lib.genAttrs requirementNames (name: name) // {
    django_5_2 = "django_5_2";
  };

  fakePython = {
    override =
      { self, packageOverrides }:
      let
        overrides = packageOverrides pythonPackageSet pythonPackageSet;
      in
      {
        withPackages = f: {
          packages = f (pythonPackageSet // overrides);
          djangoOverride = overrides.django;
          outPath = "/nix/store/00000000000000000000000000000000-python3-env";
        };
      };
  };

  callPackage =
    fn: args:
    import fn (
      {
        inherit lib;
        stdenvNoCC.mkDerivation = drvArgs: drvArgs // { type = "derivation"; };
        python3 = fakePython;
        runtimeShell = "/bin/sh";
      }
      // args
    );

  package = callPackage ../../nix/package.nix { };

  flake = import ../../nix/flake.nix;
  flakeOutputs = flake.outputs {
    self = flakeOutputs // {
      shortRev = "0123abc";
    };
    nixpkgs.legacyPackages.x86_64-linux = { inherit callPackage; };
  };
in
{
  inherit requirementNames;
  package = {
    inherit (package) pname version;
    inherit (package.passthru) bins;
    inherit (package.meta) mainProgram;
    pythonPackages = package.passthru.python.packages;
    djangoOverride = package.passthru.python.djangoOverride;
    installPhase = package.installPhase;
    sourceKept = map (
      p: package.src.filter (toString package.src.origSrc + "/" + p) "regular"
    ) (builtins.fromJSON sourcePathsJSON);
  };
  flake = {
    inherit (flake) description;
    nixpkgsUrl = flake.inputs.nixpkgs.url;
    packageNames = builtins.attrNames flakeOutputs.packages.x86_64-linux;
    defaultPackage = {
      inherit (flakeOutputs.packages.x86_64-linux.default) pname version;
    };
    defaultModuleIsModuleNix = flakeOutputs.nixosModules.default == ../../nix/module.nix;
  };
}
