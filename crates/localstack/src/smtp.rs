//! A real SMTP sink whose REST API lets tests read what was delivered: MailDev (from npm,
//! what `scripts/install-deps.sh` installs) or Mailpit (what nixpkgs packages; MailDev is not
//! in nixpkgs), whichever is installed — see [`sink_binary`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use serde::Deserialize;

use crate::error::{Error, IoContext, Result};
use crate::process::{ManagedChild, StopPolicy};
use crate::util::{
    cache_dir, free_port, is_executable, reserve_port, tcp_connectable, which, LOCALHOST,
    POLL_INTERVAL,
};

/// Version of MailDev that `scripts/install-deps.sh` installs.
pub const MAILDEV_VERSION: &str = "3.0.0";

const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds `maildev`: `$TASKFLOW_MAILDEV_BIN`, else
/// `${TASKFLOW_CACHE:-/var/cache/taskflow}/maildev-3.0.0/node_modules/.bin/maildev`, else `$PATH`.
pub fn maildev_binary() -> Result<PathBuf> {
    find_maildev().ok_or_else(|| {
        Error::BinaryNotFound(format!(
            "the SMTP sink `maildev` was not found (looked at $TASKFLOW_MAILDEV_BIN, {}, $PATH): \
             run scripts/install-deps.sh",
            maildev_cached().display()
        ))
    })
}

fn maildev_cached() -> PathBuf {
    cache_dir()
        .join(format!("maildev-{MAILDEV_VERSION}"))
        .join("node_modules/.bin/maildev")
}

fn find_maildev() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TASKFLOW_MAILDEV_BIN") {
        return Some(PathBuf::from(p));
    }
    let cached = maildev_cached();
    if is_executable(&cached) {
        return Some(cached);
    }
    which("maildev")
}

/// Finds `mailpit`: `$TASKFLOW_MAILPIT_BIN`, else `$PATH`.
pub fn mailpit_binary() -> Result<PathBuf> {
    find_mailpit().ok_or_else(|| {
        Error::BinaryNotFound(
            "the SMTP sink `mailpit` was not found (looked at $TASKFLOW_MAILPIT_BIN, $PATH)".into(),
        )
    })
}

fn find_mailpit() -> Option<PathBuf> {
    match std::env::var_os("TASKFLOW_MAILPIT_BIN") {
        Some(p) => Some(PathBuf::from(p)),
        None => which("mailpit"),
    }
}

/// Which program serves as the SMTP sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// MailDev (npm): `--smtp`/`--web` ports, REST API under `/api/email`.
    MailDev,
    /// Mailpit (nixpkgs): `--smtp`/`--listen` addresses, REST API under `/api/v1`.
    Mailpit,
}

impl SinkKind {
    /// The program's name.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::MailDev => "maildev",
            SinkKind::Mailpit => "mailpit",
        }
    }
}

/// Chooses the sink from what is installed: `$TASKFLOW_SMTP_SINK` (`maildev` or `mailpit`)
/// insists on one; otherwise MailDev when [`maildev_binary`] finds it, else Mailpit when
/// [`mailpit_binary`] does. `maildev` and `mailpit` are the two candidates' locations.
pub fn choose_sink(
    forced: Option<&str>,
    maildev: Option<PathBuf>,
    mailpit: Option<PathBuf>,
) -> Result<(SinkKind, PathBuf)> {
    match forced.map(str::trim).filter(|f| !f.is_empty()) {
        Some("maildev") => maildev.map(|p| (SinkKind::MailDev, p)).ok_or_else(|| {
            Error::BinaryNotFound(
                "TASKFLOW_SMTP_SINK=maildev, but maildev was not found \
                 ($TASKFLOW_MAILDEV_BIN, the cache, $PATH): run scripts/install-deps.sh"
                    .into(),
            )
        }),
        Some("mailpit") => mailpit.map(|p| (SinkKind::Mailpit, p)).ok_or_else(|| {
            Error::BinaryNotFound(
                "TASKFLOW_SMTP_SINK=mailpit, but mailpit was not found \
                 ($TASKFLOW_MAILPIT_BIN, $PATH)"
                    .into(),
            )
        }),
        Some(other) => Err(Error::BinaryNotFound(format!(
            "TASKFLOW_SMTP_SINK={other}: must be `maildev` or `mailpit`"
        ))),
        None => match (maildev, mailpit) {
            (Some(p), _) => Ok((SinkKind::MailDev, p)),
            (None, Some(p)) => Ok((SinkKind::Mailpit, p)),
            (None, None) => Err(Error::BinaryNotFound(format!(
                "no SMTP sink: neither maildev ($TASKFLOW_MAILDEV_BIN, {}, $PATH; \
                 run scripts/install-deps.sh) nor mailpit ($TASKFLOW_MAILPIT_BIN, $PATH; \
                 nixpkgs' mailpit) was found",
                maildev_cached().display()
            ))),
        },
    }
}

