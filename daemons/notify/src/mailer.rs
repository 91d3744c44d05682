//! The email a recipient gets for a task event, sent over SMTP with lettre.

use std::time::Duration;

use anyhow::Context;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use taskflow_contracts::{TaskEvent, TaskEventType};

use crate::config::{SmtpConfig, SmtpTls};
use crate::directory::Recipient;

#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(cfg: &SmtpConfig) -> anyhow::Result<Self> {
        let mut builder = match cfg.tls {
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host),
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&cfg.host)
                .context("smtp.host")?,
            SmtpTls::Tls => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(&cfg.host).context("smtp.host")?
            }
        }
        .port(cfg.port)
        .timeout(Some(Duration::from_secs(10)));
        if let (Some(user), Some(file)) = (&cfg.username, &cfg.password_file) {
            let password =
                taskflow_kit::secrets::read_secret(file).context("smtp.password_file")?;
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        Ok(Mailer {
            transport: builder.build(),
            from: cfg.from.parse().context("smtp.from")?,
        })
    }

    /// Does the SMTP server answer? (`NOOP`, for readiness.)
    pub async fn check(&self) -> Result<(), String> {
        match self.transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err("SMTP server did not accept NOOP".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn send(&self, event: &TaskEvent, to: &Recipient) -> Result<(), String> {
        let message = compose(&self.from, event, to)?;
        self.transport
            .send(message)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Subject and plain-text body. A recipient whose stored address does not parse is an
/// error for that recipient only.
fn compose(from: &Mailbox, event: &TaskEvent, to: &Recipient) -> Result<Message, String> {
    let to_box: Mailbox = format!("{} <{}>", to.name.replace(['<', '>', '"'], ""), to.email)
        .parse()
        .or_else(|_| to.email.parse())
        .map_err(|e| format!("address {:?}: {e}", to.email))?;
    let task = &event.task;
    let verb = match event.kind {
        TaskEventType::Created => "created",
        TaskEventType::Updated => "updated",
        TaskEventType::Deleted => "deleted",
    };
    let subject = format!("[TaskFlow] Task #{} {verb}: {}", task.id, task.title);
    let body = format!(
        "Hello {name},\n\nTask #{id} \"{title}\" was {verb} by user {actor} at {at}.\n\n\
         Status: {status}\nPerformer: user {performer}\nCreator: user {creator}\n\n{description}\n",
        name = to.name,
        id = task.id,
        title = task.title,
        actor = event.actor_id,
        at = event
            .occurred_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        status = task.status,
        performer = task.performer_id,
        creator = task.creator_id,
        description = task.description,
    );
    Message::builder()
        .from(from.clone())
        .to(to_box)
        .subject(subject)
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| e.to_string())
}
