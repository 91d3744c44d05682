//! Transport security to the backends, against real PostgreSQL clusters: TLS with
//! `sslmode=verify-full` connects and routes (and the shards see encrypted connections);
//! a wrong host name or a wrong CA is refused; `require` against a server without TLS
//! fails clearly (`prefer` falls back); a server asking for an MD5 or cleartext password is
//! refused unless `backend.allow_insecure_auth` is set. The certificates are made here with
//! the openssl command-line tool.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Env;
use taskflow_localstack::PgCluster;
use taskflow_shard_proxy::config::{backend_security, BackendTarget};

/// A test CA, a server certificate for `localhost` signed by it, and an unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        for ca in ["ca", "other-ca"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=taskflow test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &p(&format!("{ca}.key")),
                "-out",
                &p(&format!("{ca}.crt")),
            ]);
        }
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
        ]);
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p("server.ext"),
            "-out",
            &p("server.crt"),
        ]);
        Pki { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Turns TLS on in a running cluster (ssl is reloadable): copies the server key pair into
/// the data directory, owned by the server's user, and waits until new sessions see it.
async fn enable_tls(cluster: &PgCluster, pki: &Pki) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let data = cluster.data_dir();
    let owner = std::fs::metadata(data).expect("data dir");
    for f in ["server.crt", "server.key"] {
        let to = data.join(format!("test-{f}"));
        std::fs::copy(pki.path(f), &to).expect("copy key pair");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::os::unix::fs::chown(&to, Some(owner.uid()), Some(owner.gid())).expect("chown");
    }
    let su = cluster
        .superuser_client("postgres")
        .await
        .expect("superuser");
    let cert = data.join("test-server.crt");
    let key = data.join("test-server.key");
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        su.batch_execute(&sql).await.expect("enable ssl");
    }
    wait_for_setting(cluster, "ssl", "on").await;
}

async fn wait_for_setting(cluster: &PgCluster, name: &str, want: &str) {
    for _ in 0..100 {
        let su = cluster
            .superuser_client("postgres")
            .await
            .expect("superuser");
        let v: String = su
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .expect("show")
            .get(0);
        if v == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never became {want}");
}

/// Replaces the proxy's shard URLs (`make(port)`) and restarts it.
async fn restart_with(env: &mut Env, make: impl Fn(u16) -> String) {
    env.stop_proxy().await;
    let ports = env.shards.ports();
    for (s, port) in env.config.shards.iter_mut().zip(ports) {
        s.url = make(port);
    }
    env.start_proxy().await;
}

/// Runs a keyed read through the proxy; the server's message on failure.
async fn keyed_read(env: &Env, key: i64) -> Result<i64, String> {
    let c = env.client("tasks").await;
    c.query_one(
        "SELECT count(*) FROM tasks WHERE performer_id = $1",
        &[&key],
    )
    .await
    .map(|r| r.get(0))
    .map_err(|e| match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    })
}