/// The sink this machine runs: [`choose_sink`] over `$TASKFLOW_SMTP_SINK` and what is installed.
pub fn sink_binary() -> Result<(SinkKind, PathBuf)> {
    let forced = std::env::var("TASKFLOW_SMTP_SINK").ok();
    choose_sink(forced.as_deref(), find_maildev(), find_mailpit())
}

/// One message as the sink received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The sink's id of the message.
    pub id: String,
    /// Sender address (SMTP envelope, else `From:`).
    pub from: String,
    /// Recipient addresses (SMTP envelope, else `To:`).
    pub to: Vec<String>,
    /// `Subject:`.
    pub subject: String,
    /// Plain-text body (empty if none).
    pub text: String,
    /// HTML body, if any.
    pub html: Option<String>,
}

#[derive(Deserialize)]
struct ApiAddress {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize, Default)]
struct ApiEnvelope {
    from: Option<ApiAddress>,
    #[serde(default)]
    to: Vec<ApiAddress>,
}

#[derive(Deserialize)]
struct ApiMail {
    #[serde(default)]
    id: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    from: Vec<ApiAddress>,
    #[serde(default)]
    to: Vec<ApiAddress>,
    #[serde(default)]
    envelope: Option<ApiEnvelope>,
}

impl From<ApiMail> for ReceivedMail {
    fn from(m: ApiMail) -> Self {
        let envelope = m.envelope.unwrap_or_default();
        let from = envelope
            .from
            .map(|a| a.address)
            .filter(|a| !a.is_empty())
            .or_else(|| m.from.into_iter().next().map(|a| a.address))
            .unwrap_or_default();
        let to = if envelope.to.is_empty() {
            m.to.into_iter().map(|a| a.address).collect()
        } else {
            envelope.to.into_iter().map(|a| a.address).collect()
        };
        ReceivedMail {
            id: m.id,
            from,
            to,
            subject: m.subject,
            text: m.text.unwrap_or_default(),
            html: m.html,
        }
    }
}

/// Mailpit's address object (`{"Name": …, "Address": …}`).
#[derive(Deserialize, Default)]
struct MailpitAddress {
    #[serde(rename = "Address", default)]
    address: String,
}

/// One entry of `GET /api/v1/messages` (newest first).
#[derive(Deserialize)]
struct MailpitSummary {
    #[serde(rename = "ID")]
    id: String,
}

/// `GET /api/v1/messages`.
#[derive(Deserialize)]
struct MailpitList {
    #[serde(default)]
    total: usize,
    #[serde(default)]
    messages: Vec<MailpitSummary>,
}

/// `GET /api/v1/message/{ID}`. Recipients of the envelope that no header names are in `Bcc`.
#[derive(Deserialize)]
struct MailpitMessage {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "From", default)]
    from: Option<MailpitAddress>,
    #[serde(rename = "To", default)]
    to: Option<Vec<MailpitAddress>>,
    #[serde(rename = "Cc", default)]
    cc: Option<Vec<MailpitAddress>>,
    #[serde(rename = "Bcc", default)]
    bcc: Option<Vec<MailpitAddress>>,
    #[serde(rename = "Subject", default)]
    subject: String,
    #[serde(rename = "Text", default)]
    text: String,
    #[serde(rename = "HTML", default)]
    html: String,
}

impl From<MailpitMessage> for ReceivedMail {
    fn from(m: MailpitMessage) -> Self {
        let to = [m.to, m.cc, m.bcc]
            .into_iter()
            .flatten()
            .flatten()
            .map(|a| a.address)
            .collect();
        ReceivedMail {
            id: m.id,
            from: m.from.map(|a| a.address).unwrap_or_default(),
            to,
            subject: m.subject,
            text: m.text,
            html: (!m.html.is_empty()).then_some(m.html),
        }
    }
}

