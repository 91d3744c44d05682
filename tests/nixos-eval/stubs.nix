# What a NixOS system would provide to nixos/module.nix, for evaluating it with nixpkgs' `lib`
# alone (no nixpkgs packages, no NixOS modules on this machine).
#
#   options  the NixOS options the module sets, declared like NixOS declares them: the
#            systemd service submodule follows nixos/lib/systemd-unit-options.nix (the unit
#            option merge, the Type/Restart check) and nixos/lib/systemd-lib.nix (unitConfig
#            from wants/after/…, the default PATH of stage-2 services); the rest (users,
#            networking.firewall, environment.etc) are free-form where the module does not
#            depend on their shape;
#   pkgs     fake derivations (a name and a /nix/store path) for the packages the module
#            names, `formats.toml` whose `generate` keeps the TOML text it would write, and
#            `runCommand` that keeps its build script;
#   utils    escapeSystemdExecArg(s), copied from nixos/lib/utils.nix;
#   render   serviceToUnit from nixos/lib/systemd-lib.nix: a service's [Unit]/[Service]/
#            [Install] text as NixOS would write it.
{ lib }:

let
  inherit (lib) mkOption types;

  # A stand-in for a derivation: what string interpolation and lib.isDerivation look at.
  fakeDrv =
    name: extra:
    let
      hash = builtins.substring 0 32 (builtins.hashString "sha256" (name + builtins.toJSON (extra.text or "")));
    in
    {
      type = "derivation";
      inherit name;
      outPath = "${builtins.storeDir}/${hash}-${name}";
      outputs = [ "out" ];
      drvPath = "${builtins.storeDir}/${hash}-${name}.drv";
    }
    // extra;

  mkPkg =
    pname: version: extra:
    fakeDrv "${pname}-${version}" (
      {
        inherit pname version;
        meta.mainProgram = pname;
      }
      // extra
    );

  # ---- TOML, as pkgs.formats.toml's generate would write it ----------------------------
  tomlKey = k: if builtins.match "[A-Za-z0-9_-]+" k != null then k else builtins.toJSON k;
  tomlScalar =
    v:
    if builtins.isBool v then
      (if v then "true" else "false")
    else if builtins.isInt v || builtins.isFloat v then
      toString v
    else if builtins.isString v || builtins.isPath v || lib.isDerivation v then
      builtins.toJSON (toString v)
    else if builtins.isList v then
      "[" + lib.concatMapStringsSep ", " tomlScalar v + "]"
    else if builtins.isAttrs v then
      "{ "
      + lib.concatStringsSep ", " (lib.mapAttrsToList (k: x: "${tomlKey k} = ${tomlScalar x}") v)
      + " }"
    else
      throw "toTOML: cannot represent ${builtins.typeOf v}";
  isTable = v: builtins.isAttrs v && !lib.isDerivation v;
  isTableArray = v: builtins.isList v && v != [ ] && lib.all isTable v;
  toTOMLSection =
    prefix: attrs:
    let
      names = builtins.attrNames attrs;
      plain = builtins.filter (n: !(isTable attrs.${n}) && !(isTableArray attrs.${n})) names;
      tables = builtins.filter (n: isTable attrs.${n}) names;
      arrays = builtins.filter (n: isTableArray attrs.${n}) names;
      path = n: (if prefix == "" then "" else "${prefix}.") + tomlKey n;
    in
    lib.concatMapStrings (n: "${tomlKey n} = ${tomlScalar attrs.${n}}\n") plain
    + lib.concatMapStrings (n: "\n[${path n}]\n" + toTOMLSection (path n) attrs.${n}) tables
    + lib.concatMapStrings (
      n: lib.concatMapStrings (t: "\n[[${path n}]]\n" + toTOMLSection (path n) t) attrs.${n}
    ) arrays;

  tomlValueType =
    let
      valueType =
        types.nullOr (
          types.oneOf [
            types.bool
            types.int
            types.float
            types.str
            types.path
            (types.attrsOf valueType)
            (types.listOf valueType)
          ]
        )
        // {
          description = "TOML value";
        };
    in
    valueType;

  pkgs = {
    taskflow = mkPkg "taskflow" "0.1.0" { };
    coreutils = mkPkg "coreutils" "9.5" { };
    findutils = mkPkg "findutils" "4.10.0" { };
    gnugrep = mkPkg "gnugrep" "3.11" { };
    gnused = mkPkg "gnused" "4.9" { };
    systemd = mkPkg "systemd" "257.5" { };
    formats.toml =
      { }:
      {
        type = tomlValueType;
        generate = name: value: fakeDrv name { text = toTOMLSection "" value; };
      };
    runCommand =
      name: env: buildCommand:
      fakeDrv name (env // { inherit buildCommand; });
    stdenv =
      let
        platform = {
          system = "x86_64-linux";
          canExecute = _: true;
        };
      in
      {
        buildPlatform = platform;
        hostPlatform = platform;
      };
  };

  # nixos/lib/utils.nix
  escapeSystemdExecArg =
    arg:
    let
      s =
        if builtins.isPath arg then
          "${arg}"
        else if builtins.isString arg then
          arg
        else if builtins.isInt arg || builtins.isFloat arg || lib.isDerivation arg then
          toString arg
        else
          throw "escapeSystemdExecArg only allows strings, paths, numbers and derivations";
    in
    builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
  utils = {
    inherit escapeSystemdExecArg;
    escapeSystemdExecArgs = lib.concatMapStringsSep " " escapeSystemdExecArg;
  };

  # ---- the systemd service submodule (nixos/lib/systemd-unit-options.nix) ----------------
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if builtins.isList (builtins.head defs').value then
        lib.concatMap (
          def:
          if builtins.isList def.value then
            def.value
          else
            throw "The definitions for systemd unit options should be either all lists or all non-lists, but for the option ${lib.showOption loc}, the definitions are a mix"
        ) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  checkService =
    attrs:
    let
      oneOf =
        name: values:
        lib.optional (
          attrs ? ${name} && !(builtins.elem attrs.${name} values)
        ) "Systemd Service field `${name}' cannot have value `${toString attrs.${name}}'.";
      errors =
        oneOf "Type" [
          "exec"
          "simple"
          "forking"
          "oneshot"
          "dbus"
          "notify"
          "notify-reload"
          "idle"
        ]
        ++ oneOf "Restart" [
          "no"
          "on-success"
          "on-failure"
          "on-abnormal"
          "on-abort"
          "on-watchdog"
          "always"
        ];
    in
    if errors == [ ] then true else builtins.trace (lib.concatStringsSep "\n" errors) false;

  listOfUnits =
    mkOption {
      default = [ ];
      type = types.listOf unitNameType;
    };

  serviceModule =
    {
      name,
      config,
      options,
      ...
    }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
        };
        description = mkOption {
          type = types.singleLineStr;
          default = "";
        };
        documentation = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        wantedBy = listOfUnits;
        requiredBy = listOfUnits;
        upheldBy = listOfUnits;
        aliases = listOfUnits;
        requires = listOfUnits;
        wants = listOfUnits;
        upholds = listOfUnits;
        after = listOfUnits;
        before = listOfUnits;
        bindsTo = listOfUnits;
        partOf = listOfUnits;
        conflicts = listOfUnits;
        requisite = listOfUnits;
        onFailure = listOfUnits;
        onSuccess = listOfUnits;
        startLimitBurst = mkOption { type = types.int; };
        startLimitIntervalSec = mkOption { type = types.int; };
        unitConfig = mkOption {
          type = types.attrsOf unitOption;
          default = { };
        };
        restartTriggers = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        reloadTriggers = mkOption {
          type = types.listOf unitOption;
          default = [ ];
        };
        environment = mkOption {
          type = types.attrsOf (
            types.nullOr (
              types.oneOf [
                types.str
                types.path
                types.package
              ]
            )
          );
          default = { };
        };
        path = mkOption {
          type = types.listOf (
            types.oneOf [
              types.package
              types.str
            ]
          );
          default = [ ];
        };
        serviceConfig = mkOption {
          type = types.addCheck (types.attrsOf unitOption) checkService;
          default = { };
        };
        # Script-valued options (script, preStart, …) would become job scripts, which need
        # a shell package; the module must not use them.
        script = mkOption {
          type = types.enum [ "" ];
          default = "";
        };
        preStart = mkOption {
          type = types.enum [ "" ];
          default = "";
        };
        restartIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        reloadIfChanged = mkOption {
          type = types.bool;
          default = false;
        };
        stopIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
      };

      config = {
        # systemd-lib.nix `unitConfig`.
        unitConfig =
          let
            inherit (lib) optionalAttrs;
            list = n: v: optionalAttrs (v != [ ]) { ${n} = toString v; };
            triggers =
              n: v:
              optionalAttrs (v != [ ]) {
                ${n} = "${fakeDrv "${n}-${name}" {
                  text = toString (map (x: if builtins.isPath x then "${x}" else x) (lib.flatten v));
                }}";
              };
          in
          list "Requires" config.requires
          // list "Wants" config.wants
          // list "Upholds" config.upholds
          // list "After" config.after
          // list "Before" config.before
          // list "BindsTo" config.bindsTo
          // list "PartOf" config.partOf
          // list "Conflicts" config.conflicts
          // list "Requisite" config.requisite
          // triggers "X-Restart-Triggers" config.restartTriggers
          // triggers "X-Reload-Triggers" config.reloadTriggers
          // optionalAttrs (config.description != "") { Description = config.description; }
          // list "Documentation" config.documentation
          // list "OnFailure" config.onFailure
          // list "OnSuccess" config.onSuccess
          // optionalAttrs options.startLimitIntervalSec.isDefined {
            StartLimitIntervalSec = toString config.startLimitIntervalSec;
          }
          // optionalAttrs options.startLimitBurst.isDefined {
            StartLimitBurst = toString config.startLimitBurst;
          };

        # stage2ServiceConfig: every NixOS service gets this minimal PATH.
        path = lib.mkAfter (
          with pkgs;
          [
            coreutils
            findutils
            gnugrep
            gnused
            systemd
          ]
        );
        environment.PATH = lib.mkIf (config.path != [ ]) "${lib.makeBinPath config.path}:${lib.makeSearchPathOutput "bin" "sbin" config.path}";
      };
    };

  # systemd-lib.nix toOption / attrsToSection / commonUnitText / serviceToUnit.
  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;
  attrsToSection =
    as:
    lib.concatStrings (
      lib.concatLists (
        lib.mapAttrsToList (
          name: value: map (x: "${name}=${toOption x}\n") (if builtins.isList value then value else [ value ])
        ) as
      )
    );

  renderService =
    globalEnvironment: def:
    let
      env = globalEnvironment // def.environment;
    in
    ''
      [Unit]
      ${attrsToSection def.unitConfig}
    ''
    + "[Service]\n"
    + lib.concatMapStrings (
      n: lib.optionalString (env.${n} != null) "Environment=${builtins.toJSON "${n}=${env.${n}}"}\n"
    ) (builtins.attrNames env)
    + (
      if def.reloadIfChanged then
        "X-ReloadIfChanged=true\n"
      else if !def.restartIfChanged then
        "X-RestartIfChanged=false\n"
      else
        ""
    )
    + lib.optionalString (!def.stopIfChanged) "X-StopIfChanged=false\n"
    + attrsToSection def.serviceConfig
    + lib.optionalString (def.wantedBy != [ ]) ''

      [Install]
      WantedBy=${lib.concatStringsSep " " def.wantedBy}
    '';

  # ---- the NixOS options the module sets -------------------------------------------------
  nixosOptions = {
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
        type = types.attrsOf (types.submodule serviceModule);
        default = { };
      };
      systemd.globalEnvironment = mkOption {
        type = types.attrsOf (types.nullOr types.str);
        default = { };
      };
      environment.etc = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            freeformType = types.attrsOf types.unspecified;
            options.source = mkOption { type = types.path; };
          }
        );
      };
      networking.firewall = mkOption {
        default = { };
        type = types.submodule {
          freeformType = types.attrsOf types.unspecified;
          options.allowedTCPPorts = mkOption {
            type = types.listOf types.port;
            default = [ ];
          };
        };
      };
      users = mkOption {
        type = types.attrsOf types.unspecified;
        default = { };
      };
      nixpkgs.overlays = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
    };
  };
in
{
  inherit
    pkgs
    utils
    nixosOptions
    renderService
    fakeDrv
    ;
}
