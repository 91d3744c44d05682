//! taskflow-contracts: the task model and event schemas shared by the daemons.
//!
//! The gateway writes tasks and their `task_events` (through the transactional outbox);
//! notify consumes `task_events` and publishes `notify_events`; WebSocket clients see the
//! same task shape. Keeping these types in one crate means a field renamed on one side is a
//! compile error on the other instead of a silently dropped value in production. The JSON
//! shapes are those of SPEC §2 (task) and §4 (events); times are RFC 3339 strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Default Kafka topic of task change events.
pub const TASK_EVENTS_TOPIC: &str = "task_events";
/// Default Kafka topic of per-recipient notifications.
pub const NOTIFY_EVENTS_TOPIC: &str = "notify_events";
/// Default Kafka topic of mails that can never be sent (one message per recipient).
pub const DEAD_LETTERS_TOPIC: &str = "notify_dead_letters";
/// Version of the event envelope (`"v"`); bumped on incompatible changes.
pub const EVENT_VERSION: u8 = 1;

/// Lifecycle state of a task. Serialized as `pending`, `in_progress`, `completed`,
/// `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    #[default]
    Pending,
    InProgress,
    Completed,
    Cancelled,
}

impl TaskStatus {
    /// Every status, in lifecycle order (for validation messages and documentation).
    pub const ALL: [TaskStatus; 4] = [
        TaskStatus::Pending,
        TaskStatus::InProgress,
        TaskStatus::Completed,
        TaskStatus::Cancelled,
    ];

    /// The wire and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Completed => "completed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not one of the four statuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStatus(pub String);

impl fmt::Display for UnknownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown status `{}` (expected pending, in_progress, completed or cancelled)",
            self.0
        )
    }
}

impl std::error::Error for UnknownStatus {}

impl FromStr for TaskStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// A task as the API returns it and as events carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: i64,
    pub title: String,
    pub description: String,
    pub performer_id: i64,
    pub creator_id: i64,
    /// Sorted ascending, without duplicates.
    pub observer_ids: Vec<i64>,
    pub status: TaskStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Incremented on every write; the `ETag` is derived from it.
    pub version: i64,
}

impl Task {
    /// Everyone who hears about a change of this task: performer, creator and observers,
    /// each once, ascending.
    pub fn recipients(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .observer_ids
            .iter()
            .copied()
            .chain([self.performer_id, self.creator_id])
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// What happened to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskEventType {
    #[serde(rename = "task.created")]
    Created,
    #[serde(rename = "task.updated")]
    Updated,
    #[serde(rename = "task.deleted")]
    Deleted,
}

impl TaskEventType {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskEventType::Created => "task.created",
            TaskEventType::Updated => "task.updated",
            TaskEventType::Deleted => "task.deleted",
        }
    }
}

impl fmt::Display for TaskEventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `task_events` message (Kafka key: the task id as a decimal string).
///
/// `task` is the state after the change (for `task.deleted`, the state that was deleted);
/// `previous` is the state before an update or delete, `None` on create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    pub v: u8,
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub kind: TaskEventType,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    pub actor_id: i64,
    pub task: Task,
    pub previous: Option<Task>,
}

impl TaskEvent {
    /// A new event with a fresh time-ordered id (UUID v7).
    pub fn new(kind: TaskEventType, actor_id: i64, task: Task, previous: Option<Task>) -> Self {
        TaskEvent {
            v: EVENT_VERSION,
            event_id: Uuid::now_v7(),
            kind,
            occurred_at: OffsetDateTime::now_utc(),
            actor_id,
            task,
            previous,
        }
    }

    /// The Kafka message key: all events of one task land in one partition, in order.
    pub fn key(&self) -> String {
        self.task.id.to_string()
    }
}

/// A `notify_events` message, one per recipient (Kafka key: the recipient's user id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyEvent {
    pub v: u8,
    pub event_id: Uuid,
    /// The `task_events` event this notification derives from (for de-duplication).
    pub source_event_id: Uuid,
    pub user_id: i64,
    pub email: String,
    #[serde(rename = "type")]
    pub kind: TaskEventType,
    pub task_id: i64,
    pub title: String,
    pub description: String,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// The task after the change, for WebSocket clients (SPEC §3 pushes it whole).
    /// Additive to SPEC §4's fields; absent in messages from older notify daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
}

