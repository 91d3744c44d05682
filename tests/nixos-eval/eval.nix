# Evaluates nixos/module.nix for real (lib.evalModules with nixpkgs' lib) against the NixOS
# option stubs of stubs.nix, and returns what a NixOS system would build from it.
#
#   nix-instantiate --eval --strict --json tests/nixos-eval/eval.nix \
#     --arg lib 'import <nixpkgs-lib>/lib' --argstr case good
#
# `case` names an entry of cases.nix. Like NixOS (nixos/modules/system/activation/top-level.nix),
# failed assertions abort the evaluation with "Failed assertions:" and one "- message" line
# each; warnings are returned (NixOS prints them as `trace: warning:`).
{
  lib,
  case ? "good",
}:

let
  stubs = import ./stubs.nix { inherit lib; };
  cases = import ./cases.nix { inherit lib; };
  theCase = cases.${case} or (throw "tests/nixos-eval: no case `${case}` in cases.nix");

  evaluated = lib.evalModules {
    modules = [
      stubs.nixosOptions
      ../../nixos/module.nix
      theCase.config
      {
        _module.args = {
          inherit (stubs) pkgs utils;
        };
      }
    ];
  };
  inherit (evaluated) config;

  failedAssertions = map (x: x.message) (builtins.filter (x: !x.assertion) config.assertions);

  # Only what the module generates: ours are the taskflow-* units and etc files.
  services = lib.filterAttrs (n: _: lib.hasPrefix "taskflow-" n) config.systemd.services;
  units = lib.mapAttrs' (
    n: def: lib.nameValuePair "${n}.service" (stubs.renderService config.systemd.globalEnvironment def)
  ) (lib.filterAttrs (_: def: def.enable) services);

  # The text of an /etc file: a generated TOML keeps its text; the --check-config step
  # (a runCommand) exposes the file it checks as passthru.configFile.
  etcText =
    source:
    if source ? text then
      source.text
    else if source ? passthru.configFile.text then
      source.passthru.configFile.text
    else if source ? configFile.text then
      source.configFile.text
    else
      throw "tests/nixos-eval: cannot tell the contents of ${toString source}";

  etcChecks = lib.mapAttrs (_: e: e.source.buildCommand or null) config.environment.etc;

  result = {
    inherit units;
    inherit (config) warnings;
    etc = lib.mapAttrs (_: e: etcText e.source) config.environment.etc;
    # The build-time --check-config scripts, by /etc name (null: checkConfig = false).
    checks = etcChecks;
    firewall = config.networking.firewall.allowedTCPPorts;
  };
in
if failedAssertions != [ ] then
  throw "\nFailed assertions:\n${lib.concatMapStringsSep "\n" (x: "- ${x}") failedAssertions}"
else
  result