/// Options for an [`SmtpSink`]; defaults: free ports, temporary mail directory.
#[derive(Debug, Clone)]
pub struct SmtpSinkBuilder {
    smtp_port: Option<u16>,
    web_port: Option<u16>,
    mail_dir: Option<PathBuf>,
    log_file: Option<PathBuf>,
    startup_timeout: Duration,
    max_message_size: Option<u64>,
}

impl SmtpSinkBuilder {
    /// Refuse messages larger than `bytes` with a permanent SMTP error (552), for testing
    /// how senders handle 5xx replies.
    pub fn max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// SMTP port instead of a free one.
    pub fn smtp_port(mut self, port: u16) -> Self {
        self.smtp_port = Some(port);
        self
    }

    /// Web UI / REST API port instead of a free one.
    pub fn web_port(mut self, port: u16) -> Self {
        self.web_port = Some(port);
        self
    }

    /// Persist mail in this directory (kept, and reloaded on start).
    pub fn mail_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.mail_dir = Some(dir.into());
        self
    }

    /// Where the sink's output goes. Default: a file in a temporary directory.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// How long to wait for SMTP and the web API (default 60 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts the sink ([`sink_binary`]) and waits until both its SMTP port and web API answer.
    pub async fn start(self) -> Result<SmtpSink> {
        let (kind, bin) = sink_binary()?;
        let pick = |fixed: Option<u16>| -> Result<u16> {
            match fixed {
                Some(p) => {
                    reserve_port(p);
                    Ok(p)
                }
                None => free_port(),
            }
        };
        let smtp_port = pick(self.smtp_port)?;
        let web_port = pick(self.web_port)?;
        let temp = tempfile::Builder::new()
            .prefix("taskflow-smtp-")
            .tempdir()
            .ctx(|| format!("creating a temporary directory for {}", kind.name()))?;
        let mail_dir = match self.mail_dir {
            Some(d) => d,
            None => temp.path().join("mail"),
        };
        std::fs::create_dir_all(&mail_dir).ctx(|| format!("creating {}", mail_dir.display()))?;
        let log_path = self
            .log_file
            .unwrap_or_else(|| temp.path().join(format!("{}.log", kind.name())));
        let mut sink = SmtpSink {
            kind,
            bin,
            smtp_port,
            web_port,
            mail_dir,
            log_path,
            startup_timeout: self.startup_timeout,
            max_message_size: self.max_message_size,
            child: None,
            temp,
        };
        sink.start().await?;
        Ok(sink)
    }
}

/// A running (or stopped) sink: SMTP on `127.0.0.1:smtp_port`, REST API and web UI on
/// `127.0.0.1:web_port`. Stopped on drop.
#[derive(Debug)]
pub struct SmtpSink {
    kind: SinkKind,
    bin: PathBuf,
    smtp_port: u16,
    web_port: u16,
    mail_dir: PathBuf,
    log_path: PathBuf,
    startup_timeout: Duration,
    max_message_size: Option<u64>,
    child: Option<ManagedChild>,
    temp: tempfile::TempDir,
}

impl SmtpSink {
    /// Options with test defaults.
    pub fn builder() -> SmtpSinkBuilder {
        SmtpSinkBuilder {
            smtp_port: None,
            web_port: None,
            mail_dir: None,
            log_file: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            max_message_size: None,
        }
    }

    /// A sink on free ports (same as `SmtpSink::builder().start()`).
    pub async fn temp() -> Result<Self> {
        Self::builder().start().await
    }

