//! The stack supervisor: starts infrastructure, migrations and daemons in dependency order,
//! waits for each to be ready, restarts a daemon that dies on its own (with a back-off and
//! a give-up limit, `crate::restart`), and on Ctrl-C/SIGTERM stops them all in reverse
//! order.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use taskflow_localstack::{KafkaBroker, PgCluster, RedisServer, SmtpSink};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::daemons::{binary, DaemonProcess, DaemonSpec};
use crate::layout::Layout;
use crate::logs;
use crate::restart::{Decision, RestartPolicy, Restarts};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `make dev`: stream logs to the terminal.
    Foreground,
    /// `make up`: logs only to files; `control::up` waits for the ready marker.
    Background,
}

/// The shards of the local stack: name, PostgreSQL service name.
const SHARDS: [(&str, &str); 3] = [
    ("shard-1", "pg-shard-1"),
    ("shard-2", "pg-shard-2"),
    ("shard-3", "pg-shard-3"),
];

/// Everything the stack runs; dropping it stops all of it (daemons first).
struct Stack {
    daemons: Vec<DaemonProcess>,
    _smtp: Option<SmtpSink>,
    _kafka: Option<KafkaBroker>,
    _redis: Option<RedisServer>,
    _pg: Vec<PgCluster>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        while let Some(mut d) = self.daemons.pop() {
            say(&format!("stopping {}", d.name));
            d.stop();
        }
        say("stopping infrastructure");
    }
}

fn say(msg: &str) {
    println!("devstack | {msg}");
}

/// Takes the stack lock or explains who holds it.
pub fn lock(layout: &Layout) -> anyhow::Result<Flock<std::fs::File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(layout.lock_file())
        .with_context(|| format!("opening {}", layout.lock_file().display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, _)) => {
            let pid = std::fs::read_to_string(layout.pid_file()).unwrap_or_default();
            bail!(
                "another stack is running on {} (pid {}); `make down` first",
                layout.root.display(),
                pid.trim()
            )
        }
    }
}

pub async fn run(layout: &Layout, mode: Mode) -> anyhow::Result<()> {
    layout
        .ensure_dirs()
        .with_context(|| format!("creating {}", layout.root.display()))?;
    let _lock = lock(layout)?;
    std::fs::write(layout.pid_file(), format!("{}\n", std::process::id()))?;
    let _ = std::fs::remove_file(layout.ready_file());

    let log_task = (mode == Mode::Foreground).then(|| {
        let layout = layout.clone();
        tokio::spawn(async move { logs::stream(&layout, true, true).await })
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let outcome = tokio::select! {
        r = start(layout) => r,
        _ = term.recv() => Err(anyhow::anyhow!("interrupted during start-up")),
        _ = int.recv() => Err(anyhow::anyhow!("interrupted during start-up")),
    };
    let mut stack = match outcome {
        Ok(stack) => stack,
        Err(e) => {
            cleanup(layout);
            return Err(e);
        }
    };
    std::fs::write(layout.ready_file(), "ready\n")?;
    print_tour(layout);

    let reason = watch(layout, &mut stack, &mut term, &mut int).await;
    say(&format!("{reason}: stopping the stack"));
    drop(stack);
    cleanup(layout);
    if let Some(t) = log_task {
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.abort();
    }
    let mut still = Vec::new();
    for svc in crate::layout::SERVICES {
        if crate::layout::answers(layout.port(svc.name)).await {
            still.push(format!("{} (port {})", svc.name, layout.port(svc.name)));
        }
    }
    if still.is_empty() {
        say("stopped; nothing answers on the stack's ports any more");
        Ok(())
    } else {
        bail!("stopped, but still answering: {}", still.join(", "))
    }
}

/// Runs until asked to stop, restarting a daemon that dies on its own (see
/// [`crate::restart`]); returns why the stack stops.
async fn watch(layout: &Layout, stack: &mut Stack, term: &mut Signal, int: &mut Signal) -> String {
    let mut restarts: Vec<Restarts> = stack
        .daemons
        .iter()
        .map(|_| Restarts::new(RestartPolicy::default()))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM".to_owned(),
            _ = int.recv() => return "Ctrl-C".to_owned(),
            _ = tick.tick() => {}
        }
        for (i, policy) in restarts.iter_mut().enumerate() {
            let Some(status) = stack.daemons[i].exited() else {
                continue;
            };
            let spec = stack.daemons[i].spec.clone();
            let restart = tokio::select! {
                r = restart(layout, &spec, format!("exited ({status})"), policy) => r,
                _ = term.recv() => return "SIGTERM".to_owned(),
                _ = int.recv() => return "Ctrl-C".to_owned(),
            };
            match restart {
                Ok(d) => stack.daemons[i] = d,
                Err(reason) => return reason,
            }
        }
    }
}

