# Adding shard-4 under write load (SPEC §6 "online migration"): a loop keeps creating tasks
# while the proxy moves the keys shard-4 takes; afterwards every acknowledged task is readable
# exactly once, rows live on shard4, and nothing is left behind on the old shards.
#
# method = "console": `ADD SHARD` in the proxy's admin console.
# method = "reload":  the NixOS way (the seed's "edit the config, reload"): a specialisation
#                     adds shard-4 to services.taskflow.shardProxy.settings.shards and
#                     switch-to-configuration must *reload* the proxy, not restart it.
{
  pkgs,
  method ? "console",
}:

assert builtins.elem method [
  "console"
  "reload"
];

let
  common = import ./common.nix { inherit pkgs; };

  # Round-robin task creation until /tmp/load/stop appears; acknowledged (201) ids go to
  # /tmp/load/ids, anything else to /tmp/load/errors. Args: token, performer ids.
  loadLoop = pkgs.writeShellApplication {
    name = "taskflow-vm-load";
    runtimeInputs = [
      pkgs.coreutils
      pkgs.curl
      pkgs.jq
    ];
    text = ''
      token=$1
      shift
      performers=("$@")
      i=0
      while [ ! -e /tmp/load/stop ]; do
        performer=''${performers[$((i % ''${#performers[@]}))]}
        body=$(jq -cn --arg t "load-$i" --argjson p "$performer" '{title: $t, performer_id: $p}')
        code=$(curl -sS --max-time 60 -o /tmp/load/resp -w '%{http_code}' -X POST \
          -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
          --data-binary "$body" http://127.0.0.1:3000/tasks) || code=000
        if [ "$code" = 201 ]; then
          jq -r .id /tmp/load/resp >>/tmp/load/ids || echo "201 unreadable body" >>/tmp/load/errors
        else
          echo "$code $(cat /tmp/load/resp 2>/dev/null || true)" >>/tmp/load/errors
        fi
        i=$((i + 1))
      done
    '';
  };
in
pkgs.testers.runNixOSTest {
  name = "taskflow-add-shard-${method}";

  inherit (common) defaults;

  nodes =
    common.backendNodes [
      1
      2
      3
      4
    ]
    // {
      # The proxy starts with three shards; shard4 is up but unused until the test adds it.
      app = common.appNode {
        shards = [
          1
          2
          3
        ];
        extraModule = pkgs.lib.optionalAttrs (method == "reload") {
          specialisation.with-shard4.configuration = {
            services.taskflow.shardProxy.settings.shards = [ (common.shardEntry 4) ];
          };
        };
      };
    };

  testScript = ''
    from collections import Counter

    ${common.pythonPrelude}

    METHOD = "${method}"
    SHARDS = [shard1, shard2, shard3, shard4]

    wait_for_backends([(authdb, "auth")] + [(m, "tasks") for m in SHARDS])
    start_app()

    with subtest("seed: 40 performers, two tasks each"):
        # 40 keys: shard-4 takes about a quarter of them, so some rows must move.
        performers = [register(i) for i in range(1, 41)]
        token = login(1)
        seeded = [create_task(token, p, f"seed-{p}-{n}") for p in performers for n in range(2)]

    with subtest("a load loop keeps writing"):
        app.succeed("rm -rf /tmp/load && mkdir -p /tmp/load")
        app.succeed(q("systemd-run", "--unit=taskflow-load", "--collect",
                      "${loadLoop}/bin/taskflow-vm-load", token, *performers))
        app.wait_until_succeeds("test $(wc -l < /tmp/load/ids) -ge 20", timeout=300)

    with subtest(f"add shard-4 ({METHOD})"):
        if METHOD == "reload":
            pid = app.succeed("systemctl show -p MainPID --value taskflow-shard-proxy.service").strip()
            app.succeed("/run/current-system/specialisation/with-shard4/bin/switch-to-configuration test")
            assert app.succeed("systemctl show -p MainPID --value taskflow-shard-proxy.service").strip() == pid, \
                "a new shard in the configuration must reload the proxy, not restart it"
        else:
            admin("ADD SHARD shard-4 'postgres://taskflow@shard4:5432/tasks'")
        eventually(lambda: "shard-4" in admin("SHOW SHARDS"), "shard-4 in SHOW SHARDS", timeout=120)

    with subtest("the migration finishes while writes continue"):
        def migrations_done():
            rows = admin("SHOW MIGRATIONS").strip().splitlines()
            print("\n".join(rows))
            return rows and all("done" in row.lower() for row in rows)

        eventually(migrations_done, "SHOW MIGRATIONS to report done", timeout=900)
        written = int(app.succeed("wc -l < /tmp/load/ids"))
        app.wait_until_succeeds(f"test $(wc -l < /tmp/load/ids) -ge {written + 20}", timeout=300)
        app.succeed("touch /tmp/load/stop")
        app.wait_until_fails("systemctl is-active --quiet taskflow-load.service", timeout=180)

    with subtest("every acknowledged task is readable exactly once"):
        errors = app.succeed("cat /tmp/load/errors 2>/dev/null || true").strip()
        assert errors == "", f"writes failed while shard-4 was added:\n{errors}"
        acked = seeded + [int(x) for x in app.succeed("cat /tmp/load/ids").split()]
        assert len(acked) == len(set(acked)), "a task id was handed out twice"

        listed = Counter(t["id"] for t in list_all_tasks(token))
        twice = sorted(i for i, n in listed.items() if n > 1)
        assert not twice, f"tasks listed more than once: {twice[:20]}"
        missing = sorted(set(acked) - set(listed))
        assert not missing, f"acknowledged tasks missing from the listing: {missing[:20]}"

        # One point read per task, in a single shell loop on the app host.
        app.succeed("printf '%s\\n' " + " ".join(map(str, acked)) + " > /tmp/acked")
        codes = app.succeed(
            "while read -r id; do curl -s -o /dev/null -w '%{http_code}\\n' "
            f"-H 'Authorization: Bearer {token}' http://127.0.0.1:3000/tasks/$id; done < /tmp/acked"
            " | sort | uniq -c"
        )
        assert codes.split() == [str(len(acked)), "200"], f"GET /tasks/<id> answers: {codes}"

    with subtest("rows moved to shard4 and left the old shards"):
        counts = {m.name: int(psql(m, "127.0.0.1", 5432, "tasks", "SELECT count(*) FROM tasks")) for m in SHARDS}
        print(counts)
        assert counts["shard4"] > 0, f"no rows moved to shard-4: {counts}"
        assert sum(counts.values()) == len(listed), f"rows per shard {counts}, but {len(listed)} tasks"
        moved = psql(shard4, "127.0.0.1", 5432, "tasks", "SELECT DISTINCT performer_id FROM tasks").split()
        for key in moved:
            owner = admin(f"SHOW SHARD FOR {key}")
            assert "shard-4" in owner, f"performer {key} is on shard4 but the ring says {owner}"
        for m in [shard1, shard2, shard3]:
            left = psql(m, "127.0.0.1", 5432, "tasks",
                        f"SELECT count(*) FROM tasks WHERE performer_id IN ({', '.join(moved)})").strip()
            assert left == "0", f"{m.name} still holds {left} rows of keys that moved to shard-4"
  '';
}
