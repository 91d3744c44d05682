//! The stack supervisor: starts infrastructure, migrations and daemons in dependency order,
//! waits for each to be ready, restarts a daemon that dies on its own (with a back-off and
//! a give-up limit, `crate::restart`), starts and stops the spare shard's cluster when
//! `add-shard`/`remove-shard` ask on the control socket (`crate::channel`), and on
//! Ctrl-C/SIGTERM stops them all in reverse order.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use taskflow_localstack::{KafkaBroker, PgCluster, RedisServer, SmtpSink};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::channel::{Control, Request};
use crate::daemons::{binary, DaemonProcess, DaemonSpec};
use crate::layout::Layout;
use crate::logs;
use crate::restart::{Decision, RestartPolicy, Restarts};
use crate::shards::{self, Shard};
use crate::stored::{self, Fix};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `make dev`: stream logs to the terminal.
    Foreground,
    /// `make up`: logs only to files; `control::up` waits for the ready marker.
    Background,
}

/// Everything the stack runs; dropping it stops all of it (daemons first).
struct Stack {
    daemons: Vec<DaemonProcess>,
    _smtp: Option<SmtpSink>,
    _kafka: Option<KafkaBroker>,
    _redis: Option<RedisServer>,
    /// Every PostgreSQL cluster, by service name (`pg-auth`, `pg-shard-1`, …).
    pg: Vec<(&'static str, PgCluster)>,
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
    let control = match Control::bind(layout) {
        Ok(c) => Some(c),
        Err(e) => {
            say(&format!(
                "{e:#}; add-shard and remove-shard will not reach this stack"
            ));
            None
        }
    };

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

    let signals = Signals {
        term: &mut term,
        int: &mut int,
    };
    let reason = watch(layout, &mut stack, signals, control.as_ref()).await;
    say(&format!("{reason}: stopping the stack"));
    drop(stack);
    cleanup(layout);
    if let Some(t) = log_task {
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.abort();
    }
    let mut still = Vec::new();
    for svc in shards::services(layout) {
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

/// The signals that stop the stack.
struct Signals<'a> {
    term: &'a mut Signal,
    int: &'a mut Signal,
}

impl Signals<'_> {
    /// Waits for either; returns its name.
    async fn recv(&mut self) -> String {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM".to_owned(),
            _ = self.int.recv() => "Ctrl-C".to_owned(),
        }
    }
}

/// Runs until asked to stop, restarting a daemon that dies on its own (see
/// [`crate::restart`]) and serving the control socket; returns why the stack stops.
async fn watch(
    layout: &Layout,
    stack: &mut Stack,
    mut signals: Signals<'_>,
    control: Option<&Control>,
) -> String {
    let mut restarts: Vec<Restarts> = stack
        .daemons
        .iter()
        .map(|_| Restarts::new(RestartPolicy::default()))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let next_request = || async move {
        match control {
            Some(c) => c.next().await,
            None => std::future::pending().await,
        }
    };
    loop {
        tokio::select! {
            reason = signals.recv() => return reason,
            (request, mut reply) = next_request() => {
                let answer = tokio::select! {
                    a = serve(layout, stack, request) => a,
                    reason = signals.recv() => return reason,
                };
                reply.send(answer).await;
                continue;
            }
            _ = tick.tick() => {}
        }
        for (i, policy) in restarts.iter_mut().enumerate() {
            let Some(status) = stack.daemons[i].exited() else {
                continue;
            };
            let spec = stack.daemons[i].spec.clone();
            let restart = tokio::select! {
                r = restart(layout, &spec, format!("exited ({status})"), policy) => r,
                reason = signals.recv() => return reason,
            };
            match restart {
                Ok(d) => stack.daemons[i] = d,
                Err(reason) => return reason,
            }
        }
    }
}

/// One request of the control socket; the answer goes back to `add-shard`/`remove-shard`.
async fn serve(layout: &Layout, stack: &mut Stack, request: Request) -> Result<String, String> {
    let name = match &request {
        Request::Attach(n) | Request::Join(n) | Request::Release(n) => n.clone(),
    };
    let Some(shard) = shards::spare(&name) else {
        return Err(format!("{name} is not a spare shard of this stack"));
    };
    say(&format!("control: {request:?}"));
    let answer = match request {
        Request::Attach(_) => attach(layout, stack, shard).await,
        Request::Join(_) => join(layout, shard),
        Request::Release(_) => release(layout, stack, shard).await,
    };
    answer.map_err(|e| format!("{e:#}"))
}

/// Starts the shard's cluster (database `tasks`, as the other shards get theirs) unless it
/// runs; returns its port. The proxy applies the shard schema itself at `ADD SHARD`.
async fn attach(layout: &Layout, stack: &mut Stack, shard: Shard) -> anyhow::Result<String> {
    let port = layout.port(shard.service);
    if let Some((_, pg)) = stack.pg.iter_mut().find(|(s, _)| *s == shard.service) {
        if pg.is_running() {
            return Ok(port.to_string());
        }
    }
    stack.pg.retain(|(s, _)| *s != shard.service);
    say(&format!(
        "starting PostgreSQL {} on port {port}",
        shard.service
    ));
    let pg = start_cluster(layout, shard.service, "tasks")
        .await
        .with_context(|| {
            format!(
                "starting PostgreSQL {} on port {port} (DEVSTACK_{}_PORT moves it)",
                shard.service,
                shard.service.to_ascii_uppercase().replace('-', "_")
            )
        })?;
    stack.pg.push((shard.service, pg));
    Ok(port.to_string())
}