impl NotifyEvent {
    /// The notification of `event` for one recipient.
    ///
    /// The id is derived (UUID v5 of the source id and the user id), so redelivering a
    /// `task_events` message yields the same `notify_events` ids and consumers can
    /// de-duplicate.
    pub fn for_recipient(event: &TaskEvent, user_id: i64, email: impl Into<String>) -> Self {
        NotifyEvent {
            v: EVENT_VERSION,
            event_id: derived_id(event.event_id, user_id),
            source_event_id: event.event_id,
            user_id,
            email: email.into(),
            kind: event.kind,
            task_id: event.task.id,
            title: event.task.title.clone(),
            description: event.task.description.clone(),
            occurred_at: event.occurred_at,
            task: Some(event.task.clone()),
        }
    }

    /// The Kafka message key.
    pub fn key(&self) -> String {
        self.user_id.to_string()
    }
}

/// A `notify_dead_letters` message (Kafka key: the recipient's user id): one recipient's
/// mail for one event that can never be sent — the address is unusable or the SMTP server
/// refused it permanently (5xx). It carries the whole source event so an operator can
/// fix the address and replay it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub v: u8,
    pub source_event_id: Uuid,
    pub user_id: i64,
    pub email: String,
    /// Human-readable cause, e.g. `address "…": not a deliverable email address (…)` or
    /// `SMTP 550: mailbox unavailable`.
    pub reason: String,
    /// The SMTP reply code when the server refused, `None` when we never sent.
    pub smtp_code: Option<u16>,
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
    pub event: TaskEvent,
}

/// A deterministic id for (source event, recipient): the source id with the recipient
/// mixed into its random bits, version/variant kept at 8 ("custom", RFC 9562).
fn derived_id(source: Uuid, user_id: i64) -> Uuid {
    let mut bytes = *source.as_bytes();
    for (i, b) in user_id.to_be_bytes().iter().enumerate() {
        bytes[8 + i] ^= b.rotate_left(3) ^ 0x5a;
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn task() -> Task {
        Task {
            id: 7,
            title: "t".into(),
            description: String::new(),
            performer_id: 2,
            creator_id: 1,
            observer_ids: vec![3, 1],
            status: TaskStatus::InProgress,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            version: 1,
        }
    }

    #[test]
    fn status_round_trips() {
        for st in TaskStatus::ALL {
            assert_eq!(st.as_str().parse::<TaskStatus>().unwrap(), st);
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn task_json_shape() {
        let v = serde_json::to_value(task()).unwrap();
        assert_eq!(v["status"], "in_progress");
        assert_eq!(v["created_at"], "1970-01-01T00:00:00Z");
        assert_eq!(v["observer_ids"], serde_json::json!([3, 1]));
        let back: Task = serde_json::from_value(v).unwrap();
        assert_eq!(back, task());
    }

    #[test]
    fn event_shapes() {
        let ev = TaskEvent::new(TaskEventType::Created, 1, task(), None);
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["type"], "task.created");
        assert!(v["previous"].is_null());
        assert_eq!(ev.key(), "7");
        let back: TaskEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, ev);

        let n = NotifyEvent::for_recipient(&ev, 3, "c@x.io");
        let again = NotifyEvent::for_recipient(&ev, 3, "c@x.io");
        assert_eq!(n.event_id, again.event_id);
        assert_ne!(
            n.event_id,
            NotifyEvent::for_recipient(&ev, 2, "b@x.io").event_id
        );
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["type"], "task.created");
        assert_eq!(v["source_event_id"], ev.event_id.to_string());
        assert_eq!(n.key(), "3");
    }

    #[test]
    fn recipients_are_unique() {
        assert_eq!(task().recipients(), vec![1, 2, 3]);
    }
}

/// The claims of a TaskFlow access token (a JWT signed with EdDSA by the auth daemon and
/// verified by the gateway with the public key only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, as a decimal string (JWT `sub` is a string by RFC 7519).
    pub sub: String,
    pub email: String,
    pub name: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: i64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
}

impl Claims {
    /// The user id in `sub`, if it is a positive integer.
    pub fn user_id(&self) -> Option<i64> {
        self.sub.parse::<i64>().ok().filter(|id| *id > 0)
    }
}