    /// Starts the sink again after [`Self::stop`] (no-op when running).
    pub async fn start(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if child.ensure_running().is_ok() {
                return Ok(());
            }
            self.child = None;
        }
        let mut cmd = Command::new(&self.bin);
        match self.kind {
            SinkKind::MailDev => {
                cmd.arg("--smtp")
                    .arg(self.smtp_port.to_string())
                    .arg("--web")
                    .arg(self.web_port.to_string())
                    .args(["--ip", "127.0.0.1", "--web-ip", "127.0.0.1"])
                    .arg("--mail-directory")
                    .arg(&self.mail_dir);
                if let Some(n) = self.max_message_size {
                    cmd.arg("--max-message-size").arg(n.to_string());
                }
                for var in [
                    "MAILDEV_SMTP_PORT",
                    "MAILDEV_IP",
                    "MAILDEV_WEB_PORT",
                    "MAILDEV_WEB_IP",
                    "MAILDEV_INCOMING_USER",
                    "MAILDEV_INCOMING_PASS",
                    "MAILDEV_WEB_USER",
                    "MAILDEV_WEB_PASS",
                ] {
                    cmd.env_remove(var);
                }
            }
            SinkKind::Mailpit => {
                cmd.arg("--smtp")
                    .arg(format!("127.0.0.1:{}", self.smtp_port))
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{}", self.web_port))
                    .arg("--database")
                    .arg(self.mail_dir.join("mailpit.db"));
                // Mailpit reads MP_* variables for every flag; only ours count.
                for (var, _) in std::env::vars_os() {
                    if var.to_string_lossy().starts_with("MP_") {
                        cmd.env_remove(var);
                    }
                }
            }
        }
        cmd.current_dir(self.temp.path())
            .env("TMPDIR", self.temp.path());
        let policy = StopPolicy {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(5),
        };
        self.child = Some(ManagedChild::spawn(
            self.kind.name(),
            &mut cmd,
            &self.log_path,
            policy,
        )?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        loop {
            let err = if !tcp_connectable(self.smtp_port).await {
                "SMTP port refuses connections".to_owned()
            } else {
                let health = match self.kind {
                    SinkKind::MailDev => "/api/healthz",
                    SinkKind::Mailpit => "/api/v1/messages?limit=1",
                };
                match http(self.web_port, Method::GET, health).await {
                    Ok((200, _)) => return Ok(()),
                    Ok((status, _)) => format!("GET {health} returned {status}"),
                    Err(e) => e.to_string(),
                }
            };
            if let Some(child) = self.child.as_mut() {
                child.ensure_running()?;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "{} (smtp 127.0.0.1:{}, web 127.0.0.1:{})",
                        self.kind.name(),
                        self.smtp_port,
                        self.web_port
                    ),
                    after: self.startup_timeout,
                    last_error: Some(err),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SMTP port (127.0.0.1, plain SMTP, no auth).
    pub fn smtp_port(&self) -> u16 {
        self.smtp_port
    }

    /// Web UI / REST API port (127.0.0.1).
    pub fn web_port(&self) -> u16 {
        self.web_port
    }

    /// `http://127.0.0.1:<web_port>/`.
    pub fn web_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.web_port)
    }

    /// Which program this sink runs.
    pub fn kind(&self) -> SinkKind {
        self.kind
    }

    /// The sink's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Every message received so far, in arrival order.
    pub async fn messages(&self) -> Result<Vec<ReceivedMail>> {
        match self.kind {
            SinkKind::MailDev => {
                let body = self.get("/api/email").await?;
                let mails: Vec<ApiMail> = serde_json::from_slice(&body)?;
                Ok(mails.into_iter().map(ReceivedMail::from).collect())
            }
            SinkKind::Mailpit => {
                // The list is newest first and carries no bodies: page through it, then
                // fetch each message.
                let mut ids = Vec::new();
                loop {
                    let body = self
                        .get(&format!("/api/v1/messages?start={}&limit=250", ids.len()))
                        .await?;
                    let page: MailpitList = serde_json::from_slice(&body)?;
                    let got = page.messages.len();
                    ids.extend(page.messages.into_iter().map(|m| m.id));
                    if got == 0 || ids.len() >= page.total {
                        break;
                    }
                }
                let mut mails = Vec::with_capacity(ids.len());
                for id in ids.iter().rev() {
                    let body = self.get(&format!("/api/v1/message/{id}")).await?;
                    let m: MailpitMessage = serde_json::from_slice(&body)?;
                    mails.push(ReceivedMail::from(m));
                }
                Ok(mails)
            }
        }
    }

    async fn get(&self, path: &str) -> Result<Bytes> {
        let (status, body) = http(self.web_port, Method::GET, path).await?;
        if status != 200 {
            return Err(Error::Http(format!("GET {path} returned {status}")));
        }
        Ok(body)
    }

