{
  description = "devm: an example NixOS node for the control panel";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }: {
    # The panel deploys `nixos-rebuild <action> --flake <checkout>#devm`.
    nixosConfigurations.devm = nixpkgs.lib.nixosSystem {
      modules = [
        ./hardware-configuration.nix
        ./configuration.nix
        # Lets `nixos-version --configuration-revision` report the deployed commit.
        { system.configurationRevision = self.rev or self.dirtyRev or null; }
      ];
    };
  };
}
