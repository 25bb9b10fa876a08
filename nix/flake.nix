{
  description = "NixOS control panel: GitOps deployment of NixOS fleets (package and NixOS module)";

  # The flake lives in nix/ of the repository: use it as
  #   inputs.nixos-panel.url = "git+https://git.example.org/nixos-panel.git?dir=nix";
  # docs/nixos.md has a full example.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
    in
    {
      packages.${system} = {
        nixos-panel = pkgs.callPackage ./package.nix { version = self.shortRev or self.dirtyShortRev or "0-unstable"; };
        default = self.packages.${system}.nixos-panel;
      };

      # Imported into a NixOS configuration, the module builds the package with that system's
      # nixpkgs (pkgs.callPackage ./package.nix); set services.nixos-panel.package to use
      # this flake's build instead.
      nixosModules.nixos-panel = ./module.nix;
      nixosModules.default = self.nixosModules.nixos-panel;
    };
}
