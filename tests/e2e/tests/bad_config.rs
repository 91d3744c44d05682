//! A daemon given a bad configuration exits with status 78 (EX_CONFIG) and a message that
//! names the offending key — whether the value came from the file or the environment —
//! so systemd does not restart it in a loop and the operator knows what to fix.

use taskflow_e2e::{run_to_exit, Scratch};

/// Each daemon and the key holding its listen address.
const DAEMONS: [(&str, &str); 4] = [
    ("taskflow-gateway", "listen"),
    ("taskflow-auth", "listen"),
    ("taskflow-shard-proxy", "listen"),
    ("taskflow-notify", "metrics_listen"),
];

fn check(binary: &str, args: &[&str], must_name: &str) {
    let (code, out) = run_to_exit(binary, args);
    assert_eq!(
        code,
        Some(78),
        "{binary} {args:?}: expected exit 78, got {code:?}: {out}"
    );
    assert!(
        out.contains(must_name),
        "{binary} {args:?}: message does not name `{must_name}`: {out}"
    );
}

#[test]
fn a_malformed_address_names_its_key() {
    let scratch = Scratch::new();
    for (bin, key) in DAEMONS {
        let cfg = scratch.write(
            &format!("{bin}.toml"),
            &format!("{key} = \"not-an-address\"\n"),
        );
        check(
            bin,
            &["--config", cfg.to_str().expect("utf-8"), "--check-config"],
            key,
        );
    }
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let scratch = Scratch::new();
    for (bin, _) in DAEMONS {
        let cfg = scratch.write(&format!("{bin}.toml"), "lisen = \"127.0.0.1:1\"\n");
        check(
            bin,
            &["--config", cfg.to_str().expect("utf-8"), "--check-config"],
            "lisen",
        );
    }
}

#[test]
fn a_wrong_type_names_its_key() {
    let scratch = Scratch::new();
    for (bin, _) in DAEMONS {
        let cfg = scratch.write(&format!("{bin}.toml"), "[log]\nlevel = 5\n");
        check(
            bin,
            &["--config", cfg.to_str().expect("utf-8"), "--check-config"],
            "level",
        );
        let cfg = scratch.write(&format!("{bin}.toml"), "shutdown_grace_secs = \"soon\"\n");
        check(
            bin,
            &["--config", cfg.to_str().expect("utf-8"), "--check-config"],
            "shutdown_grace_secs",
        );
    }
}

#[test]
fn a_missing_file_is_named() {
    for (bin, _) in DAEMONS {
        check(
            bin,
            &["--config", "/nonexistent/taskflow.toml"],
            "/nonexistent/taskflow.toml",
        );
    }
}

#[test]
fn a_bad_environment_override_names_its_key() {
    for (bin, key) in DAEMONS {
        let bin_path = taskflow_localstack::binary_path(bin).expect("binary");
        let env = format!("TASKFLOW_{}", key.to_ascii_uppercase());
        let out = std::process::Command::new(bin_path)
            .arg("--check-config")
            .env(&env, "nowhere")
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{bin} with {env}=nowhere: {text}"
        );
        assert!(text.contains(key), "{bin}: {text}");
    }
}

#[test]
fn defaults_are_a_valid_configuration() {
    // With no file at all each daemon's documented defaults validate (secrets are only read
    // at start-up, not by --check-config).
    for (bin, key) in DAEMONS {
        let (code, out) = run_to_exit(bin, &["--check-config"]);
        assert_eq!(code, Some(0), "{bin} --check-config: {out}");
        assert!(
            out.contains(key),
            "{bin} prints its effective configuration: {out}"
        );
    }
}

#[test]
fn a_missing_secret_file_names_its_key_at_start_but_not_in_check_config() {
    let scratch = Scratch::new();
    for (bin, key, toml) in [
        ("taskflow-gateway", "database_password_file", "database_password_file = \"/nonexistent/pw\"\n"),
        ("taskflow-auth", "database_password_file", "database_password_file = \"/nonexistent/pw\"\n"),
        ("taskflow-notify", "database_password_file", "database_password_file = \"/nonexistent/pw\"\n"),
        (
            "taskflow-shard-proxy",
            "backend.password_file",
            "users = [{ name = \"taskflow\", password = \"dev\" }]\n[backend]\npassword_file = \"/nonexistent/pw\"\n",
        ),
    ] {
        let cfg = scratch.write(&format!("{bin}.toml"), toml);
        let path = cfg.to_str().expect("utf-8");
        check(bin, &["--config", path], key);
        let (code, out) = run_to_exit(bin, &["--config", path, "--check-config"]);
        assert_eq!(code, Some(0), "{bin} --check-config must not read secrets: {out}");
    }
}
