//! `make add-shard` and `make remove-shard`: grow the running stack by the spare shard
//! (`shard-4`, its own PostgreSQL cluster on 5437) or shrink it again, and watch the
//! proxy move the rows.
//!
//! The work is split the way ownership is: the supervisor starts, remembers and stops
//! the cluster (`crate::channel`), the proxy changes its ring and moves the rows (`ADD
//! SHARD` / `REMOVE SHARD` in its admin console), and this command only asks both and
//! draws the proxy's `SHOW MIGRATIONS` as a progress line (`crate::progress`).
//!
//! Order matters for what survives a restart: the supervisor remembers shard-4 as soon as
//! the proxy's ring has it (so a restarted proxy reads a file that agrees with its stored
//! ring), and forgets it — stopping and deleting its cluster — only once the proxy's
//! ring no longer has it and the move off it is done.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::channel::{self, Request};
use crate::control;
use crate::layout::Layout;
use crate::progress::{self, Migration, State};
use crate::shards::{self, Shard};

/// The operators' login of the local stack's proxy (see `supervisor::proxy_config`).
const ADMIN_USER: &str = "taskflow_admin";
const ADMIN_PASSWORD: &str = "taskflow";
/// How often `SHOW MIGRATIONS` is asked.
const POLL: Duration = Duration::from_millis(500);
/// Without a terminal: one line this often instead of redrawing one.
const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// How long an accepted change may go unlisted, and the console unreachable.
const PATIENCE: Duration = Duration::from_secs(60);

/// `make add-shard`.
pub async fn add(layout: &Layout) -> anyhow::Result<()> {
    let shard = spare()?;
    let port = attach(layout, shard).await?;
    let mut console = Console::connect(layout).await?;
    let before = finish_unfinished(&mut console, shard).await?;
    if console.has(shard.name).await? {
        join(layout, shard).await?;
        println!(
            "{} is in the proxy's ring; no migration of it is under way",
            shard.name
        );
        return Ok(());
    }
    let sql = format!(
        "ADD SHARD {} 'postgres://taskflow@127.0.0.1:{port}/tasks'",
        shard.name
    );
    println!("{sql}");
    if let Err(e) = console.client.simple_query(&sql).await {
        // Stop the cluster again unless the proxy uses it after all.
        let unused = !console.has(shard.name).await.unwrap_or(true)
            && matches!(console.migrations().await, Ok(l) if unfinished(&l, shard).is_none());
        if unused {
            let released = channel::ask(layout, &Request::Release(shard.name.into())).await;
            println!("{}", released.unwrap_or_else(|e| format!("{e:#}")));
        }
        bail!("the proxy refused `{sql}`: {}", server_says(&e));
    }
    join(layout, shard).await?;
    settle(&mut console, shard, &before, true).await
}

/// `make remove-shard`.
pub async fn remove(layout: &Layout) -> anyhow::Result<()> {
    let shard = spare()?;
    require_running(layout)?;
    let mut console = Console::connect(layout).await?;
    let before = finish_unfinished(&mut console, shard).await?;
    if console.has(shard.name).await? {
        let sql = format!("REMOVE SHARD {}", shard.name);
        println!("{sql}");
        if let Err(e) = console.client.simple_query(&sql).await {
            bail!("the proxy refused `{sql}`: {}", server_says(&e));
        }
        settle(&mut console, shard, &before, false).await?;
    }
    if !console.settled(shard.name, false).await? {
        bail!(
            "the proxy's ring still has {}; its cluster keeps running (run `make remove-shard` again)",
            shard.name
        );
    }
    let released = channel::ask(layout, &Request::Release(shard.name.into())).await?;
    println!("{} is out of the ring; {released}", shard.name);
    Ok(())
}

/// A migration of `shard` still under way (an earlier run stopped watching with Ctrl-C,
/// or another operator started it): followed to its end first, so what comes next sees
/// the ring it leaves. Returns `SHOW MIGRATIONS` as it is then.
async fn finish_unfinished(console: &mut Console, shard: Shard) -> anyhow::Result<Listing> {
    let before = console.migrations().await?;
    let Some(m) = unfinished(&before, shard) else {
        return Ok(before);
    };
    println!(
        "a migration of {} is under way; following it first",
        shard.name
    );
    let joins = m.adds(shard.name);
    follow(console, shard, &BTreeSet::new()).await?;
    if let Some(joins) = joins {
        // The proxy routes by the finished ring within a few seconds.
        console.settled(shard.name, joins).await?;
    }
    console.migrations().await
}

fn spare() -> anyhow::Result<Shard> {
    shards::SPARE
        .first()
        .copied()
        .context("the stack has no spare shard")
}

fn require_running(layout: &Layout) -> anyhow::Result<()> {
    if control::running_pid(layout).is_none() {
        bail!(
            "no stack is running on {}; `make up` first",
            layout.root.display()
        );
    }
    Ok(())
}

