# The panel as a Nix package: its source in $out/share/nixos-panel and three commands in $out/bin,
# run by a Python with the panel's dependencies from nixpkgs (python3.withPackages).
#
#   nixos-panel-manage  manage.py (migrate, qcluster, createsuperuser, addnode, audit verify ...)
#   nixos-panel-web     daphne on PANEL_HOST:PANEL_PORT (the web unit)
#   nixos-panel         manage.py runpanel: everything in one process tree (`nix run`)
#
# The commands are written from nix/bin/*.in; tests/nix/test_module.py runs the same templates
# against the repository's virtualenv, so what the module's units call is what was tested.
#
# Versions: requirements.txt pins what pip installs (CI, `make run`). Here every dependency
# comes from the nixpkgs you build with, so its versions are nixpkgs' ones; the install check
# below runs `manage.py check` and `makemigrations --check` with them and fails the build if
# the panel does not load or its models would need a migration under that Django.
{
  lib,
  stdenvNoCC,
  python3,
  runtimeShell,
  # The panel's runtime files only (not tests, bench, nix/, a .venv or var/ of a checkout).
  src ? lib.cleanSourceWith {
    name = "nixos-panel-source";
    src = ../.;
    filter =
      path: type:
      let
        relative = lib.removePrefix (toString ../. + "/") (toString path);
        top = builtins.head (lib.splitString "/" relative);
      in
      lib.elem top [
        "manage.py"
        "controlpanel"
        "deployments"
        "templates"
        "static"
      ]
      && baseNameOf path != "__pycache__"
      && !lib.hasSuffix ".pyc" path;
  },
  version ? "0-unstable",
}:

let
  # The panel pins Django 5.2; nixpkgs' default `django` may be an older LTS. Overriding it in
  # the package set builds channels, daphne and django-q2 against the same Django.
  python = python3.override {
    self = python;
    packageOverrides = final: prev: { django = prev.django_5_2 or prev.django_5; };
  };
  # requirements.txt, name for name (psycopg[binary] is psycopg: nixpkgs links it to libpq).
  pythonEnv = python.withPackages (
    ps: with ps; [
      django
      django-q2
      channels
      daphne
      paramiko
      cryptography
      dj-database-url
      psycopg
      channels-redis
      redis
      whitenoise
      django-axes
      django-csp
      djangorestframework
      drf-spectacular
      drf-spectacular-sidecar
      prometheus-client
    ]
  );
  bins = [
    "nixos-panel"
    "nixos-panel-manage"
    "nixos-panel-web"
  ];
in
stdenvNoCC.mkDerivation {
  pname = "nixos-panel";
  inherit version src;

  dontConfigure = true;
  dontBuild = true;

  installPhase = ''
    runHook preInstall
    share=$out/share/nixos-panel
    mkdir -p $share $out/bin
    cp -r manage.py controlpanel deployments templates static $share/
    # The store is read-only: compile now rather than on every start.
    ${pythonEnv}/bin/python -m compileall -q $share
    for bin in ${lib.concatStringsSep " " bins}; do
      substitute ${./bin}/$bin.in $out/bin/$bin \
        --subst-var-by shell ${runtimeShell} \
        --subst-var-by python ${pythonEnv}/bin/python \
        --subst-var-by share $share
      chmod +x $out/bin/$bin
    done
    runHook postInstall
  '';

  doInstallCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    export PANEL_DATA_DIR=$(mktemp -d)
    $out/bin/nixos-panel-manage check
    $out/bin/nixos-panel-manage makemigrations --check --dry-run
    runHook postInstallCheck
  '';

  passthru = {
    inherit bins;
    python = pythonEnv;
  };

  meta = {
    description = "Web control panel for GitOps deployment of NixOS fleets";
    mainProgram = "nixos-panel";
    platforms = lib.platforms.linux;
  };
}
