# Shared topology and Python helpers of TaskFlow's NixOS VM tests (basic, add-shard, faults).
#
# nixpkgs runs one PostgreSQL per host, so every database is its own VM: `authdb` (database
# `auth`) and `shard1`..`shardN` (database `tasks`), plus `kafka` (KRaft, one node), `redis`,
# `mail` (mailpit as the SMTP sink) and `app`, which runs the four daemons through
# nixos/module.nix exactly as a deployment would.
#
# `pkgs` must provide `pkgs.taskflow` (the flake passes nixpkgs extended with its overlay).
# runNixOSTest makes the nodes' nixpkgs read-only, so the nodes import the bare module rather
# than nixosModules.default, which would try to add the overlay a second time.
{ pkgs }:

let
  inherit (pkgs) lib;

  # Dev/test-only credentials (SPEC §8): role `taskflow`, password `taskflow`, everywhere.
  pgPassword = "taskflow";

  # A throwaway Ed25519 pair for the JWTs, made at build time so no key is committed.
  jwtKeys = pkgs.runCommand "taskflow-vm-test-jwt-keys" { nativeBuildInputs = [ pkgs.openssl ]; } ''
    mkdir -p $out
    openssl genpkey -algorithm ed25519 -out $out/private.pem
    openssl pkey -in $out/private.pem -pubout -out $out/public.pem
  '';

  shardEntry = n: {
    name = "shard-${toString n}";
    url = "postgres://taskflow@shard${toString n}:5432/tasks";
  };

  postgresNode =
    database:
    { pkgs, ... }:
    {
      services.postgresql = {
        enable = true;
        package = pkgs.postgresql_15;
        enableTCPIP = true;
        # Placed above the module's defaults (peer on the socket, md5 on loopback).
        authentication = ''
          host all taskflow 0.0.0.0/0 scram-sha-256
          host all taskflow ::/0 scram-sha-256
        '';
        # ensureUsers cannot set a password, and ensureDBOwnership needs database name = role
        # name; the initial script (run once, on the first start) does both.
        initialScript = pkgs.writeText "taskflow-${database}-init.sql" ''
          CREATE ROLE taskflow WITH LOGIN PASSWORD '${pgPassword}';
          CREATE DATABASE ${database} OWNER taskflow;
        '';
        # Write transactions over several shards commit with two-phase commit (SPEC §6);
        # PostgreSQL refuses PREPARE TRANSACTION while this is 0, its default.
        settings.max_prepared_transactions = 64;
      };
      networking.firewall.allowedTCPPorts = [ 5432 ];
    };

  kafkaNode =
    { config, ... }:
    {
      # Single-node KRaft, as in nixpkgs' nixos/tests/kafka.
      services.apache-kafka = {
        enable = true;
        # Any 16 bytes, base64url without padding.
        clusterId = "VGFza0Zsb3dWTVRlc3QwMQ";
        formatLogDirs = true;
        settings = {
          "node.id" = 1;
          "process.roles" = [
            "broker"
            "controller"
          ];
          listeners = [
            "PLAINTEXT://:9092"
            "CONTROLLER://:9093"
          ];
          # Clients on other hosts must be told a name they can reach.
          "advertised.listeners" = [ "PLAINTEXT://kafka:9092" ];
          "listener.security.protocol.map" = [
            "PLAINTEXT:PLAINTEXT"
            "CONTROLLER:PLAINTEXT"
          ];
          "controller.quorum.voters" = [ "1@kafka:9093" ];
          "controller.listener.names" = [ "CONTROLLER" ];
          "offsets.topic.replication.factor" = 1;
          "transaction.state.log.replication.factor" = 1;
          "transaction.state.log.min.isr" = 1;
          # Persistent, so stopping the broker in the faults test loses nothing.
          "log.dirs" = [ "/var/lib/apache-kafka" ];
        };
      };
      # kafka-topics.sh and kafka-console-consumer.sh for the test script.
      environment.systemPackages = [ config.services.apache-kafka.package ];
      networking.firewall.allowedTCPPorts = [ 9092 ];
      virtualisation.memorySize = 2048;
      virtualisation.diskSize = 2048;
    };

  redisNode = {
    services.redis.servers.taskflow = {
      enable = true;
      # A named server defaults to no TCP port and to loopback only.
      port = 6379;
      bind = "0.0.0.0";
      openFirewall = true;
      # No password in the test: protected mode would refuse every non-loopback client.
      settings."protected-mode" = "no";
    };
  };

  mailNode = {
    services.mailpit.instances.taskflow = {
      smtp = "0.0.0.0:1025";
      listen = "0.0.0.0:8050";
    };
    networking.firewall.allowedTCPPorts = [
      1025
      8050
    ];
  };

  appNode =
    {
      shards,
      extraModule ? { },
    }:
    { pkgs, ... }:
    let
      passwordFile = "/etc/taskflow-test/pg-password";
    in
    {
      imports = [
        ../../nixos/module.nix
        extraModule
      ];

      # Test only. These /etc entries are links into the world-readable store, which the
      # module cannot see through (it checks the configured path); a deployment keeps its
      # secrets in /run/keys, a secrets manager's directory, or similar.
      environment.etc = {
        "taskflow-test/pg-password".text = pgPassword;
        "taskflow-test/jwt-private.pem".source = "${jwtKeys}/private.pem";
        "taskflow-test/jwt-public.pem".source = "${jwtKeys}/public.pem";
      };

      environment.systemPackages = [ pkgs.postgresql_15 ];
      virtualisation.memorySize = 1536;

      services.taskflow = {
        shardProxy = {
          enable = true;
          openFirewall = true;
          settings = {
            listen = "0.0.0.0:6432";
            metrics_listen = "0.0.0.0:9930";
            backend = {
              user = "taskflow";
              password_file = "backend-password";
            };
            auth_database.url = "postgres://taskflow@authdb:5432/auth";
            shards = map shardEntry shards;
            # A blocked shard (faults test) should fail fast rather than after the default.
            pool.connect_timeout_secs = 3;
          };
          secretFiles = {
            "backend-password" = passwordFile;
            "proxy-password" = passwordFile;
            "proxy-admin-password" = passwordFile;
          };
        };

        auth = {
          enable = true;
          settings = {
            database_password_file = "database-password";
            # The cheapest cost the daemon accepts: the tests register dozens of users.
            bcrypt_cost = 4;
          };
          secretFiles = {
            "database-password" = passwordFile;
            "jwt-private.pem" = "/etc/taskflow-test/jwt-private.pem";
          };
        };

        gateway = {
          enable = true;
          openFirewall = true;
          settings = {
            listen = "0.0.0.0:3000";
            database_password_file = "database-password";
            redis_url = "redis://redis:6379";
            kafka_brokers = "kafka:9092";
            # The outbox relay polls each shard by name through the proxy.
            outbox_shards = map (s: (shardEntry s).name) shards;
            # The load loop and the checks come from one IP and one user.
            rate_limit = {
              per_second = 100000;
              burst = 100000;
            };
          };
          secretFiles = {
            "database-password" = passwordFile;
            "jwt-public.pem" = "/etc/taskflow-test/jwt-public.pem";
          };
        };

        notify = {
          enable = true;
          settings = {
            database_password_file = "database-password";
            kafka_brokers = "kafka:9092";
            redis_url = "redis://redis:6379";
            smtp = {
              host = "mail";
              port = 1025;
            };
          };
          secretFiles."database-password" = passwordFile;
        };
      };
    };