/// Has the supervisor start the shard's cluster; returns the port it listens on.
async fn attach(layout: &Layout, shard: Shard) -> anyhow::Result<u16> {
    require_running(layout)?;
    println!("starting {} for {}", shard.service, shard.name);
    let answer = channel::ask(layout, &Request::Attach(shard.name.into())).await?;
    let port = answer
        .parse()
        .with_context(|| format!("the supervisor answered {answer:?}, not a port"))?;
    println!(
        "{} runs on 127.0.0.1:{port} (data in {})",
        shard.service,
        layout.pg_dir(shard.service).display()
    );
    Ok(port)
}

async fn join(layout: &Layout, shard: Shard) -> anyhow::Result<()> {
    let answer = channel::ask(layout, &Request::Join(shard.name.into())).await?;
    println!("{answer}");
    Ok(())
}

/// After an accepted ring change (`joins`: the shard comes in): follow the migration it
/// started, or say that none was needed — a proxy changes the ring at once while no
/// shard holds rows, and one without online migration only then.
async fn settle(
    console: &mut Console,
    shard: Shard,
    before: &Listing,
    joins: bool,
) -> anyhow::Result<()> {
    let verb = if joins { "joined" } else { "left" };
    let rows = match before {
        Listing::Rows(rows) => rows,
        Listing::Unsupported(why) => {
            println!(
                "{} {verb} the ring at once: this proxy has no online migration (SHOW \
                 MIGRATIONS: {why}); it changes the ring only while no shard holds rows",
                shard.name
            );
            return Ok(());
        }
    };
    let skip = epochs(rows);
    // The proxy records a migration before it answers the change, so one not listed now
    // was not needed — if the ring shows the change already.
    let started = match console.migrations().await? {
        Listing::Rows(now) => now
            .iter()
            .any(|m| m.concerns(shard.name) && !skip.contains(&m.epoch)),
        Listing::Unsupported(_) => false,
    };
    if !started && console.has(shard.name).await? == joins {
        println!(
            "{} {verb} the ring at once: no shard held rows, so nothing had to move",
            shard.name
        );
        return Ok(());
    }
    follow(console, shard, &skip).await
}

/// What `SHOW MIGRATIONS` said: its rows, newest first, or why the proxy has none.
enum Listing {
    Rows(Vec<Migration>),
    /// The proxy answered `feature_not_supported` (no online migration); its message.
    Unsupported(String),
}

/// The newest migration concerning `shard`, if it is not finished.
fn unfinished(listing: &Listing, shard: Shard) -> Option<&Migration> {
    match listing {
        Listing::Rows(rows) => rows
            .iter()
            .find(|m| m.concerns(shard.name))
            .filter(|m| !m.state.finished()),
        Listing::Unsupported(_) => None,
    }
}

fn epochs(rows: &[Migration]) -> BTreeSet<String> {
    rows.iter().map(|m| m.epoch.clone()).collect()
}

/// The proxy's own words for an error.
fn server_says(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The proxy's admin console.
struct Console {
    port: u16,
    client: Client,
    /// Ctrl-C, taken over from the default (exit at once) for as long as the console is
    /// open: between a ring change and the supervisor remembering it the command must
    /// not die (`make restart` would then write the old shard list), and while watching
    /// it ends the progress line and says the move goes on.
    interrupt: Signal,
}

impl Console {
    async fn connect(layout: &Layout) -> anyhow::Result<Self> {
        let port = layout.port("shard-proxy");
        let client = Self::open(port).await.with_context(|| {
            format!("cannot open the proxy's admin console on 127.0.0.1:{port}")
        })?;
        let interrupt = signal(SignalKind::interrupt()).context("catching Ctrl-C")?;
        Ok(Console {
            port,
            client,
            interrupt,
        })
    }

    /// Waits `POLL`; `Err` on Ctrl-C.
    async fn pause(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            () = tokio::time::sleep(POLL) => Ok(()),
            _ = self.interrupt.recv() => bail!(
                "stopped watching; the migration goes on in the proxy (the same make command \
                 shows it again)"
            ),
        }
    }

    async fn open(port: u16) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user(ADMIN_USER)
            .password(ADMIN_PASSWORD)
            .dbname("admin")
            .application_name("taskflow-devstack")
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Rows of a statement as (column name, value) pairs.
    async fn rows(
        &self,
        sql: &str,
    ) -> Result<Vec<Vec<(String, Option<String>)>>, tokio_postgres::Error> {
        let messages = self.client.simple_query(sql).await?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .map(|row| {
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let value = row.try_get(i).ok().flatten().map(str::to_owned);
                        (c.name().to_owned(), value)
                    })
                    .collect()
            })
            .collect())
    }

    /// Whether `SHOW SHARDS` lists `shard`.
    async fn has(&self, shard: &str) -> anyhow::Result<bool> {
        let rows = self
            .rows("SHOW SHARDS")
            .await
            .map_err(|e| anyhow::anyhow!("SHOW SHARDS failed: {}", server_says(&e)))?;
        Ok(rows.iter().any(|row| {
            row.iter()
                .any(|(n, v)| n == "name" && v.as_deref() == Some(shard))
        }))
    }

    /// Whether the ring has (`present`) or lacks the shard, waiting up to 15 s for the
    /// proxy to route by a finished migration's ring (it looks every few seconds).
    async fn settled(&self, shard: &str, present: bool) -> anyhow::Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.has(shard).await? == present {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn migrations(&self) -> anyhow::Result<Listing> {
        match self.rows("SHOW MIGRATIONS").await {
            Ok(rows) => rows
                .iter()
                .map(|row| Migration::from_columns(row))
                .collect::<Result<Vec<_>, _>>()
                .map(Listing::Rows)
                .map_err(anyhow::Error::msg),
            Err(e) if e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED) => {
                Ok(Listing::Unsupported(server_says(&e)))
            }
            Err(e) => bail!("SHOW MIGRATIONS failed: {}", server_says(&e)),
        }
    }

    /// A new connection after the old one broke (the proxy restarted, say).
    async fn reconnect(&mut self) {
        if self.client.is_closed() {
            if let Ok(client) = Self::open(self.port).await {
                self.client = client;
            }
        }
    }
}

