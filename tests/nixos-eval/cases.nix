# Configurations of services.taskflow evaluated by run.sh. `good*` cases must evaluate with
# no failed assertion (and `expectWarning`, when set, among the warnings); every other case
# is a documented misconfiguration and must fail with `expect` in the error.
#
# `good` is also what the real-systemd test deploys (tests/systemd/): every address on
# loopback, PostgreSQL on 5432 (database `auth`, shards in `tasks1` and `tasks2`), Redis
# on 6379, the broker on 9092, an SMTP sink on 1025, secrets under /run/keys/taskflow.
{ lib }:

let
  keys = "/run/keys/taskflow";

  good = {
    services.taskflow = {
      shardProxy = {
        enable = true;
        settings = {
          backend = {
            user = "taskflow";
            password_file = "backend-password";
          };
          auth_database.url = "postgres://taskflow@127.0.0.1:5432/auth";
          shards = [
            {
              name = "shard-1";
              url = "postgres://taskflow@127.0.0.1:5432/tasks1";
            }
            {
              name = "shard-2";
              url = "postgres://taskflow@127.0.0.1:5432/tasks2";
            }
          ];
          pool.connect_timeout_secs = 3;
          auth_database.pool_size = 10;
        };
        secretFiles = {
          "backend-password" = "${keys}/pg-password";
          "proxy-password" = "${keys}/pg-password";
          "proxy-admin-password" = "${keys}/pg-password";
        };
      };
      auth = {
        enable = true;
        settings = {
          database_password_file = "database-password";
          bcrypt_cost = 4;
        };
        secretFiles = {
          "database-password" = "${keys}/pg-password";
          "jwt-private.pem" = "${keys}/jwt-private.pem";
        };
      };
      gateway = {
        enable = true;
        settings = {
          database_password_file = "database-password";
          outbox_shards = [
            "shard-1"
            "shard-2"
          ];
        };
        secretFiles = {
          "database-password" = "${keys}/pg-password";
          "jwt-public.pem" = "${keys}/jwt-public.pem";
        };
      };
      notify = {
        enable = true;
        settings = {
          database_password_file = "database-password";
          smtp = {
            host = "127.0.0.1";
            port = 1025;
          };
        };
        secretFiles."database-password" = "${keys}/pg-password";
      };
    };
  };

  # `good` with one change (deep-merged).
  with' = change: {
    config = lib.recursiveUpdate good change;
  };
  # `good` plus a module of its own (for list-valued changes, merged by the module system).
  plus = extra: {
    config = {
      imports = [
        good
        extra
      ];
    };
  };
  fails = expect: case: case // { inherit expect; };
  storePath = "${builtins.storeDir}/0123456789abcdfghijklmnpqrsvwxyz-pg-password";
