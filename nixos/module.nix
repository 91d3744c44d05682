# NixOS module for TaskFlow's four daemons: services.taskflow.{gateway,auth,notify,shardProxy}.
#
# Shape borrowed from attic's atticd.nix and harmonia's module:
#   - one TOML file per daemon, generated from a freeform `settings` (pkgs.formats.toml), with
#     typed options only for the keys this module itself relies on (listen addresses for the
#     firewall, the proxy's state_dir, secret-file references, the shard list), so the daemon
#     stays the single source of truth for everything else (docs/configuration.md). Typed keys
#     left at `null` are omitted from the file and the daemon's own default applies;
#   - secrets never enter the Nix store: `secretFiles` are handed over with LoadCredential= and
#     the settings refer to them by bare name, which the daemons resolve in
#     $CREDENTIALS_DIRECTORY (SPEC §7);
#   - the generated file is validated at build time with `--check-config` (like attic's
#     check-config), so a bad key fails `nixos-rebuild` instead of the service;
#   - Type=notify + watchdog + the hardening list from notes/nix-anchors.md.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    mkPackageOption
    types
    ;

  cfg = config.services.taskflow;

  format = pkgs.formats.toml { };

  # The daemons exit with EX_CONFIG on a bad configuration (docs/configuration.md); restarting
  # cannot fix that, so systemd must not loop on it.
  exConfig = 78;

  defaultProxyStateDir = "/var/lib/taskflow-shard-proxy";

  # The daemons parse listen addresses as std::net::SocketAddr: an IP literal (IPv6 in
  # brackets) and a port, never a host name. Checking it here turns a typo into an
  # evaluation error that names the option.
  listenType = types.strMatching "([0-9]{1,3}([.][0-9]{1,3}){3}|[[][0-9A-Fa-f:.]+[]]):[0-9]{1,5}";

  portOf = addr: lib.toInt (lib.last (lib.splitString ":" addr));
  hostOf = addr: lib.removeSuffix ":${lib.last (lib.splitString ":" addr)}" addr;
  isLoopback =
    addr:
    let
      host = hostOf addr;
    in
    lib.hasPrefix "127." host || host == "[::1]";

  # A credential name becomes a file name under $CREDENTIALS_DIRECTORY.
  isCredentialName = name: builtins.match "[A-Za-z0-9_][A-Za-z0-9_.-]*" name != null;

  # A secret must stay out of the world-readable store. `lib.isStorePath` only recognises
  # top-level store paths, so also refuse anything below the store directory, and refuse Nix
  # path literals (`./secret`), which would be copied into the store as soon as they are
  # interpolated into the unit.
  isOutsideStore =
    p:
    !(builtins.isPath p)
    && !(lib.isStorePath p)
    && !(lib.hasPrefix "${builtins.storeDir}/" (toString p));

  # TOML has no null: typed options left at null are dropped so the daemon's default applies.
  stripNulls =
    v:
    if lib.isDerivation v then
      v
    else if builtins.isAttrs v then
      lib.mapAttrs (_: stripNulls) (lib.filterAttrs (_: x: x != null) v)
    else if builtins.isList v then
      map stripNulls v
    else
      v;

  # Every `*_file` string anywhere in the settings, with a readable option path, so the
  # assertions can check each one against secretFiles (docs: keys ending in `_file` name a
  # secret file; a bare name is looked up in $CREDENTIALS_DIRECTORY).
  fileRefs =
    prefix: v:
    if lib.isDerivation v then
      [ ]
    else if builtins.isAttrs v then
      lib.concatLists (
        lib.mapAttrsToList (
          n: x:
          if lib.hasSuffix "_file" n && builtins.isString x then
            [
              {
                path = "${prefix}.${n}";
                value = x;
              }
            ]
          else
            fileRefs "${prefix}.${n}" x
        ) v
      )
    else if builtins.isList v then
      lib.concatLists (lib.imap0 (i: x: fileRefs "${prefix}.[${toString i}]" x) v)
    else
      [ ];

  # ---- option helpers -------------------------------------------------------------------

  freeformSubmodule =
    options:
    types.submodule {
      freeformType = format.type;
      inherit options;
    };

  optionalStr =
    description:
    mkOption {
      type = types.nullOr types.str;
      default = null;
      inherit description;
    };

  listenOption =
    default: description:
    mkOption {
      type = listenType;
      inherit default description;
      example = "0.0.0.0:${toString (portOf default)}";
    };

  # Secret references with a documented default name: typed (not null) so the assertions can
  # insist that the matching credential is provided, instead of the daemon failing at start.
  secretRef =
    default: description:
    mkOption {
      type = types.str;
      inherit default;
      description = ''
        ${description}
        A bare name refers to an entry of `secretFiles`; an absolute path is read as is
        (it must not be in the Nix store).
      '';
    };

  # ---- the four daemons -----------------------------------------------------------------
  #
  # unit      systemd unit and binary name
  # after     sibling daemons to order after when they run on the same host
  # reload    whether a changed configuration is applied with SIGHUP instead of a restart
  # listens   the addresses openFirewall opens, from the final settings

  daemons = {
    gateway = {
      unit = "taskflow-gateway";
      description = "TaskFlow gateway (REST API and WebSocket notifications)";
      after = [
        "shardProxy"
        "auth"
      ];
      reload = false;
      listens = s: [ s.listen ];
      settingsOptions = {
        listen = listenOption "127.0.0.1:3000" "HTTP listener of the REST API and WebSocket.";
        # Not in `listens`: openFirewall never opens it; a scraper elsewhere needs an explicit
        # networking.firewall rule.
        ops_listen = listenOption "127.0.0.1:9932" "Listener of /metrics and /readyz (kept off the API port; never opened by openFirewall).";
        auth_url = optionalStr "URL of the auth daemon (daemon default `http://127.0.0.1:8081`).";
        database_url = optionalStr "Task database, through the shard proxy (daemon default `postgres://taskflow@127.0.0.1:6432/tasks`).";
        database_password_file = optionalStr "Secret file with the database password.";
        jwt_public_key_file = secretRef "jwt-public.pem" "Ed25519 public key (PEM) used to verify tokens.";
        redis_url = optionalStr "Redis URL (daemon default `redis://127.0.0.1:6379`).";
        kafka_brokers = optionalStr "Comma-separated Kafka bootstrap servers (daemon default `127.0.0.1:9092`).";
      };
      extraOptions = { };
    };

    auth = {
      unit = "taskflow-auth";
      description = "TaskFlow auth daemon (registration, login, JWT issue)";
      after = [ "shardProxy" ];
      reload = false;
      listens = s: [ s.listen ];
      settingsOptions = {
        listen = listenOption "127.0.0.1:8081" "HTTP listener.";
        ops_listen = listenOption "127.0.0.1:9933" "Listener of /metrics and /readyz (never opened by openFirewall).";
        database_url = optionalStr "Auth database, through the shard proxy (daemon default `postgres://taskflow@127.0.0.1:6432/auth`).";
        database_password_file = optionalStr "Secret file with the database password.";
        jwt_private_key_file = secretRef "jwt-private.pem" "Ed25519 private key (PKCS#8 PEM) used to sign tokens.";
        bcrypt_cost = mkOption {
          type = types.nullOr (types.ints.between 4 31);
          default = null;
          description = "bcrypt cost factor (daemon default 12).";
        };
      };
      extraOptions = { };
    };

    notify = {
      unit = "taskflow-notify";
      description = "TaskFlow notify daemon (task events to email and notify_events)";
      after = [ "shardProxy" ];
      reload = false;
      listens = s: [ s.metrics_listen ];
      settingsOptions = {
        metrics_listen = listenOption "127.0.0.1:9931" "Listener of /metrics, /healthz and /readyz.";
        database_url = optionalStr "Database holding recipients' emails, through the shard proxy (daemon default `postgres://taskflow@127.0.0.1:6432/auth`).";
        database_password_file = optionalStr "Secret file with the database password.";
        kafka_brokers = optionalStr "Comma-separated Kafka bootstrap servers (daemon default `127.0.0.1:9092`).";
        redis_url = optionalStr "Redis URL used to de-duplicate events (daemon default `redis://127.0.0.1:6379`).";
        smtp = mkOption {
          default = { };
          description = "SMTP server that mail is sent through.";
          type = freeformSubmodule {
            host = optionalStr "SMTP host (daemon default `127.0.0.1`).";
            port = mkOption {
              type = types.nullOr types.port;
              default = null;
              description = "SMTP port (daemon default 1025).";
            };
            tls = mkOption {
              type = types.nullOr (
                types.enum [
                  "none"
                  "starttls"
                  "tls"
                ]
              );
              default = null;
              description = "Transport security (daemon default `none`).";
            };
            password_file = optionalStr "Secret file with the SMTP password.";
          };
        };
      };
      extraOptions = { };
    };

    shardProxy = {
      unit = "taskflow-shard-proxy";
      description = "TaskFlow shard proxy (PostgreSQL wire protocol, sharded by performer_id)";
      after = [ ];
      # Adding a shard is "change the config, reload" (SPEC §6): SIGHUP keeps client
      # connections and starts the online migration, a restart would drop every session.
      reload = true;
      listens = s: [
        s.listen
        s.metrics_listen
      ];
      settingsOptions = {
        listen = listenOption "127.0.0.1:6432" "PostgreSQL wire listener.";
        metrics_listen = listenOption "127.0.0.1:9930" "Listener of /metrics, /healthz and /readyz.";
        state_dir = mkOption {
          type = types.strMatching "/.+";
          default = defaultProxyStateDir;
          description = ''
            Durable proxy state (2PC decisions, migration progress). The default is created by
            systemd (StateDirectory=) for the unit's dynamic user; another directory is made
            writable with ReadWritePaths= but must already exist and be writable by the unit.
          '';
        };
        users = mkOption {
          description = ''
            Client logins (SCRAM-SHA-256), each with the databases it may open, like
            pgbouncer's `admin_users`: the daemons log in as `taskflow` (`tasks`, `auth`),
            operators as `taskflow_admin` (the `admin` console: SHOW, PAUSE, RELOAD).
          '';
          default = [
            {
              name = "taskflow";
              password_file = "proxy-password";
              databases = [
                "tasks"
                "auth"
              ];
            }
            {
              name = "taskflow_admin";
              password_file = "proxy-admin-password";
              databases = [ "admin" ];
              admin = true;
            }
          ];
          type = types.listOf (freeformSubmodule {
            name = mkOption {
              type = types.str;
              description = "Role name clients log in with.";
            };
            password_file = optionalStr "Secret file with this role's password.";
            databases = mkOption {
              type = types.nullOr (types.listOf types.str);
              default = null;
              description = ''
                Databases this login may open; null: the sharded database and `auth` (and
                `admin` for an admin). Only an admin may list `admin`.
              '';
            };
            admin = mkOption {
              type = types.bool;
              default = false;
              description = "May open the `admin` console (PAUSE, RESUME, RELOAD, SHOW).";
            };
          });
        };
        limits = mkOption {
          default = { };
          description = ''
            Per-client limits (docs/configuration.md, `[limits]`); each breach is an error
            for that client alone. Unset keys keep the daemon's defaults.
          '';
          type = freeformSubmodule {
            max_clients = mkOption {
              type = types.nullOr types.ints.positive;
              default = null;
              description = "Client connections at once; beyond it a new client gets SQLSTATE 53300.";
            };
            pause_timeout_secs = mkOption {
              type = types.nullOr types.ints.positive;
              default = null;
              description = "How long a client waits for a PAUSE to end before a retryable error.";
            };
          };
        };
        backend = mkOption {
          default = { };
          description = "How the proxy logs in to every backend cluster.";
          type = freeformSubmodule {
            user = optionalStr "Role used on every backend cluster (daemon default `taskflow`).";
            password_file = optionalStr "Secret file with that role's password.";
            sslmode = mkOption {
              type = types.nullOr (
                types.enum [
                  "disable"
                  "prefer"
                  "require"
                  "verify-ca"
                  "verify-full"
                ]
              );
              default = null;
              description = ''
                TLS to every backend whose URL has no `sslmode` parameter (libpq's meanings;
                daemon default `disable`). `verify-ca`/`verify-full` need `sslrootcert`.
              '';
            };
            sslrootcert = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "/etc/ssl/taskflow/pg-ca.pem";
              description = ''
                Absolute path of the CA certificate(s) (PEM) for backends whose URL has no
                `sslrootcert` parameter. Public, so the Nix store is fine (`"''${./pg-ca.pem}"`).
              '';
            };
            allow_insecure_auth = mkOption {
              type = types.nullOr types.bool;
              default = null;
              description = ''
                Answer a backend's cleartext or MD5 password request (daemon default `false`:
                SCRAM-SHA-256, trust or peer only).
              '';
            };
          };
        };
        auth_database = mkOption {
          default = { };
          description = "The passthrough database `auth`.";
          type = freeformSubmodule {
            url = optionalStr "Its URL (daemon default `postgres://taskflow@127.0.0.1:5435/auth`).";
            pool_size = mkOption {
              type = types.nullOr (types.ints.between 1 10000);
              default = null;
              description = ''
                Server connections to it (daemon default: `pool.size`, which sizes each
                shard's pool). Set it when the shards share a PostgreSQL server and
                `pool.size` is the per-shard share of that server's connections.
              '';
            };
          };
        };
        shards = mkOption {
          default = [ ];
          description = ''
            The shards, in any order: ring points derive from the names, so a name must never
            change once rows live on it. Adding an entry and switching (which reloads the
            proxy) starts the online migration to the new shard.
          '';
          example = [
            {
              name = "shard-1";
              url = "postgres://taskflow@db1:5432/tasks";
            }
          ];
          # Not free-form: a shard has exactly these keys (the daemon refuses any other), and a
          # misspelt one must fail evaluation, naming it, rather than the build-time check.
          type = types.listOf (types.submodule {
            options.name = mkOption {
              type = types.strMatching "[A-Za-z0-9_-]+";
              description = "Shard name (hashed onto the ring).";
            };
            options.url = mkOption {
              type = types.str;
              description = "PostgreSQL URL of the shard (no password: see backend.password_file).";
            };
          });
        };
      };
      extraOptions = {
        migrateOnStart = mkOption {
          type = types.bool;
          default = true;
          description = ''
            Run `taskflow-shard-proxy migrate` (idempotent) before every start, so a new
            release's schema is in place on the auth database and every shard before traffic
            is served. It needs every shard to answer: with one shard down the proxy does not
            start (and is retried) rather than serve an unknown schema. Turn it off to run
            migrations by hand instead.
          '';
        };
      };
    };
  };

  # ---- options --------------------------------------------------------------------------

  mkDaemonOptions =
    _name: d:
    {
      enable = mkEnableOption d.description;

      package = mkPackageOption pkgs "taskflow" { };

      settings = mkOption {
        default = { };
        description = ''
          Contents of the daemon's TOML configuration (docs/configuration.md). Keys not
          declared here are passed through as written. Secrets are never values here: keys
          ending in `_file` name a secret file, by bare name from `secretFiles`.
          Environment variables `TASKFLOW_*` still override the file.
        '';
        type = freeformSubmodule d.settingsOptions;
      };

      secretFiles = mkOption {
        type = types.attrsOf types.path;
        default = { };
        example = {
          "database-password" = "/run/keys/taskflow/database-password";
        };
        description = ''
          Secret files handed to the daemon with systemd's LoadCredential=, by credential name.
          Settings refer to them by that bare name, e.g.
          `database_password_file = "database-password"`. The paths are read by systemd at
          start and must be outside the Nix store, which is world-readable: use a quoted
          absolute path, not a Nix path literal.
        '';
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the daemon's listen port(s) in the firewall.";
      };

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Extra command-line arguments for the daemon.";
      };

      checkConfig = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Validate the generated configuration at build time with `--check-config`. Secret
          files are not available then: each credential is replaced by an empty placeholder,
          so this checks the file's keys and values, not the secrets' contents.
        '';
      };
    }
    // d.extraOptions;

  # ---- per-daemon configuration ---------------------------------------------------------

  mkDaemonConfig =
    name: d:
    let
      dcfg = cfg.${name};
      opt = "services.taskflow.${name}";
      settings = stripNulls dcfg.settings;
      exe = "${dcfg.package}/bin/${d.unit}";

      configFile = format.generate "${d.unit}.toml" settings;

      # Secrets are unavailable at build time: give each credential an empty placeholder so
      # the daemon's bare-name lookups in $CREDENTIALS_DIRECTORY resolve during the check.
      checkedConfigFile =
        if dcfg.checkConfig && pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then
          pkgs.runCommand "${d.unit}-checked.toml"
            {
              preferLocalBuild = true;
              # The unchecked file, for inspection (and for tests/nixos-eval, which cannot build).
              passthru = { inherit configFile; };
            }
            ''
            export CREDENTIALS_DIRECTORY="$TMPDIR/credentials"
            mkdir -p "$CREDENTIALS_DIRECTORY"
            ${lib.concatMapStrings (
              n: "touch \"$CREDENTIALS_DIRECTORY\"/${lib.escapeShellArg n}\n"
            ) (lib.attrNames dcfg.secretFiles)}
            ${exe} --check-config --config ${configFile}
            cp ${configFile} "$out"
          ''
        else
          configFile;

      # A fixed path, so a changed configuration changes only the unit's reload/restart
      # trigger and not ExecStart: that is what lets `switch-to-configuration` reload the
      # proxy (new shards) instead of restarting it.
      etcName = "taskflow/${lib.removePrefix "taskflow-" d.unit}.toml";
      configPath = "/etc/${etcName}";

      proxyStateDir = settings.state_dir or defaultProxyStateDir;

      refs = fileRefs "${opt}.settings" settings;
      bareRefs = builtins.filter (r: !(lib.hasInfix "/" r.value)) refs;
      absoluteRefs = builtins.filter (r: lib.hasPrefix "/" r.value) refs;
    in
    {
      assertions =
        lib.mapAttrsToList (n: p: {
          assertion = isOutsideStore p;
          message = ''
            ${opt}.secretFiles."${n}" = ${toString p} is (or would be copied into) the Nix
            store, which is world-readable. Use a quoted absolute path outside the store,
            e.g. "/run/keys/taskflow/${n}".
          '';
        }) dcfg.secretFiles
        ++ map (n: {
          assertion = isCredentialName n;
          message = "${opt}.secretFiles: \"${n}\" is not a valid credential name (letters, digits, '.', '_', '-').";
        }) (lib.attrNames dcfg.secretFiles)
        ++ map (r: {
          assertion = dcfg.secretFiles ? ${r.value};
          message = ''
            ${r.path} = "${r.value}" names a credential, but ${opt}.secretFiles has no
            "${r.value}" entry: add ${opt}.secretFiles."${r.value}" = "/path/outside/the/store";
          '';
        }) bareRefs
        ++ map (r: {
          assertion = isOutsideStore r.value;
          message = "${r.path} = \"${r.value}\" points into the world-readable Nix store; secrets must live outside it.";
        }) absoluteRefs
        ++ lib.optional (name == "shardProxy") {
          assertion = lib.allUnique (map (s: s.name) dcfg.settings.shards);
          message = "${opt}.settings.shards: shard names must be unique (they place the shard on the hash ring).";
        };

      warnings = lib.optional (dcfg.openFirewall && lib.all isLoopback (d.listens dcfg.settings)) ''
        ${opt}.openFirewall is set, but the daemon only listens on loopback
        (${lib.concatStringsSep ", " (d.listens dcfg.settings)}); set its listen address to
        e.g. 0.0.0.0:<port> for the open port to be reachable.
      '';

      environment.etc.${etcName}.source = checkedConfigFile;

      networking.firewall.allowedTCPPorts = lib.optionals dcfg.openFirewall (
        map portOf (d.listens dcfg.settings)
      );

      systemd.services.${d.unit} = {
        inherit (d) description;
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        # Siblings on the same host: ordering only, so each starts once what it talks to
        # has had its chance to become ready; none of them is pulled in by another.
        after = [
          "network-online.target"
        ]
        ++ map (n: "${daemons.${n}.unit}.service") (builtins.filter (n: cfg.${n}.enable) d.after);

        # Structured fields in the journal; TASKFLOW_ variables override the file.
        environment.TASKFLOW_LOG__FORMAT = "journald";

        reloadTriggers = lib.optional d.reload checkedConfigFile;
        restartTriggers = lib.optional (!d.reload) checkedConfigFile;

        # A dependency that is not up yet (a database, Kafka) is retried for as long as it
        # takes, every RestartSec; a bad configuration exits with EX_CONFIG and is not.
        startLimitIntervalSec = 0;

        serviceConfig = mkMerge [
          {
            Type = "notify";
            NotifyAccess = "main";
            WatchdogSec = "30s";
            Restart = "on-failure";
            RestartSec = "5s";
            RestartPreventExitStatus = exConfig;

            ExecStart = utils.escapeSystemdExecArgs (
              [
                exe
                "--config"
                configPath
              ]
              ++ dcfg.extraArgs
            );
            ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";

            LoadCredential = lib.mapAttrsToList (n: p: "${n}:${toString p}") dcfg.secretFiles;

            # Hardening (notes/nix-anchors.md, after attic); `systemd-analyze security` scores it.
            DynamicUser = true;
            CapabilityBoundingSet = [ "" ];
            DeviceAllow = "";
            DevicePolicy = "closed";
            LockPersonality = true;
            MemoryDenyWriteExecute = true;
            NoNewPrivileges = true;
            PrivateDevices = true;
            PrivateTmp = true;
            PrivateUsers = true;
            ProcSubset = "pid";
            ProtectClock = true;
            ProtectControlGroups = true;
            ProtectHome = true;
            ProtectHostname = true;
            ProtectKernelLogs = true;
            ProtectKernelModules = true;
            ProtectKernelTunables = true;
            ProtectProc = "invisible";
            ProtectSystem = "strict";
            RemoveIPC = true;
            # AF_UNIX: journald's socket and sd_notify's NOTIFY_SOCKET.
            RestrictAddressFamilies = [
              "AF_INET"
              "AF_INET6"
              "AF_UNIX"
            ];
            RestrictNamespaces = true;
            RestrictRealtime = true;
            RestrictSUIDSGID = true;
            SystemCallArchitectures = "native";
            SystemCallFilter = [
              "@system-service"
              "~@resources"
              "~@privileged"
            ];
            # A filtered call fails with EPERM rather than killing the daemon with SIGSYS.
            SystemCallErrorNumber = "EPERM";
            UMask = "0077";
          }

          (mkIf (name == "shardProxy") (mkMerge [
            {
              # Many client and backend sockets; no setrlimit needed (~@resources).
              LimitNOFILE = 65536;
              # ExecStartPre (migrations on every shard) counts against the start timeout.
              TimeoutStartSec = "5min";
              ExecStartPre = lib.optional dcfg.migrateOnStart (
                utils.escapeSystemdExecArgs [
                  exe
                  "--config"
                  configPath
                  "migrate"
                ]
              );
            }
            (
              if proxyStateDir == defaultProxyStateDir then
                {
                  StateDirectory = "taskflow-shard-proxy";
                  StateDirectoryMode = "0700";
                }
              else
                { ReadWritePaths = [ proxyStateDir ]; }
            )
          ]))

          (mkIf (name == "gateway") {
            # One socket per WebSocket client.
            LimitNOFILE = 65536;
          })
        ];
      };
    };

in
{
  options.services.taskflow = lib.mapAttrs mkDaemonOptions daemons;

  config = mkMerge (
    lib.mapAttrsToList (name: d: mkIf cfg.${name}.enable (mkDaemonConfig name d)) daemons
  );
}
