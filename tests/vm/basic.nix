# The whole system on its own hosts: register, log in, create and list a task, get the email,
# reload the proxy, stop every daemon cleanly. Run with `nix build .#checks.<system>.vm-basic`.
{ pkgs }:

let
  common = import ./common.nix { inherit pkgs; };
  shards = [
    1
    2
    3
  ];
in
pkgs.testers.runNixOSTest {
  name = "taskflow-basic";

  inherit (common) defaults;

  nodes = common.backendNodes shards // {
    app = common.appNode { inherit shards; };
  };

  testScript = ''
    ${common.pythonPrelude}

    wait_for_backends([(authdb, "auth"), (shard1, "tasks"), (shard2, "tasks"), (shard3, "tasks")])
    start_app()

    with subtest("the proxy knows the configured shards"):
        listed = admin("SHOW SHARDS")
        for name in ["shard-1", "shard-2", "shard-3"]:
            assert name in listed, f"{name} missing from SHOW SHARDS:\n{listed}"

    with subtest("register and log in"):
        alice = register(1)
        bob = register(2)
        # A fresh auth database numbers users from 1, so the seed's examples' ids hold.
        assert bob == 2, f"expected the second user to get id 2, got {bob}"
        expect(409, "POST", "/auth/register",
               {"email": email(1), "name": "Again", "password": "correct horse battery"})
        expect(401, "POST", "/auth/login", {"email": email(1), "password": "wrong password"})
        token = login(1)
        expect(401, "GET", "/tasks?performer_id=2")

    with subtest("create a task for performer 2 and list it"):
        task = expect(201, "POST", "/tasks",
                      {"title": "Write the VM test", "description": "basic.nix", "performer_id": 2}, token)
        assert task["creator_id"] == alice and task["performer_id"] == 2 and task["status"] == "pending", task
        page = expect(200, "GET", "/tasks?performer_id=2&status=pending", token=token)
        assert [t["id"] for t in page["data"]] == [task["id"]], page
        assert page["next_cursor"] is None, page
        assert expect(200, "GET", f"/tasks/{task['id']}", token=token)["title"] == "Write the VM test"

    with subtest("the performer gets an email through the SMTP sink"):
        eventually(lambda: mail_to(email(2)), "an email to the performer")

    with subtest("logs reach the journal with structured fields"):
        app.succeed("journalctl -u taskflow-gateway.service -o json | grep -Eq '\"(TARGET|CODE_FILE)\"'")

    with subtest("systemctl reload keeps the proxy serving"):
        pid = app.succeed("systemctl show -p MainPID --value taskflow-shard-proxy.service").strip()
        app.succeed("systemctl reload taskflow-shard-proxy.service")
        app.wait_until_succeeds("systemctl is-active taskflow-shard-proxy.service")
        assert app.succeed("systemctl show -p MainPID --value taskflow-shard-proxy.service").strip() == pid, \
            "reload must not restart the proxy"
        page = expect(200, "GET", "/tasks?performer_id=2&status=pending", token=token)
        assert len(page["data"]) == 1, page

    with subtest("the units run hardened"):
        for unit in UNITS:
            assert app.succeed(f"systemctl show -p DynamicUser --value {unit}.service").strip() == "yes"
            # The exposure score, for the log (notes/nix-anchors.md).
            print(app.succeed(f"systemd-analyze security {unit}.service | tail -n 1"))

    with subtest("systemctl stop drains and leaves each unit inactive"):
        for unit in ["taskflow-gateway", "taskflow-notify", "taskflow-auth", "taskflow-shard-proxy"]:
            app.succeed(f"systemctl stop {unit}.service")
            state = app.succeed(f"systemctl show -p ActiveState --value {unit}.service").strip()
            result = app.succeed(f"systemctl show -p Result --value {unit}.service").strip()
            assert (state, result) == ("inactive", "success"), f"{unit} stopped as {state}/{result}"
  '';
}
