//! The event this service consumes: "send this mail to this user".

use serde::{Deserialize, Serialize};

/// One notification to mail. Published keyed by `user_id`, so one user's mails go out in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NotifyEvent {
    /// Unique per notification; the idempotency (dedup) key and the mail's `Message-ID`.
    pub(crate) event_id: String,
    /// The Kafka record key.
    pub(crate) user_id: String,
    /// Recipient address, e.g. `Alice <alice@example.com>` or `alice@example.com`.
    pub(crate) to: String,
    pub(crate) subject: String,
    pub(crate) body: String,
}

/// The header carrying the event id next to the JSON value (useful to tools that do not decode
/// the value; the dead-letter topic keeps it, so even undecodable records can be traced).
pub(crate) const EVENT_ID_HEADER: &str = "event-id";