in
{
  # `good` as a case (cases are { config; expect?; expectWarning?; }).
  good = {
    config = good;
  };

  # Public listeners, the firewall opened, a state directory of the operator's choosing.
  good-public = with' {
    services.taskflow = {
      gateway = {
        openFirewall = true;
        settings.listen = "0.0.0.0:3000";
      };
      shardProxy = {
        openFirewall = true;
        settings = {
          listen = "[::]:6432";
          state_dir = "/srv/taskflow-proxy";
        };
      };
    };
  };

  # openFirewall on a loopback-only daemon evaluates, with a warning.
  good-warning =
    with' { services.taskflow.auth.openFirewall = true; }
    // {
      expectWarning = "services.taskflow.auth.openFirewall is set, but the daemon only listens on loopback";
    };

  secret-in-store = fails ''services.taskflow.auth.secretFiles."database-password" = ${storePath} is (or would be copied into) the Nix'' (
    with' { services.taskflow.auth.secretFiles."database-password" = storePath; }
  );

  secret-below-store = fails "is (or would be copied into) the Nix" (
    with' { services.taskflow.notify.secretFiles."database-password" = "${storePath}/inner/file"; }
  );

  # A Nix path literal would be copied into the store as soon as it is interpolated.
  secret-path-literal = fails ''services.taskflow.gateway.secretFiles."jwt-public.pem" = '' (
    with' { services.taskflow.gateway.secretFiles."jwt-public.pem" = ./cases.nix; }
  );

  secret-setting-in-store = fails ''services.taskflow.gateway.settings.database_password_file = "${storePath}" points into the world-readable Nix store'' (
    with' { services.taskflow.gateway.settings.database_password_file = storePath; }
  );

  missing-secret = fails ''services.taskflow.notify.settings.smtp.password_file = "smtp-password" names a credential, but services.taskflow.notify.secretFiles has no'' (
    with' { services.taskflow.notify.settings.smtp.password_file = "smtp-password"; }
  );

  # The gateway's key has a default credential name: leaving out its file is caught too.
  missing-default-secret = fails ''services.taskflow.gateway.settings.jwt_public_key_file = "jwt-public.pem" names a credential'' (
    plus {
      services.taskflow.gateway.secretFiles = lib.mkForce {
        "database-password" = "${keys}/pg-password";
      };
    }
  );

  missing-proxy-user-secret = fails ''services.taskflow.shardProxy.settings.users.[0].password_file = "proxy-password" names a credential'' (
    plus {
      services.taskflow.shardProxy.secretFiles = lib.mkForce {
        "backend-password" = "${keys}/pg-password";
      };
    }
  );

  bad-credential-name = fails ''"db password" is not a valid credential name'' (
    with' { services.taskflow.auth.secretFiles."db password" = "${keys}/pg-password"; }
  );

  bad-listen-host = fails "services.taskflow.gateway.settings.listen' is not of type" (
    with' { services.taskflow.gateway.settings.listen = "localhost:3000"; }
  );

  bad-listen-no-port = fails "services.taskflow.shardProxy.settings.metrics_listen' is not of type" (
    with' { services.taskflow.shardProxy.settings.metrics_listen = "127.0.0.1"; }
  );

  unknown-shard-option = fails "services.taskflow.shardProxy.settings.shards.\"[definition 2-entry 1]\".weight' does not exist" (
    plus {
      services.taskflow.shardProxy.settings.shards = [
        {
          name = "shard-3";
          url = "postgres://taskflow@127.0.0.1:5432/tasks3";
          weight = 2;
        }
      ];
    }
  );

  bad-shard-name = fails "services.taskflow.shardProxy.settings.shards.\"[definition 2-entry 1]\".name' is not of type" (
    plus {
      services.taskflow.shardProxy.settings.shards = [
        {
          name = "shard 3";
          url = "postgres://taskflow@127.0.0.1:5432/tasks3";
        }
      ];
    }
  );

  duplicate-shard = fails "services.taskflow.shardProxy.settings.shards: shard names must be unique" (
    plus {
      services.taskflow.shardProxy.settings.shards = [
        {
          name = "shard-1";
          url = "postgres://taskflow@127.0.0.1:5432/tasks3";
        }
      ];
    }
  );

  bad-auth-pool-size = fails "services.taskflow.shardProxy.settings.auth_database.pool_size' is not of type" (
    with' { services.taskflow.shardProxy.settings.auth_database.pool_size = 0; }
  );

  bad-bcrypt-cost = fails "services.taskflow.auth.settings.bcrypt_cost' is not of type" (
    with' { services.taskflow.auth.settings.bcrypt_cost = 40; }
  );

  # TLS to the backends: a CA certificate is public, so a store path is fine (no `_file`
  # suffix: it is not a secret reference).
  good-backend-tls = with' {
    services.taskflow.shardProxy.settings.backend = {
      sslmode = "verify-full";
      sslrootcert = "${builtins.storeDir}/0123456789abcdfghijklmnpqrsvwxyz-pg-ca.pem";
      allow_insecure_auth = false;
    };
  };

  bad-backend-sslmode = fails "services.taskflow.shardProxy.settings.backend.sslmode' is not of type" (
    with' { services.taskflow.shardProxy.settings.backend.sslmode = "verify_full"; }
  );

  bad-smtp-tls = fails "services.taskflow.notify.settings.smtp.tls' is not of type" (
    with' { services.taskflow.notify.settings.smtp.tls = "ssl"; }
  );
}
