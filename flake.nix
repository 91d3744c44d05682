{
  description = "TaskFlow: a sharded task backend (gateway, auth, notify, shard proxy)";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    crane.url = "github:ipetkov/crane";

    # The Kafka-API broker the tests and the local stack run (the same pinned release as
    # scripts/ensure-tansu.sh). Used only when the locked nixpkgs has no `tansu` package;
    # newer nixpkgs ship it, and then this input is fetched but not built.
    tansu-src = {
      url = "github:tansu-io/tansu/v0.6.0";
      flake = false;
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      crane,
      tansu-src,
    }:
    let
      inherit (nixpkgs) lib;

      # The VM checks are added on Linux only; everything else builds on macOS too.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      eachSystem = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      workspaceVersion = (lib.importTOML ./Cargo.toml).workspace.package.version;

      daemonBins = [
        "taskflow-gateway"
        "taskflow-auth"
        "taskflow-notify"
        "taskflow-shard-proxy"
      ];

      # Everything built from this repository, as a function of a package set so that the
      # per-system outputs and the overlay (used by the NixOS module) share one definition.
      mkTaskflow =
        pkgs:
        let
          craneLib = crane.mkLib pkgs;

          # The whole tracked tree except the Nix files, so editing the packaging does not
          # rebuild the Rust workspace. Deliberately not cleanCargoSource: the crates embed
          # non-Rust files at compile time (SQL migrations, OpenAPI/Swagger assets) and the
          # tests read fixtures (golden hash vectors).
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.difference ./. (
              lib.fileset.unions [
                (lib.fileset.fileFilter (file: file.hasExt "nix") ./.)
                (lib.fileset.maybeMissing ./flake.lock)
              ]
            );
          };

          commonArgs = {
            inherit src;
            pname = "taskflow";
            version = workspaceVersion;
            strictDeps = true;

            # rdkafka's `cmake-build` feature compiles the bundled librdkafka with cmake; its
            # build scripts also call perl and python3. libz-sys finds zlib with pkg-config.
            nativeBuildInputs = with pkgs; [
              cmake
              pkg-config
              perl
              python3
            ];
            # No openssl or cyrus_sasl: rdkafka is built without its `ssl`/`gssapi` features
            # and every TLS client in the workspace is rustls. Add them here if that changes.
            buildInputs = [ pkgs.zlib ] ++ lib.optionals pkgs.stdenv.hostPlatform.isDarwin [ pkgs.libiconv ];
            # cmake is only for librdkafka: keep its setup hook away from the workspace root.
            dontUseCmakeConfigure = true;

            cargoExtraArgs = "--locked --workspace";
          };

          # Every dependency of the workspace, built once and shared by the package, clippy,
          # docs and the tests.
          cargoArtifacts = craneLib.buildDepsOnly commonArgs;

          binArgs = bins: "--locked --workspace " + lib.concatMapStringsSep " " (b: "--bin ${b}") bins;

          taskflow = craneLib.buildPackage (
            commonArgs
            // {
              inherit cargoArtifacts;
              cargoExtraArgs = binArgs daemonBins;
              # The tests run once, in checks.nextest, where their servers are on PATH.
              doCheck = false;
              meta = {
                description = "TaskFlow daemons: ${lib.concatStringsSep ", " daemonBins}";
                license = lib.licenses.asl20;
                platforms = lib.platforms.unix;
              };
            }
          );

          # The local-stack supervisor (tools/devstack), kept out of `taskflow` so deployments
          # do not carry a development tool.
          taskflow-devstack = craneLib.buildPackage (
            commonArgs
            // {
              inherit cargoArtifacts;
              pname = "taskflow-devstack";
              cargoExtraArgs = binArgs [ "taskflow-devstack" ];
              doCheck = false;
              meta.mainProgram = "taskflow-devstack";
            }
          );

          tansu =
            pkgs.tansu or (craneLib.buildPackage {
              pname = "tansu";
              version = "0.6.0";
              src = tansu-src;
              strictDeps = true;
              # `dynostore`: the in-memory storage engine the tests and the dev stack use.
              cargoExtraArgs = "--locked -p tansu --features dynostore";
              # aws-lc-sys, zstd-sys and lz4-sys build C code; cmake and perl are what
              # aws-lc-sys may ask for.
              nativeBuildInputs = with pkgs; [
                cmake
                perl
                pkg-config
              ];
              dontUseCmakeConfigure = true;
              doCheck = false;
              meta.mainProgram = "tansu";
            });

          # What the tests and the local stack start: PostgreSQL (initdb, pg_ctl, postgres,
          # psql, pgbench), redis-server, an SMTP sink with a web UI, the broker.
          stackServers = [
            pkgs.postgresql_15
            pkgs.redis
            pkgs.mailpit
            tansu
          ];

          # Where localstack (and the dev stack built on it) looks for each server before
          # falling back to Debian's paths and $PATH: explicit, so the Debian layout it
          # probes first can never shadow nixpkgs' builds.
          # nixpkgs has no maildev: localstack drives mailpit instead when maildev is absent.
          serverEnv = {
            TASKFLOW_PG_BIN_DIR = "${lib.getBin pkgs.postgresql_15}/bin";
            TASKFLOW_REDIS_SERVER_BIN = lib.getExe' pkgs.redis "redis-server";
            TASKFLOW_TANSU_BIN = lib.getExe tansu;
            TASKFLOW_MAILPIT_BIN = lib.getExe pkgs.mailpit;
            TASKFLOW_SMTP_SINK = "mailpit";
          };

          # `nix run`: the same local stack as `make dev`, from nixpkgs' packages. The Rust
          # supervisor does the work (ports, state directory and its lock, readiness,
          # prefixed logs, clean Ctrl-C); this only puts the servers on PATH and says where
          # the daemons and the broker are. `exec` so Ctrl-C reaches the supervisor directly
          # and nothing is left running behind it. Arguments go to taskflow-devstack
          # (`nix run . -- status`); none means `dev`.
          # The SMTP sink is nixpkgs' mailpit (SMTP 1025, web UI and API 8050), which
          # localstack drives when told to (TASKFLOW_SMTP_SINK, serverEnv).
          dev-stack = pkgs.writeShellApplication {
            name = "taskflow-dev-stack";
            runtimeInputs = stackServers ++ [
              taskflow
              taskflow-devstack
            ];
            text = ''
              ${lib.toShellVars serverEnv}
              export ${lib.concatStringsSep " " (lib.attrNames serverEnv)}
              # The daemons: the supervisor's own variable, and localstack's.
              export TASKFLOW_DEVSTACK_BIN_DIR=${taskflow}/bin
              export TASKFLOW_BIN_DIR=${taskflow}/bin
              if [ "$#" -eq 0 ]; then
                set -- dev
              fi
              exec taskflow-devstack "$@"
            '';
          };
        in
        {
          inherit
            craneLib
            src
            commonArgs
            cargoArtifacts
            taskflow
            taskflow-devstack
            tansu
            stackServers
            serverEnv
            dev-stack
            ;
        };

      perSystem = eachSystem mkTaskflow;
    in
    {
      packages = lib.mapAttrs (_: t: {
        default = t.taskflow;
        inherit (t)
          taskflow
          taskflow-devstack
          tansu
          dev-stack
          ;
      }) perSystem;

      apps = lib.mapAttrs (_: t: {
        default = {
          type = "app";
          program = lib.getExe t.dev-stack;
          meta.description = "Start the local TaskFlow stack (PostgreSQL x4, Redis, broker, mailpit, the four daemons)";
        };
      }) perSystem;

      checks = eachSystem (
        pkgs:
        let
          t = perSystem.${pkgs.stdenv.hostPlatform.system};
          inherit (t) craneLib commonArgs cargoArtifacts;
          toml = pkgs.formats.toml { };

          # nixpkgs plus our overlay, so `pkgs.taskflow` resolves inside the VMs exactly as it
          # does for users of nixosModules.default.
          vmPkgs = pkgs.extend self.overlays.default;
        in
        {
          inherit (t) taskflow taskflow-devstack;

          clippy = craneLib.cargoClippy (
            commonArgs
            // {
              inherit cargoArtifacts;
              cargoClippyExtraArgs = "--all-targets -- --deny warnings";
            }
          );

          fmt = craneLib.cargoFmt { inherit (commonArgs) src pname version; };

          doc = craneLib.cargoDoc (commonArgs // { inherit cargoArtifacts; });

          # The tests start real servers on free loopback ports (SPEC §8), found through
          # serverEnv: PostgreSQL 15, redis-server and the broker (nixpkgs' tansu, or one
          # built from the pinned release) all run here, and the SMTP sink is mailpit
          # (localstack's maildev, from npm, is not in nixpkgs).
          nextest = craneLib.cargoNextest (
            commonArgs
            // t.serverEnv
            // {
              inherit cargoArtifacts;
              nativeBuildInputs = commonArgs.nativeBuildInputs ++ t.stackServers;
              # Tests start the daemons themselves: localstack looks for them next to the
              # test executables (target/<profile>), where only packages with integration
              # tests would get their binaries built by nextest alone.
              buildPhaseCargoCommand = ''
                mkdir -p $out
                cargoWithProfile build --locked --workspace --bins
                cargo nextest --version
              '';
              # The tests bind loopback ports; the macOS sandbox forbids it otherwise.
              __darwinAllowLocalNetworking = true;
              # initdb and the daemons' temporary files want a writable HOME.
              preCheck = ''
                export HOME="$(mktemp -d)"
              '';
            }
          );

          # Like attic's check-config: each daemon validates a configuration generated the
          # way the NixOS module generates it, and refuses a bad one with EX_CONFIG (78) and
          # a message naming the key (docs/configuration.md).
          config-check =
            let
              settings = {
                shard-proxy = {
                  listen = "0.0.0.0:6432";
                  metrics_listen = "127.0.0.1:9930";
                  state_dir = "/var/lib/taskflow-shard-proxy";
                  users = [
                    {
                      name = "taskflow";
                      password_file = "proxy-password";
                    }
                  ];
                  backend = {
                    user = "taskflow";
                    password_file = "backend-password";
                  };
                  auth_database.url = "postgres://taskflow@authdb:5432/auth";
                  shards = map (n: {
                    name = "shard-${toString n}";
                    url = "postgres://taskflow@shard${toString n}:5432/tasks";
                  }) (lib.range 1 3);
                };
                gateway = {
                  listen = "0.0.0.0:3000";
                  database_password_file = "database-password";
                  jwt_public_key_file = "jwt-public.pem";
                  redis_url = "redis://redis:6379";
                  kafka_brokers = "kafka:9092";
                  rate_limit = {
                    per_second = 10;
                    burst = 20;
                  };
                };
                auth = {
                  listen = "127.0.0.1:8081";
                  database_password_file = "database-password";
                  jwt_private_key_file = "jwt-private.pem";
                  bcrypt_cost = 12;
                };
                notify = {
                  metrics_listen = "127.0.0.1:9931";
                  database_password_file = "database-password";
                  kafka_brokers = "kafka:9092";
                  smtp = {
                    host = "mail";
                    port = 1025;
                  };
                };
              };
              configs = lib.mapAttrs (name: s: toml.generate "taskflow-${name}.toml" s) settings;
              badGateway = toml.generate "taskflow-gateway-bad.toml" (
                settings.gateway // { listen = "not an address"; }
              );
            in
            pkgs.runCommand "taskflow-config-check"
              {
                nativeBuildInputs = [
                  t.taskflow
                  pkgs.openssl
                ];
              }
              ''
                # Real-looking secrets, as systemd's LoadCredential= would provide them.
                export CREDENTIALS_DIRECTORY="$TMPDIR/credentials"
                mkdir -p "$CREDENTIALS_DIRECTORY"
                for f in database-password backend-password proxy-password; do
                  echo taskflow >"$CREDENTIALS_DIRECTORY/$f"
                done
                openssl genpkey -algorithm ed25519 -out "$CREDENTIALS_DIRECTORY/jwt-private.pem"
                openssl pkey -in "$CREDENTIALS_DIRECTORY/jwt-private.pem" -pubout \
                  -out "$CREDENTIALS_DIRECTORY/jwt-public.pem"

                ${lib.concatStrings (
                  lib.mapAttrsToList (name: file: ''
                    echo "check-config: taskflow-${name}"
                    taskflow-${name} --check-config --config ${file}
                  '') configs
                )}

                rc=0
                taskflow-gateway --check-config --config ${badGateway} >err 2>&1 || rc=$?
                cat err
                if [ "$rc" -ne 78 ]; then
                  echo "a bad listen address must exit with EX_CONFIG (78), got $rc" >&2
                  exit 1
                fi
                if ! grep -q listen err; then
                  echo "the error for a bad listen address must name the key" >&2
                  exit 1
                fi
                touch "$out"
              '';
        }
        // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
          vm-basic = import ./tests/vm/basic.nix { pkgs = vmPkgs; };
          # Online resharding under write load: ADD SHARD in the console, and the NixOS way
          # (a specialisation adds shard-4; switch-to-configuration reloads the proxy).
          vm-add-shard = import ./tests/vm/add-shard.nix { pkgs = vmPkgs; };
          vm-add-shard-reload = import ./tests/vm/add-shard.nix {
            pkgs = vmPkgs;
            method = "reload";
          };
          vm-faults = import ./tests/vm/faults.nix { pkgs = vmPkgs; };
        }
      );

      devShells = eachSystem (
        pkgs:
        let
          t = perSystem.${pkgs.stdenv.hostPlatform.system};
        in
        {
          # Inputs of the cargo checks only: the VM checks would drag whole NixOS closures
          # into the shell.
          # serverEnv: `cargo test` in the shell finds the same servers as the checks.
          default = t.craneLib.devShell (
            t.serverEnv
            // {
              checks = {
                inherit (self.checks.${pkgs.stdenv.hostPlatform.system}) clippy nextest;
              };
              packages = t.stackServers ++ [
                pkgs.cargo-nextest
                pkgs.nixfmt
                pkgs.statix
              ];
            }
          );
        }
      );

      # `nix fmt`: the RFC 166 style nixfmt (the formerly separate nixfmt-rfc-style, now the
      # same package as nixfmt), wrapped by treefmt so that `nix fmt` with no arguments
      # formats the whole tree.
      formatter = eachSystem (pkgs: pkgs.nixfmt-tree);

      overlays.default = final: _prev: {
        taskflow = (mkTaskflow final).taskflow;
      };

      nixosModules.default = {
        imports = [ ./nixos/module.nix ];
        # Makes `pkgs.taskflow`, the default of services.taskflow.*.package, resolve.
        nixpkgs.overlays = [ self.overlays.default ];
      };
    };
}