in
{
  inherit shardEntry appNode;

  defaults =
    { pkgs, ... }:
    {
      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
      ];
    };

  # Every host except `app`, which a test adds with appNode (the shards it is configured for
  # may be fewer than the shard hosts, as in add-shard).
  backendNodes =
    shardHosts:
    {
      authdb = postgresNode "auth";
      kafka = kafkaNode;
      redis = redisNode;
      mail = mailNode;
    }
    // lib.listToAttrs (
      map (n: lib.nameValuePair "shard${toString n}" (postgresNode "tasks")) shardHosts
    );

  # Python shared by the test scripts. Machines are globals named after the nodes.
  pythonPrelude = ''
    import json
    import shlex
    import time
    import urllib.parse

    PG_ENV = "PGPASSWORD=${pgPassword} PGCONNECT_TIMEOUT=10"
    UNITS = ["taskflow-shard-proxy", "taskflow-auth", "taskflow-gateway", "taskflow-notify"]


    def q(*args):
        return " ".join(shlex.quote(str(a)) for a in args)


    def psql(machine, host, port, db, query, user="taskflow"):
        """Runs one statement as `user` over TCP; returns psql's unaligned output."""
        return machine.succeed(
            f"{PG_ENV} timeout 120 psql -X -h {host} -p {port} -U {user} -d {db} "
            f"-At -v ON_ERROR_STOP=1 -c {shlex.quote(query)}"
        )


    def admin(query):
        """The shard proxy's admin console (psql -d admin), as the operators' login."""
        return psql(app, "127.0.0.1", 6432, "admin", query, user="taskflow_admin")


    def eventually(check, what, timeout=600):
        """Polls check() every 5 s until it returns something truthy, which is returned."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            time.sleep(5)


    def api(method, path, body=None, token=None):
        """One request to the gateway from the app host: (HTTP status, decoded body).
        Status 0 means no HTTP answer at all (connection error or 60 s timeout)."""
        cmd = ["curl", "-sS", "--max-time", "60", "-o", "/tmp/api-body", "-w", "%{http_code}", "-X", method]
        if body is not None:
            cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        if token is not None:
            cmd += ["-H", f"Authorization: Bearer {token}"]
        cmd.append(f"http://127.0.0.1:3000{path}")
        rc, out = app.execute("rm -f /tmp/api-body; " + q(*cmd))
        if rc != 0:
            return 0, None
        text = app.succeed("cat /tmp/api-body")
        try:
            return int(out), (json.loads(text) if text.strip() else None)
        except json.JSONDecodeError:
            return int(out), text


    def expect(status, method, path, body=None, token=None):
        got, answer = api(method, path, body, token)
        assert got == status, f"{method} {path}: expected HTTP {status}, got {got}: {answer}"
        return answer


    def email(i):
        return f"user{i}@example.test"


    def register(i):
        """Registers user i (user{i}@example.test) and returns the id the auth daemon gave it."""
        user = expect(201, "POST", "/auth/register",
                      {"email": email(i), "name": f"User {i}", "password": "correct horse battery"})
        assert user["email"] == email(i), user
        return user["id"]


    def login(i):
        answer = expect(200, "POST", "/auth/login", {"email": email(i), "password": "correct horse battery"})
        # The seed's contract: the login answer carries the id as a string.
        assert isinstance(answer["id"], str), f"login must return the id as a string: {answer}"
        return answer["token"]


    def create_task(token, performer, title):
        task = expect(201, "POST", "/tasks",
                      {"title": title, "description": "from the VM test", "performer_id": performer}, token)
        assert task["performer_id"] == performer and task["status"] == "pending", task
        return task["id"]


    def list_all_tasks(token, query=""):
        """Every task the API lists, following next_cursor page by page."""
        tasks = []
        cursor = None
        while True:
            path = "/tasks?limit=500" + query
            if cursor is not None:
                path += "&cursor=" + urllib.parse.quote(cursor, safe="")
            page = expect(200, "GET", path, token=token)
            tasks += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return tasks


    def mail_to(address):
        """The messages the SMTP sink (mailpit) holds for one recipient."""
        messages = json.loads(app.succeed("curl -sSf 'http://mail:8050/api/v1/messages?limit=1000'"))["messages"]
        return [m for m in messages if any(to["Address"] == address for to in (m.get("To") or []))]


    def wait_for_backends(databases):
        """Boots every backend host, then waits until each answers the way the daemons use it.
        `databases`: (machine, database name) pairs."""
        for machine, _ in databases:
            machine.start()
        for machine in [kafka, redis, mail]:
            machine.start()
        for machine, db in databases:
            machine.wait_for_unit("postgresql.service")
            # The role and database exist once the initial script has run.
            machine.wait_until_succeeds(f"{PG_ENV} psql -X -h 127.0.0.1 -U taskflow -d {db} -c 'SELECT 1'")
        redis.wait_for_unit("redis-taskflow.service")
        redis.wait_for_open_port(6379)
        mail.wait_for_unit("mailpit-taskflow.service")
        mail.wait_for_open_port(1025)
        mail.wait_for_open_port(8050)
        kafka.wait_for_unit("apache-kafka.service")
        kafka.wait_for_open_port(9092)
        # Created up front: a consumer does not create the topic it subscribes to, and would
        # otherwise only notice it at its next metadata refresh.
        for topic in ["task_events", "notify_events"]:
            kafka.wait_until_succeeds(
                f"kafka-topics.sh --bootstrap-server localhost:9092 --create --if-not-exists "
                f"--topic {topic} --partitions 3 --replication-factor 1"
            )


    def start_app():
        """Boots the app host once its dependencies answer, and waits for every READY=1."""
        app.start()
        for unit in UNITS:
            app.wait_for_unit(f"{unit}.service")
        app.wait_for_open_port(3000)
        app.wait_for_open_port(6432)
        assert expect(200, "GET", "/") == {"message": "API is working"}
  '';
}
