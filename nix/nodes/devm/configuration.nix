# devm: a small NixOS machine the control panel can deploy to over SSH.
{ lib, pkgs, ... }:

{
  boot.loader.grub.enable = true;
  boot.loader.grub.device = "/dev/vda";

  networking.hostName = "devm";
  networking.useDHCP = lib.mkDefault true;

  time.timeZone = "UTC";
  i18n.defaultLocale = "en_US.UTF-8";

  # The panel connects as root over SSH and runs nixos-rebuild here.
  # services.openssh opens port 22 in the firewall (openFirewall defaults to true).
  services.openssh = {
    enable = true;
    settings = {
      PermitRootLogin = "prohibit-password";
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
    };
  };

  users.users.root.openssh.authorizedKeys.keys = [
    # The panel's deploy key (shown on the node's page in the panel), e.g.
    # "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... nixos-panel"
  ];

  # A throwaway VM may log in with a password instead: set
  #   services.openssh.settings.PermitRootLogin = "yes";
  #   services.openssh.settings.PasswordAuthentication = true;
  #   users.users.root.hashedPassword = "<output of: mkpasswd -m sha-512>";
  # and give the panel that password. Prefer a key for anything that lasts.

  nix.settings = {
    experimental-features = [ "nix-command" "flakes" ];
    trusted-users = [ "root" ];
  };

  # Keep a week of generations so the panel can show and roll back to them.
  nix.gc = {
    automatic = true;
    dates = "weekly";
    options = "--delete-older-than 7d";
  };

  environment.systemPackages = [ pkgs.git ];

  # The NixOS release this machine was first installed with; do not bump it on upgrades.
  system.stateVersion = "25.05";
}
