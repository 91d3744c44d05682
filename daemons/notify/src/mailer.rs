//! The email a recipient gets for a task event, sent over SMTP with lettre, and the
//! classification of what can go wrong.
//!
//! Classification is what keeps one recipient from stopping everyone's mail (issue 10):
//! a failure that will happen again on every attempt — an address lettre cannot parse, a
//! 5xx reply — is *permanent* and the caller dead-letters that one mail; anything else
//! (connection refused, timeout, 4xx, our own TLS/credential trouble) is *transient* and
//! the caller retries the event with back-off.

use std::time::Duration;

use anyhow::Context;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use taskflow_contracts::{TaskEvent, TaskEventType};
use taskflow_kit::email::{mail_address, EmailError};

use crate::config::{SmtpConfig, SmtpTls};
use crate::directory::Recipient;

/// SMTP reply codes that are 5xx but mean "*we* are not allowed to send" (authentication
/// required or failed, RFC 4954): a configuration problem an operator fixes, not a
/// property of the recipient, so mail waits for the fix instead of being dropped.
const AUTH_CODES: [u16; 4] = [530, 534, 535, 538];

/// Why one recipient's mail was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The stored address is not one the mailer can use; retrying cannot help.
    #[error("address {address:?}: {reason}")]
    Unusable { address: String, reason: String },
    /// The SMTP server refused this mail for good (5xx).
    #[error("SMTP {code}: {message}")]
    Rejected { code: u16, message: String },
    /// Worth trying again later (server down, timeout, 4xx, TLS or credentials).
    #[error("SMTP unavailable: {0}")]
    Transient(String),
}

impl SendError {
    /// Will every later attempt fail the same way?
    pub fn is_permanent(&self) -> bool {
        !matches!(self, SendError::Transient(_))
    }

