//! Prometheus counters of the notify daemon.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

#[derive(Clone, Default)]
pub struct Metrics {
    pub events: Counter,
    pub malformed: Counter,
    pub mails_sent: Counter,
    pub mail_failures: Counter,
    pub duplicates: Counter,
    pub published: Counter,
    pub retries: Counter,
    pub dead_letters: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "events",
            "task_events messages handled, per stage (push and mail each count)",
            m.events.clone(),
        );
        registry.register(
            "malformed_events",
            "task_events messages that did not parse and were skipped",
            m.malformed.clone(),
        );
        registry.register(
            "mails_sent",
            "emails accepted by SMTP",
            m.mails_sent.clone(),
        );
        registry.register(
            "mail_failures",
            "emails SMTP refused or could not take",
            m.mail_failures.clone(),
        );
        registry.register(
            "duplicates_skipped",
            "emails not sent again because a redelivered event was already mailed",
            m.duplicates.clone(),
        );
        registry.register(
            "notify_events_published",
            "notify_events messages produced",
            m.published.clone(),
        );
        registry.register(
            "retries",
            "event handling attempts that failed and will be retried",
            m.retries.clone(),
        );
        registry.register(
            "dead_letters",
            "mails that can never be sent (unusable address, SMTP 5xx), sent to the dead-letter topic",
            m.dead_letters.clone(),
        );
        m
    }
}