/// The proxy's ring has the shard now: remember it, and list it in the configurations a
/// restart reads (the proxy's `[[shards]]`, the gateway's `outbox_shards`).
fn join(layout: &Layout, shard: Shard) -> anyhow::Result<String> {
    shards::remember(layout, shard)?;
    write_configs(layout)?;
    Ok(format!(
        "{} is part of the stack now: `make restart` keeps it, `make down` stops it",
        shard.name
    ))
}

/// The shard is out of the ring: forget it, stop its cluster, delete its data (its rows
/// live on the other shards now; a later `add-shard` starts from an empty cluster).
async fn release(layout: &Layout, stack: &mut Stack, shard: Shard) -> anyhow::Result<String> {
    shards::forget(layout, shard)?;
    write_configs(layout)?;
    let mut done = Vec::new();
    if let Some(i) = stack.pg.iter().position(|(s, _)| *s == shard.service) {
        let (_, mut pg) = stack.pg.remove(i);
        say(&format!("stopping PostgreSQL {}", shard.service));
        pg.stop().await?;
        done.push(format!("stopped {}", shard.service));
    }
    let dir = layout.pg_dir(shard.service);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        done.push(format!("deleted {}", dir.display()));
    }
    if done.is_empty() {
        done.push(format!("{} was not running", shard.service));
    }
    Ok(done.join(" and "))
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
    let _ = std::fs::remove_file(layout.control_socket());
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
        pg: Vec::new(),
    };
    start_postgres(layout, &mut stack).await?;
    reconcile(layout, &mut stack).await?;
    start_services(layout, &mut stack).await?;
    let configs = write_configs(layout)?;
    migrate(&configs).await?;
    start_daemons(layout, &configs, &mut stack).await?;
    Ok(stack)
}

/// The auth database and every shard (with those `make add-shard` added), concurrently.
async fn start_postgres(layout: &Layout, stack: &mut Stack) -> anyhow::Result<()> {
    say("starting PostgreSQL clusters");
    let clusters: Vec<(&'static str, &str)> = [("pg-auth", "auth")]
        .into_iter()
        .chain(shards::all(layout).iter().map(|s| (s.service, "tasks")))
        .collect();
    let starts = clusters
        .iter()
        .map(|(service, db)| start_cluster(layout, service, db));
    for ((service, _), started) in clusters
        .iter()
        .zip(futures_util::future::join_all(starts).await)
    {
        let pg = started.with_context(|| format!("starting PostgreSQL {service}"))?;
        stack.pg.push((*service, pg));
    }

    Ok(())
}

/// Makes the added shards agree with the ring the proxy stored, before the proxy's
/// configuration is written from them (`crate::stored`).
async fn reconcile(layout: &Layout, stack: &mut Stack) -> anyhow::Result<()> {
    let Some((_, auth)) = stack.pg.iter().find(|(s, _)| *s == "pg-auth") else {
        return Ok(());
    };
    let Ok(client) = auth.client("auth").await else {
        return Ok(());
    };
    let Some(ring) = stored::ring(&client).await else {
        return Ok(());
    };
    for fix in stored::fixes(&ring, &shards::SPARE, &shards::added(layout)) {
        match fix {
            Fix::Forget(shard) => {
                say(&format!(
                    "{} is not in the proxy's stored ring (its removal finished unwatched)",
                    shard.name
                ));
                say(&release(layout, stack, shard).await?);
            }
            Fix::Remember(shard) if layout.pg_dir(shard.service).exists() => {
                say(&format!(
                    "{} is in the proxy's stored ring: starting it",
                    shard.name
                ));
                attach(layout, stack, shard).await?;
                shards::remember(layout, shard)?;
            }
            Fix::Remember(shard) => say(&format!(
                "{} is in the proxy's stored ring, but {} is gone; the proxy will not start \
                 without it (`make db-reset` starts over)",
                shard.name,
                layout.pg_dir(shard.service).display()
            )),
        }
    }
    Ok(())
}

/// One cluster of the stack: its port, data directory and log by service name.
async fn start_cluster(
    layout: &Layout,
    service: &str,
    database: &str,
) -> taskflow_localstack::Result<PgCluster> {
    PgCluster::builder()
        .port(layout.port(service))
        .data_dir(layout.pg_dir(service))
        .log_file(layout.log(service))
        .database(database)
        .startup_timeout(Duration::from_secs(60))
        .start()
        .await
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
    let mut shard_tables = String::new();
    for shard in shards::all(layout) {
        shard_tables.push_str(&format!(
            "\n[[shards]]\nname = \"{}\"\nurl = \"postgres://taskflow@127.0.0.1:{}/tasks\"\n",
            shard.name,
            p(shard.service)
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
{shard_tables}"#,
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
        outbox_shards = shards::all(layout)
            .iter()
            .map(|s| format!("\"{}\"", s.name))
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