    /// The SMTP reply code, when the server answered.
    pub fn smtp_code(&self) -> Option<u16> {
        match self {
            SendError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Sorts a lettre SMTP error into permanent or transient (see the module docs).
fn classify(e: &lettre::transport::smtp::Error) -> SendError {
    let code = e.status().and_then(|c| c.to_string().parse::<u16>().ok());
    match code {
        Some(code) if e.is_permanent() && !AUTH_CODES.contains(&code) => SendError::Rejected {
            code,
            message: e.to_string(),
        },
        _ => SendError::Transient(e.to_string()),
    }
}

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
        .timeout(Some(Duration::from_secs(cfg.timeout_secs)));
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

    /// Sends `event`'s mail to `to`; `actor` is who made the change, when known.
    pub async fn send(
        &self,
        event: &TaskEvent,
        to: &Recipient,
        actor: Option<&str>,
    ) -> Result<(), SendError> {
        let message = compose(&self.from, event, to, actor)?;
        self.transport
            .send(message)
            .await
            .map(drop)
            .map_err(|e| classify(&e))
    }
}

/// The message for one recipient. The address is parsed with the parser registration
/// uses ([`mail_address`]); the display name is handed to lettre as data (it encodes it),
/// so no user-chosen name can make the header unparsable.
fn compose(
    from: &Mailbox,
    event: &TaskEvent,
    to: &Recipient,
    actor: Option<&str>,
) -> Result<Message, SendError> {
    let unusable = |reason: String| SendError::Unusable {
        address: to.email.clone(),
        reason,
    };
    let address = mail_address(&to.email).map_err(|e: EmailError| unusable(e.to_string()))?;
    let to_box = Mailbox::new(Some(to.name.clone()), address);
    Message::builder()
        .from(from.clone())
        .to(to_box)
        .subject(subject(event))
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(body(event, &to.name, actor))
        .map_err(|e| unusable(e.to_string()))
}

fn verb(kind: TaskEventType) -> &'static str {
    match kind {
        TaskEventType::Created => "created",
        TaskEventType::Updated => "updated",
        TaskEventType::Deleted => "deleted",
    }
}

/// `[TaskFlow] Task #7 updated: Complete project`.
pub fn subject(event: &TaskEvent) -> String {
    format!(
        "[TaskFlow] Task #{} {}: {}",
        event.task.id,
        verb(event.kind),
        event.task.title
    )
}

/// The plain-text body: who did what to which task, and for an update each field that
/// changed as `field: old → new` (from the event's `previous`). `actor` is the name of
/// the user who made the change (the id alone when unknown).
pub fn body(event: &TaskEvent, recipient_name: &str, actor: Option<&str>) -> String {
    let task = &event.task;
    let at = event
        .occurred_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut out = format!(
        "Hello {recipient_name},\n\nTask #{id} \"{title}\" was {verb} by {who} at {at}.\n",
        id = task.id,
        title = task.title,
        verb = verb(event.kind),
        who = match actor {
            Some(name) => format!("{name} (user {})", event.actor_id),
            None => format!("user {}", event.actor_id),
        },
    );
    if event.kind == TaskEventType::Updated {
        let changes = changes(event);
        if changes.is_empty() {
            out.push_str("\nNothing visible changed.\n");
        } else {
            out.push_str("\nWhat changed:\n");
            for c in changes {
                out.push_str(&format!("  {c}\n"));
            }
        }
    }
    out.push_str(&format!(
        "\nTitle: {}\nStatus: {}\nPerformer: user {}\nCreator: user {}\n",
        task.title, task.status, task.performer_id, task.creator_id
    ));
    if !task.description.is_empty() {
        out.push_str(&format!("\n{}\n", task.description));
    }
    out
}

/// `field: old → new` for each field an update changed.
fn changes(event: &TaskEvent) -> Vec<String> {
    let Some(prev) = &event.previous else {
        return Vec::new();
    };
    let task = &event.task;
    let ids = |v: &[i64]| {
        let list: Vec<String> = v.iter().map(i64::to_string).collect();
        format!("[{}]", list.join(", "))
    };
    let mut out = Vec::new();
    if prev.status != task.status {
        out.push(format!("status: {} → {}", prev.status, task.status));
    }
    if prev.title != task.title {
        out.push(format!("title: \"{}\" → \"{}\"", prev.title, task.title));
    }
    if prev.performer_id != task.performer_id {
        out.push(format!(
            "performer: user {} → user {}",
            prev.performer_id, task.performer_id
        ));
    }
    if prev.observer_ids != task.observer_ids {
        out.push(format!(
            "observers: {} → {}",
            ids(&prev.observer_ids),
            ids(&task.observer_ids)
        ));
    }
    if prev.description != task.description {
        out.push("description: changed".to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use taskflow_contracts::{Task, TaskStatus};

    fn task(status: TaskStatus) -> Task {
        Task {
            id: 7,
            title: "Complete project".into(),
            description: "Finish it".into(),
            performer_id: 2,
            creator_id: 1,
            observer_ids: vec![3],
            status,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            updated_at: time::OffsetDateTime::UNIX_EPOCH,
            version: 2,
        }
    }

    #[test]
    fn update_body_says_what_changed_and_who() {
        let ev = TaskEvent::new(
            TaskEventType::Updated,
            2,
            task(TaskStatus::InProgress),
            Some(task(TaskStatus::Pending)),
        );
        let b = body(&ev, "Ann", Some("Pat"));
        assert!(b.contains("status: pending → in_progress"), "{b}");
        assert!(
            b.contains("\"Complete project\" was updated by Pat (user 2)"),
            "{b}"
        );
        assert!(!b.contains("title:"), "unchanged title listed: {b}");
        assert_eq!(subject(&ev), "[TaskFlow] Task #7 updated: Complete project");
    }

    #[test]
    fn unusable_address_is_permanent() {
        let from: Mailbox = "TaskFlow <noreply@taskflow.local>".parse().unwrap();
        let ev = TaskEvent::new(TaskEventType::Created, 1, task(TaskStatus::Pending), None);
        let r = Recipient {
            id: 5,
            email: format!("{}@example.com", "x".repeat(65)),
            name: "Long \"Local\" <Part>".into(),
        };
        let err = compose(&from, &ev, &r, None).unwrap_err();
        assert!(err.is_permanent());
        let ok = Recipient {
            email: "ok@example.com".into(),
            ..r
        };
        assert!(
            compose(&from, &ev, &ok, None).is_ok(),
            "a quoted display name is data"
        );
    }
}
