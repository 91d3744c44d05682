//! A real SMTP sink: MailDev, whose REST API lets tests read what was delivered.

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
    if let Some(p) = std::env::var_os("TASKFLOW_MAILDEV_BIN") {
        return Ok(PathBuf::from(p));
    }
    let cached = cache_dir()
        .join(format!("maildev-{MAILDEV_VERSION}"))
        .join("node_modules/.bin/maildev");
    if is_executable(&cached) {
        return Ok(cached);
    }
    which("maildev").ok_or_else(|| {
        Error::BinaryNotFound(format!(
            "the SMTP sink `maildev` was not found (looked at $TASKFLOW_MAILDEV_BIN, {}, $PATH): \
             run scripts/install-deps.sh",
            cached.display()
        ))
    })
}

/// One message as MailDev received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// MailDev's id of the message.
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

    /// Where MailDev's output goes. Default: a file in a temporary directory.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// How long to wait for SMTP and the web API (default 60 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts MailDev and waits until both its SMTP port and web API answer.
    pub async fn start(self) -> Result<SmtpSink> {
        let bin = maildev_binary()?;
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
            .ctx(|| "creating a temporary directory for MailDev".to_owned())?;
        let mail_dir = match self.mail_dir {
            Some(d) => d,
            None => temp.path().join("mail"),
        };
        std::fs::create_dir_all(&mail_dir).ctx(|| format!("creating {}", mail_dir.display()))?;
        let log_path = self
            .log_file
            .unwrap_or_else(|| temp.path().join("maildev.log"));
        let mut sink = SmtpSink {
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

/// A running (or stopped) MailDev: SMTP on `127.0.0.1:smtp_port`, REST API and web UI on
/// `127.0.0.1:web_port`. Stopped on drop.
#[derive(Debug)]
pub struct SmtpSink {
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

    /// Starts MailDev again after [`Self::stop`] (no-op when running).
    pub async fn start(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if child.ensure_running().is_ok() {
                return Ok(());
            }
            self.child = None;
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--smtp")
            .arg(self.smtp_port.to_string())
            .arg("--web")
            .arg(self.web_port.to_string())
            .args(["--ip", "127.0.0.1", "--web-ip", "127.0.0.1"])
            .arg("--mail-directory")
            .arg(&self.mail_dir)
            .args(
                self.max_message_size
                    .map(|n| vec!["--max-message-size".to_owned(), n.to_string()])
                    .unwrap_or_default(),
            )
            .current_dir(self.temp.path())
            .env("TMPDIR", self.temp.path());
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
        let policy = StopPolicy {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(5),
        };
        self.child = Some(ManagedChild::spawn(
            "maildev",
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
                match http(self.web_port, Method::GET, "/api/healthz").await {
                    Ok((200, _)) => return Ok(()),
                    Ok((status, _)) => format!("GET /api/healthz returned {status}"),
                    Err(e) => e.to_string(),
                }
            };
            if let Some(child) = self.child.as_mut() {
                child.ensure_running()?;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "MailDev (smtp 127.0.0.1:{}, web 127.0.0.1:{})",
                        self.smtp_port, self.web_port
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

    /// MailDev's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Every message received so far, in arrival order.
    pub async fn messages(&self) -> Result<Vec<ReceivedMail>> {
        let (status, body) = http(self.web_port, Method::GET, "/api/email").await?;
        if status != 200 {
            return Err(Error::Http(format!("GET /api/email returned {status}")));
        }
        let mails: Vec<ApiMail> = serde_json::from_slice(&body)?;
        Ok(mails.into_iter().map(ReceivedMail::from).collect())
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
                    what: format!("{n} message(s) in MailDev (have {count})"),
                    after: timeout,
                    last_error,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes every received message.
    pub async fn clear(&self) -> Result<()> {
        let (status, _) = http(self.web_port, Method::DELETE, "/api/email/all").await?;
        if status == 200 {
            Ok(())
        } else {
            Err(Error::Http(format!(
                "DELETE /api/email/all returned {status}"
            )))
        }
    }

    /// Pid of MailDev while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ManagedChild::pid)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.ensure_running().is_ok())
    }

    /// Stops MailDev (simulated SMTP outage); [`Self::start`] brings it back.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.stop().await;
        }
        Ok(())
    }

    /// Leaves MailDev running after this value is dropped; returns its pid.
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