/// Draws the migration of `shard` that is not one of `skip` (the epochs listed before the
/// change was asked for) until it is done (Ok) or failed (the proxy's error).
async fn follow(
    console: &mut Console,
    shard: Shard,
    skip: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let mut view = View::new();
    let mut announced = false;
    let mut trouble: Option<Instant> = None;
    let unlisted_since = Instant::now();
    loop {
        match console.migrations().await {
            Err(e) => {
                let since = *trouble.get_or_insert_with(Instant::now);
                if since.elapsed() > PATIENCE {
                    view.end();
                    return Err(e.context("the proxy stopped answering for 60 s"));
                }
                view.show(&format!("{} {e:#}; retrying", shard.name));
                console.reconnect().await;
            }
            Ok(Listing::Unsupported(why)) => {
                view.end();
                bail!("SHOW MIGRATIONS failed: {why}");
            }
            Ok(Listing::Rows(rows)) => {
                trouble = None;
                let newest = rows
                    .into_iter()
                    .find(|m| m.concerns(shard.name) && !skip.contains(&m.epoch));
                let Some(m) = newest else {
                    if unlisted_since.elapsed() > PATIENCE {
                        view.end();
                        bail!("the proxy accepted the change, but SHOW MIGRATIONS has listed no migration of {} for 60 s", shard.name);
                    }
                    view.show(&format!(
                        "{} waiting for the proxy to list the migration",
                        shard.name
                    ));
                    tokio::time::sleep(POLL).await;
                    continue;
                };
                if !announced {
                    view.above(&format!(
                        "migration {}: {} (Ctrl-C stops watching, not the move)",
                        m.epoch, m.change
                    ));
                    announced = true;
                }
                let text = progress::line(shard.name, &m);
                match m.state {
                    State::Done => {
                        view.finish(&text);
                        return Ok(());
                    }
                    State::Failed => {
                        view.finish(&text);
                        let why = m.error.as_deref().unwrap_or("the proxy gave no reason");
                        bail!("migration {} ({}) failed: {why}", m.epoch, m.change);
                    }
                    _ => view.show(&text),
                }
            }
        }
        pause(console, &mut view).await?;
    }
}

/// Waits before the next poll; on Ctrl-C ends the line drawn and returns why.
async fn pause(console: &mut Console, view: &mut View) -> anyhow::Result<()> {
    let paused = console.pause().await;
    if paused.is_err() {
        view.end();
    }
    paused
}

/// The progress line on stdout: redrawn in place on a terminal (carriage return, no
/// newline until done), else one line every `PLAIN_EVERY` so a log stays readable.
struct View {
    tty: bool,
    /// Characters of the line drawn last (a shorter one is padded over it).
    drawn: usize,
    printed_at: Option<Instant>,
}

impl View {
    fn new() -> Self {
        View {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            printed_at: None,
        }
    }

    fn show(&mut self, text: &str) {
        if self.tty {
            self.draw(text);
        } else if self.printed_at.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            println!("{text}");
            self.printed_at = Some(Instant::now());
        }
    }

    fn draw(&mut self, text: &str) {
        let len = text.chars().count();
        let pad = " ".repeat(self.drawn.saturating_sub(len));
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r{text}{pad}");
        let _ = out.flush();
        self.drawn = len;
    }

    /// A line of its own above the progress line.
    fn above(&mut self, text: &str) {
        self.end();
        println!("{text}");
    }

    /// The last state, then a newline.
    fn finish(&mut self, text: &str) {
        if self.tty {
            self.draw(text);
            println!();
            self.drawn = 0;
        } else {
            println!("{text}");
        }
    }

    /// Ends a line drawn in place, so what follows starts on its own.
    fn end(&mut self) {
        if self.tty && self.drawn > 0 {
            println!();
            self.drawn = 0;
        }
    }
}