fn verify_full_url(host: &str, ca: &Path) -> impl Fn(u16) -> String {
    let ca = ca.display().to_string();
    let host = host.to_owned();
    move |port| {
        format!("postgres://taskflow@{host}:{port}/tasks?sslmode=verify-full&sslrootcert={ca}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_routes_and_encrypts() {
    let pki = Pki::new();
    let mut env = Env::start(2).await;
    for s in env.shards.iter() {
        enable_tls(s, &pki).await;
    }
    restart_with(&mut env, verify_full_url("localhost", &pki.path("ca.crt"))).await;
    let ring = env.ring();
    let keys: Vec<i64> = (0..2)
        .map(|shard| {
            (1..1000i64)
                .find(|k| ring.shard_for(*k) == shard)
                .expect("key")
        })
        .collect();
    let c = env.client("tasks").await;
    for (id, key) in keys.iter().enumerate() {
        c.execute(
            "INSERT INTO tasks (id, performer_id, creator_id, title) VALUES ($1, $2, 1, 'tls')",
            &[&(id as i64 + 1), key],
        )
        .await
        .expect("insert over TLS");
    }
    assert_eq!(env.holders(1).await, vec![0]);
    assert_eq!(env.holders(2).await, vec![1]);
    let n: i64 = c
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .expect("scatter count over TLS")
        .get(0);
    assert_eq!(n, 2);
    for i in 0..2 {
        let su = env.shards[i].superuser_client("tasks").await.expect("su");
        let rows = su
            .query(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'taskflow-shard-proxy'",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        assert!(!rows.is_empty(), "shard-{} sees no proxy connection", i + 1);
        assert!(
            rows.iter().all(|r| r.get::<_, bool>(0)),
            "shard-{} has a plaintext proxy connection",
            i + 1
        );
    }
    typed_client_is_encrypted(&env).await;
}

/// `migrate`'s typed clients use the same TLS as the pools.
async fn typed_client_is_encrypted(env: &Env) {
    let security = backend_security(&env.config).expect("backend security");
    let url = &env.config.shards[0].url;
    let target = BackendTarget::parse(url).expect("url");
    let client = taskflow_shard_proxy::backend::client::connect(
        &target,
        &security[url],
        "taskflow",
        Some(common::PASSWORD),
    )
    .await
    .expect("typed client over TLS");
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "migrate's client is not encrypted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_wrong_host_name_or_ca() {
    let pki = Pki::new();
    let mut env = Env::start(1).await;
    enable_tls(&env.shards[0], &pki).await;

    // The certificate names `localhost`, not `127.0.0.1`.
    restart_with(&mut env, verify_full_url("127.0.0.1", &pki.path("ca.crt"))).await;
    let e = keyed_read(&env, 1).await.expect_err("wrong host name");
    assert!(e.contains("shard-1"), "{e}");
    assert!(e.contains("sslmode=verify-full"), "{e}");
    assert!(e.to_lowercase().contains("not valid for name"), "{e}");

    // A CA that did not sign the server's certificate.
    restart_with(
        &mut env,
        verify_full_url("localhost", &pki.path("other-ca.crt")),
    )
    .await;
    let e = keyed_read(&env, 1).await.expect_err("wrong CA");
    assert!(e.contains("shard-1"), "{e}");
    assert!(e.contains("UnknownIssuer"), "{e}");

    // verify-ca checks the chain only: the right CA passes whatever the host name.
    let ca = pki.path("ca.crt").display().to_string();
    restart_with(&mut env, |port| {
        format!("postgres://taskflow@127.0.0.1:{port}/tasks?sslmode=verify-ca&sslrootcert={ca}")
    })
    .await;
    assert_eq!(keyed_read(&env, 1).await, Ok(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_fails_clearly_without_server_tls_and_prefer_falls_back() {
    let mut env = Env::start(1).await;
    restart_with(&mut env, |port| {
        format!("postgres://taskflow@127.0.0.1:{port}/tasks?sslmode=require")
    })
    .await;
    let e = keyed_read(&env, 1).await.expect_err("server has no TLS");
    assert!(e.contains("shard-1"), "{e}");
    assert!(
        e.contains("does not accept TLS connections, but sslmode=require"),
        "{e}"
    );

    restart_with(&mut env, |port| {
        format!("postgres://taskflow@127.0.0.1:{port}/tasks?sslmode=prefer")
    })
    .await;
    assert_eq!(keyed_read(&env, 1).await, Ok(0));
}

/// Opens a typed client to shard-1 as the proxy's `migrate` would.
async fn typed_client(env: &Env) -> Result<tokio_postgres::Client, String> {
    let security = backend_security(&env.config).expect("backend security");
    let url = &env.config.shards[0].url;
    let target = BackendTarget::parse(url).expect("url");
    taskflow_shard_proxy::backend::client::connect(
        &target,
        &security[url],
        "taskflow",
        Some(common::PASSWORD),
    )
    .await
    .map_err(|e| e.to_string())
}

/// Makes the cluster ask role `taskflow` for `method` (md5 or password) instead of SCRAM.
async fn weaken_password_auth(cluster: &PgCluster, method: &str) {
    let su = cluster
        .superuser_client("postgres")
        .await
        .expect("superuser");
    su.batch_execute("SET password_encryption = 'md5'; ALTER ROLE taskflow PASSWORD 'taskflow';")
        .await
        .expect("md5 password");
    let hba = cluster.data_dir().join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("host") && l.contains("taskflow") {
                let mut fields: Vec<&str> = l.split_whitespace().collect();
                fields.pop();
                fields.push(method);
                fields.join(" ")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&hba, text + "\n").expect("write pg_hba.conf");
    su.batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_cleartext_are_refused_unless_allowed() {
    let mut env = Env::start(1).await;
    for (method, name) in [("md5", "MD5"), ("password", "cleartext")] {
        weaken_password_auth(&env.shards[0], method).await;
        env.config.backend.allow_insecure_auth = false;
        restart_with(&mut env, common::shard_url).await;
        let e = keyed_read(&env, 1)
            .await
            .expect_err("insecure auth refused");
        assert!(e.contains("shard-1"), "{e}");
        assert!(
            e.contains(&format!("asked for {name} password authentication")),
            "{e}"
        );
        assert!(e.contains("backend.allow_insecure_auth"), "{e}");
        // The typed client (migrate, ADD SHARD's schema step) refuses it too.
        let e = typed_client(&env)
            .await
            .expect_err("typed client refuses insecure auth");
        assert!(e.contains("backend.allow_insecure_auth"), "{e}");

        env.config.backend.allow_insecure_auth = true;
        restart_with(&mut env, common::shard_url).await;
        assert_eq!(keyed_read(&env, 1).await, Ok(0), "{method} allowed");
        typed_client(&env)
            .await
            .expect("typed client, insecure auth allowed");
    }
}