    /// Waits until at least `n` messages have arrived and returns them all.
    pub async fn wait_for_messages(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<ReceivedMail>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (count, last_error) = match self.messages().await {
                Ok(m) if m.len() >= n => return Ok(m),
                Ok(m) => (m.len(), None),
                Err(e) => (0, Some(e.to_string())),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{n} message(s) in {} (have {count})", self.kind.name()),
                    after: timeout,
                    last_error,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes every received message.
    pub async fn clear(&self) -> Result<()> {
        // Mailpit: a DELETE without a list of IDs deletes every message.
        let path = match self.kind {
            SinkKind::MailDev => "/api/email/all",
            SinkKind::Mailpit => "/api/v1/messages",
        };
        let (status, _) = http(self.web_port, Method::DELETE, path).await?;
        if status == 200 {
            Ok(())
        } else {
            Err(Error::Http(format!("DELETE {path} returned {status}")))
        }
    }

    /// Pid of the sink while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ManagedChild::pid)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.ensure_running().is_ok())
    }

    /// Stops the sink (simulated SMTP outage); [`Self::start`] brings it back.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.stop().await;
        }
        Ok(())
    }

    /// Leaves the sink running after this value is dropped; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.as_mut().and_then(ManagedChild::detach)
    }
}

/// One HTTP/1.1 request without a body to 127.0.0.1:`port`; returns status and body.
async fn http(port: u16, method: Method, path: &str) -> Result<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect((LOCALHOST, port))
        .await
        .ctx(|| format!("connecting to 127.0.0.1:{port}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    let conn_task = tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| Error::Http(e.to_string()))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    conn_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<PathBuf> {
        Some(PathBuf::from(s))
    }

    #[test]
    fn maildev_first_then_mailpit() {
        let both = choose_sink(None, p("/md"), p("/mp")).unwrap();
        assert_eq!(both, (SinkKind::MailDev, PathBuf::from("/md")));
        let only_mailpit = choose_sink(None, None, p("/mp")).unwrap();
        assert_eq!(only_mailpit, (SinkKind::Mailpit, PathBuf::from("/mp")));
        let none = choose_sink(None, None, None).unwrap_err().to_string();
        assert!(
            none.contains("maildev") && none.contains("mailpit"),
            "{none}"
        );
    }

    #[test]
    fn forced_sink() {
        let mp = choose_sink(Some("mailpit"), p("/md"), p("/mp")).unwrap();
        assert_eq!(mp.0, SinkKind::Mailpit);
        let md = choose_sink(Some("maildev"), p("/md"), None).unwrap();
        assert_eq!(md.0, SinkKind::MailDev);
        let missing = choose_sink(Some("mailpit"), p("/md"), None)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("TASKFLOW_SMTP_SINK=mailpit"), "{missing}");
        let bad = choose_sink(Some("postfix"), p("/md"), p("/mp"))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("postfix"), "{bad}");
    }

    /// Shapes from Mailpit's API documentation (swagger: MessagesSummary, Message).
    #[test]
    fn mailpit_api_shapes() {
        let list: MailpitList = serde_json::from_str(
            r#"{"total":2,"unread":2,"count":2,"messages_count":2,"start":0,"tags":[],
                "messages":[{"ID":"b","MessageID":"m2","Read":false,"From":{"Name":"","Address":"a@x"},
                "To":[{"Name":"","Address":"c@x"}],"Cc":[],"Bcc":[],"Subject":"s2","Size":1,"Snippet":""},
                {"ID":"a","Subject":"s1"}]}"#,
        )
        .unwrap();
        assert_eq!(list.total, 2);
        assert_eq!(
            list.messages
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        let m: MailpitMessage = serde_json::from_str(
            r#"{"ID":"a","MessageID":"m1","From":{"Name":"TaskFlow","Address":"noreply@taskflow.test"},
                "To":[{"Name":"","Address":"alice@example.test"}],"Cc":null,
                "Bcc":[{"Name":"","Address":"bob@example.test"}],"ReplyTo":[],"ReturnPath":"noreply@taskflow.test",
                "Subject":"Task assigned","Date":"2026-01-01T00:00:00Z","Tags":[],
                "Text":"You have a new task.\r\n","HTML":"","Size":321,"Inline":[],"Attachments":[]}"#,
        )
        .unwrap();
        let r = ReceivedMail::from(m);
        assert_eq!(r.id, "a");
        assert_eq!(r.from, "noreply@taskflow.test");
        assert_eq!(r.to, ["alice@example.test", "bob@example.test"]);
        assert_eq!(r.subject, "Task assigned");
        assert_eq!(r.text.trim(), "You have a new task.");
        assert_eq!(r.html, None);
    }
}