/// Starts `spec` again after the policy's back-off, until it is READY or the policy gives
/// up (each failed start counts as another exit); the error is why the stack stops.
async fn restart(
    layout: &Layout,
    spec: &DaemonSpec,
    mut why: String,
    policy: &mut Restarts,
) -> Result<DaemonProcess, String> {
    loop {
        let delay = match policy.on_exit(std::time::Instant::now()) {
            Decision::RestartAfter { delay, attempt } => {
                say(&format!(
                    "{} {why}; restarting in {} s (restart {attempt} in a row)",
                    spec.name,
                    delay.as_secs_f32()
                ));
                delay
            }
            Decision::GiveUp { restarts } => {
                return Err(format!(
                    "{} {why} after {restarts} restarts; giving up",
                    spec.name
                ))
            }
        };
        let _ = std::fs::write(
            layout.status_dir().join(spec.name),
            format!("restarting in {} s: {why}\n", delay.as_secs()),
        );
        tokio::time::sleep(delay).await;
        match DaemonProcess::start(layout, spec, Duration::from_secs(90)).await {
            Ok(d) => {
                say(&format!("{} is ready again (pid {})", spec.name, d.pid()));
                return Ok(d);
            }
            Err(e) => {
                why = format!("failed to start again: {e:#}");
            }
        }
    }
}

fn cleanup(layout: &Layout) {
    let _ = std::fs::remove_file(layout.ready_file());
    let _ = std::fs::remove_file(layout.pid_file());
    let _ = std::fs::remove_dir_all(layout.status_dir());
}

async fn start(layout: &Layout) -> anyhow::Result<Stack> {
    let mut stack = Stack {
        daemons: Vec::new(),
        _smtp: None,
        _kafka: None,
        _redis: None,
        _pg: Vec::new(),
    };
    start_postgres(layout, &mut stack).await?;
    start_services(layout, &mut stack).await?;
    let configs = write_configs(layout)?;
    migrate(&configs).await?;
    start_daemons(layout, &configs, &mut stack).await?;
    Ok(stack)
}

/// The auth database and every shard, concurrently.
async fn start_postgres(layout: &Layout, stack: &mut Stack) -> anyhow::Result<()> {
    say("starting PostgreSQL clusters");
    let mut pg_starts = Vec::new();
    for (service, db) in [("pg-auth", "auth")]
        .into_iter()
        .chain(SHARDS.iter().map(|(_, svc)| (*svc, "tasks")))
    {
        pg_starts.push(
            PgCluster::builder()
                .port(layout.port(service))
                .data_dir(layout.pg_dir(service))
                .log_file(layout.log(service))
                .database(db)
                .startup_timeout(Duration::from_secs(60))
                .start(),
        );
    }
    for (i, started) in futures_util::future::join_all(pg_starts)
        .await
        .into_iter()
        .enumerate()
    {
        stack
            ._pg
            .push(started.with_context(|| format!("starting PostgreSQL cluster {i}"))?);
    }

    Ok(())
}

/// Redis, the Kafka-API broker (with the topics) and the SMTP sink.
async fn start_services(layout: &Layout, stack: &mut Stack) -> anyhow::Result<()> {
    say("starting Redis, the Kafka-API broker and the SMTP sink");
    stack._redis = Some(
        RedisServer::builder()
            .port(layout.port("redis"))
            .data_dir(layout.redis_dir())
            .appendonly(true)
            .log_file(layout.log("redis"))
            .start()
            .await
            .context("starting redis-server")?,
    );
    let mut kafka = KafkaBroker::builder()
        .port(layout.port("kafka"))
        .log_file(layout.log("kafka"))
        .start()
        .await
        .context("starting the broker (tansu)")?;
    for topic in ["task_events", "notify_events"] {
        kafka
            .create_topic(topic, 3)
            .await
            .with_context(|| format!("creating topic {topic}"))?;
    }
    stack._kafka = Some(kafka);
    stack._smtp = Some(
        SmtpSink::builder()
            .smtp_port(layout.port("smtp"))
            .web_port(layout.port("smtp-ui"))
            .mail_dir(layout.mail_dir())
            .log_file(layout.log("smtp"))
            .start()
            .await
            .context("starting the SMTP sink (maildev or mailpit)")?,
    );

    Ok(())
}

