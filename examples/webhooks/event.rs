//! The event this service consumes: "deliver this payload to this endpoint".

use serde::{Deserialize, Serialize};

/// One webhook to deliver. Published keyed by `endpoint_id`, so one endpoint's webhooks go
/// out in order, and the key names the endpoint's breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WebhookEvent {
    /// Unique per event: the idempotency (dedup) key, and the `webhook-id` header of the
    /// request, by which the receiver can drop a second delivery.
    pub(crate) event_id: String,
    /// The endpoint (a customer's subscription): the Kafka record key.
    pub(crate) endpoint_id: String,
    /// Where the webhook is POSTed.
    pub(crate) url: String,
    /// What happened, e.g. `invoice.paid`.
    pub(crate) kind: String,
    /// The event's data, sent as is.
    pub(crate) data: serde_json::Value,
}

/// The header carrying the event id next to the JSON value: the idempotency store's key
/// (`DedupKey::header`), and kept in the dead-letter topic, so every dead letter can be traced.
pub(crate) const EVENT_ID_HEADER: &str = "event-id";

/// The request header carrying the event id to the receiver.
pub(crate) const WEBHOOK_ID_HEADER: &str = "webhook-id";
