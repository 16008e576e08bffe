//! Sample traffic: webhooks spread over endpoints of every behaviour, and how to publish them.
//!
//! Event ids are `<run id>-NNNN`, so the events of a new run are new events (not duplicates of
//! the previous run's, which the idempotency store remembers).

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kourier::{Header, Publisher};

use crate::event::{EVENT_ID_HEADER, WebhookEvent};
use crate::server::{Behaviour, endpoint_url};

/// The endpoints that misbehave, one or more of each kind; the rest are healthy.
const SPECIAL: [&str; 8] = [
    "down-1",
    "down-2",
    "gone-1",
    "ratelimited-1",
    "flaky-1",
    "flaky-2",
    "flaky-3",
    "rejecting-1",
];

/// The fewest endpoints a run has: the special ones and one healthy one.
pub(crate) const MIN_ENDPOINTS: usize = SPECIAL.len() + 1;

/// `count` endpoint ids (at least [`MIN_ENDPOINTS`]): the special ones, then `healthy-01`, ...
pub(crate) fn endpoint_ids(count: usize) -> Vec<String> {
    let healthy = count.saturating_sub(SPECIAL.len()).max(1);
    let width = healthy.to_string().len().max(2);
    SPECIAL
        .iter()
        .map(|s| (*s).to_owned())
        .chain((1..=healthy).map(|n| format!("{}-{n:0width$}", Behaviour::Healthy.prefix())))
        .collect()
}

/// `events` webhooks of run `run_id`, round-robin over `endpoints` endpoints, to the URLs of
/// a server at `base` (its `down-*` endpoints at `down_base`).
pub(crate) fn events(
    run_id: &str,
    events: usize,
    endpoints: usize,
    base: &str,
    down_base: &str,
) -> Vec<WebhookEvent> {
    let ids = endpoint_ids(endpoints);
    let kinds = ["invoice.paid", "order.shipped", "customer.updated"];
    (0..events)
        .map(|n| {
            let endpoint_id = &ids[n % ids.len()];
            WebhookEvent {
                event_id: format!("{run_id}-{n:04}"),
                endpoint_id: endpoint_id.clone(),
                url: endpoint_url(base, down_base, endpoint_id),
                kind: kinds[n % kinds.len()].to_owned(),
                data: serde_json::json!({ "seq": n, "amount_cents": 1000 + n }),
            }
        })
        .collect()
}

/// An event and where the broker stored it.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub(crate) event: WebhookEvent,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// The typed publisher for `topic`: JSON values keyed by endpoint, the event id as a header.
pub(crate) fn publisher(bootstrap: &str, topic: &str) -> Result<Publisher<WebhookEvent>> {
    Publisher::<WebhookEvent>::builder(bootstrap, topic)
        .key_fn(|e: &WebhookEvent| e.endpoint_id.clone())
        .headers_fn(|e: &WebhookEvent| vec![Header::new(EVENT_ID_HEADER, e.event_id.as_bytes())])
        .send_timeout(Duration::from_secs(15))
        .build()
        .context("creating the publisher")
}

/// Publishes `events` pipelined (in order within each endpoint) and returns where each was
/// stored.
pub(crate) async fn publish(
    publisher: &Publisher<WebhookEvent>,
    events: Vec<WebhookEvent>,
) -> Result<Vec<Published>> {
    let results = publisher.send_batch(&events).await;
    let mut published = Vec::with_capacity(events.len());
    for (event, result) in events.into_iter().zip(results) {
        match result {
            Ok(d) => published.push(Published {
                event,
                partition: d.partition,
                offset: d.offset,
            }),
            Err(e) => bail!("publishing event {}: {e}", event.event_id),
        }
    }
    publisher.flush(Duration::from_secs(15)).await?;
    Ok(published)
}