/// `taskflow-shard-proxy migrate`: the schema on the auth DB and every shard.
async fn migrate(configs: &Configs) -> anyhow::Result<()> {
    say("applying migrations to the auth DB and every shard");
    let status = tokio::process::Command::new(binary("taskflow-shard-proxy")?)
        .arg("--config")
        .arg(&configs.proxy)
        .arg("migrate")
        .status()
        .await
        .context("running taskflow-shard-proxy migrate")?;
    if !status.success() {
        bail!("migrations failed ({status})");
    }

    Ok(())
}

/// The four daemons in dependency order, each awaited until it reports READY=1.
async fn start_daemons(
    layout: &Layout,
    configs: &Configs,
    stack: &mut Stack,
) -> anyhow::Result<()> {
    let ready_timeout = Duration::from_secs(90);
    for (name, binary, config) in [
        ("shard-proxy", "taskflow-shard-proxy", &configs.proxy),
        ("auth", "taskflow-auth", &configs.auth),
        ("gateway", "taskflow-gateway", &configs.gateway),
        ("notify", "taskflow-notify", &configs.notify),
    ] {
        let spec = DaemonSpec {
            name,
            binary,
            config: config.clone(),
        };
        say(&format!("starting {binary}; waiting for READY=1"));
        let d = DaemonProcess::start(layout, &spec, ready_timeout).await?;
        say(&format!("{binary} is ready (pid {})", d.pid()));
        stack.daemons.push(d);
    }
    Ok(())
}

struct Configs {
    proxy: PathBuf,
    auth: PathBuf,
    gateway: PathBuf,
    notify: PathBuf,
}

/// Dev-only secrets (role `taskflow`, password `taskflow`, as SPEC §8 documents) and a
/// JWT key pair generated once per state directory.
fn write_secrets(layout: &Layout) -> anyhow::Result<()> {
    let dir = layout.secrets();
    for name in ["proxy-password", "backend-password", "database-password"] {
        let p = dir.join(name);
        if !p.exists() {
            std::fs::write(&p, "taskflow\n")?;
        }
    }
    let private = dir.join("jwt-private.pem");
    let public = dir.join("jwt-public.pem");
    if !private.exists() || !public.exists() {
        run_openssl(&["genpkey", "-algorithm", "ed25519", "-out"], &private)?;
        let status = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .context("running openssl")?;
        if !status.success() {
            bail!("openssl pkey -pubout failed ({status})");
        }
    }
    Ok(())
}

fn run_openssl(args: &[&str], out: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("openssl")
        .args(args)
        .arg(out)
        .status()
        .context("running openssl (apt-get install openssl)")?;
    if !status.success() {
        bail!("openssl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn write_configs(layout: &Layout) -> anyhow::Result<Configs> {
    write_secrets(layout)?;
    let dir = layout.config_dir();
    let configs = Configs {
        proxy: dir.join("shard-proxy.toml"),
        auth: dir.join("auth.toml"),
        gateway: dir.join("gateway.toml"),
        notify: dir.join("notify.toml"),
    };
    std::fs::write(&configs.proxy, proxy_config(layout))?;
    std::fs::write(&configs.auth, auth_config(layout))?;
    std::fs::write(&configs.gateway, gateway_config(layout))?;
    std::fs::write(&configs.notify, notify_config(layout))?;
    Ok(configs)
}

/// The shard proxy: the daemons' login and the operators' (`taskflow_admin`), every shard.
fn proxy_config(layout: &Layout) -> String {
    let s = |name: &str| layout.secrets().join(name).display().to_string();
    let p = |name: &str| layout.port(name);
    let mut shards = String::new();
    for (name, service) in SHARDS {
        shards.push_str(&format!(
            "\n[[shards]]\nname = \"{name}\"\nurl = \"postgres://taskflow@127.0.0.1:{}/tasks\"\n",
            p(service)
        ));
    }
    let proxy = format!(
        r#"# Generated by taskflow-devstack; edit the generator, not this file.
listen = "127.0.0.1:{proxy}"
metrics_listen = "127.0.0.1:{metrics}"
state_dir = "{state}"
users = [
    {{ name = "taskflow", password_file = "{proxy_pw}", databases = ["tasks", "auth"] }},
    {{ name = "taskflow_admin", password_file = "{proxy_pw}", admin = true, databases = ["admin"] }},
]

[backend]
user = "taskflow"
password_file = "{backend_pw}"

[auth_database]
url = "postgres://taskflow@127.0.0.1:{auth_db}/auth"
{shards}"#,
        proxy = p("shard-proxy"),
        metrics = p("proxy-metrics"),
        state = layout.root.join("proxy").display(),
        proxy_pw = s("proxy-password"),
        backend_pw = s("backend-password"),
        auth_db = p("pg-auth"),
    );
    proxy
}

/// The auth daemon, through the proxy's `auth` database.
fn auth_config(layout: &Layout) -> String {
    let s = |name: &str| layout.secrets().join(name).display().to_string();
    let p = |name: &str| layout.port(name);
    let auth = format!(
        r#"# Generated by taskflow-devstack.
listen = "127.0.0.1:{auth}"
ops_listen = "127.0.0.1:{auth_ops}"
database_url = "postgres://taskflow@127.0.0.1:{proxy}/auth"
database_password_file = "{db_pw}"
jwt_private_key_file = "{jwt}"
bcrypt_cost = 10
"#,
        auth = p("auth"),
        auth_ops = p("auth-ops"),
        proxy = p("shard-proxy"),
        db_pw = s("database-password"),
        jwt = s("jwt-private.pem"),
    );
    auth
}

/// The gateway, through the proxy's `tasks` database.
fn gateway_config(layout: &Layout) -> String {
    let s = |name: &str| layout.secrets().join(name).display().to_string();
    let p = |name: &str| layout.port(name);
    let gateway = format!(
        r#"# Generated by taskflow-devstack.
listen = "127.0.0.1:{gw}"
ops_listen = "127.0.0.1:{gw_ops}"
auth_url = "http://127.0.0.1:{auth}"
jwt_public_key_file = "{jwt}"
database_url = "postgres://taskflow@127.0.0.1:{proxy}/tasks"
database_password_file = "{db_pw}"
redis_url = "redis://127.0.0.1:{redis}"
kafka_brokers = "127.0.0.1:{kafka}"
outbox_shards = [{outbox_shards}]
"#,
        outbox_shards = SHARDS
            .iter()
            .map(|(name, _)| format!("\"{name}\""))
            .collect::<Vec<_>>()
            .join(", "),
        gw = p("gateway"),
        gw_ops = p("gateway-ops"),
        auth = p("auth"),
        jwt = s("jwt-public.pem"),
        proxy = p("shard-proxy"),
        db_pw = s("database-password"),
        redis = p("redis"),
        kafka = p("kafka"),
    );
    gateway
}

/// The notify daemon.
fn notify_config(layout: &Layout) -> String {
    let s = |name: &str| layout.secrets().join(name).display().to_string();
    let p = |name: &str| layout.port(name);
    let notify = format!(
        r#"# Generated by taskflow-devstack.
metrics_listen = "127.0.0.1:{metrics}"
database_url = "postgres://taskflow@127.0.0.1:{proxy}/auth"
database_password_file = "{db_pw}"
kafka_brokers = "127.0.0.1:{kafka}"
redis_url = "redis://127.0.0.1:{redis}"

[smtp]
host = "127.0.0.1"
port = {smtp}
"#,
        metrics = p("notify-metrics"),
        proxy = p("shard-proxy"),
        db_pw = s("database-password"),
        kafka = p("kafka"),
        redis = p("redis"),
        smtp = p("smtp"),
    );
    notify
}

fn print_tour(layout: &Layout) {
    let p = |name: &str| layout.port(name);
    println!(
        r#"
TaskFlow is up. (Dev-only credentials: role taskflow / password taskflow.)

  REST API        http://127.0.0.1:{gw}/            Swagger  http://127.0.0.1:{gw}/swagger/index.html
  Auth daemon     http://127.0.0.1:{auth}/
  Shard proxy     psql "postgres://taskflow:taskflow@127.0.0.1:{proxy}/tasks"   (also /auth; /admin as taskflow_admin)
  Proxy metrics   http://127.0.0.1:{pm}/metrics
  Gateway metrics http://127.0.0.1:{gw_ops}/metrics
  Mail (web UI)   http://127.0.0.1:{ui}/

A short tour:
  curl -s -XPOST localhost:{gw}/auth/register -H 'content-type: application/json' \
       -d '{{"email":"user@example.com","name":"John Doe","password":"securepassword"}}'
  TOKEN=$(curl -s -XPOST localhost:{gw}/auth/login -H 'content-type: application/json' \
       -d '{{"email":"user@example.com","password":"securepassword"}}' | sed 's/.*"token":"\([^"]*\)".*/\1/')
  curl -s localhost:{gw}/tasks -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
       -d '{{"title":"Complete project","performer_id":1}}'
  PGPASSWORD=taskflow psql -h 127.0.0.1 -p {proxy} -U taskflow_admin -d admin -c 'SHOW SHARDS'

State: {state}   Logs: make logs   Stop: Ctrl-C (dev) or make down (up)
"#,
        gw = p("gateway"),
        gw_ops = p("gateway-ops"),
        auth = p("auth"),
        proxy = p("shard-proxy"),
        pm = p("proxy-metrics"),
        ui = p("smtp-ui"),
        state = layout.root.display(),
    );
}
