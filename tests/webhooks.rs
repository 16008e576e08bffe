//! The `webhooks` example end to end, against the real broker, the real Redis and the
//! example's own HTTP server on loopback: the example's modules are compiled in here, so this
//! runs the very code `cargo run --example webhooks -- demo` runs (and the unit tests of its
//! reply classification, `delivery::tests`, which need no services).
//!
//! It checks what the owner of a webhook sender cares about, from the server's and the
//! dead-letter topic's side: healthy endpoints get each webhook exactly once; a gone endpoint
//! is called once and its webhooks are dead-lettered saying so; endpoints that are down get
//! nothing dead-lettered and each webhook once they are back, no attempt used; a rate-limited
//! endpoint is never called within the pause its `429` asked for; flaky endpoints get each
//! webhook once, through the retry tier when it takes that; a few bad endpoints never open
//! the consumer-wide breaker. Outcomes and counts only: no assertion about how long anything
//! took.
//!
//! Needs Kafka and Redis (`scripts/services up`); the test has its own topics and group.

mod support;

#[allow(dead_code)] // the test uses part of each example module
#[path = "../examples/webhooks/delivery.rs"]
mod delivery;
#[allow(dead_code)]
#[path = "../examples/webhooks/demo.rs"]
mod demo;
#[allow(dead_code)]
#[path = "../examples/webhooks/event.rs"]
mod event;
#[allow(dead_code)]
#[path = "../examples/mail_notifier/kafka.rs"]
mod kafka;
#[allow(dead_code)]
#[path = "../examples/webhooks/samples.rs"]
mod samples;
#[allow(dead_code)]
#[path = "../examples/webhooks/sender.rs"]
mod sender;
#[allow(dead_code)]
#[path = "../examples/webhooks/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::time::Duration;

use kourier::BreakerState;
use kourier::dead_letter::headers as dlt;

use crate::delivery::Outcome;
use crate::demo::{DemoConfig, Fate, calls_inside_pauses};
use crate::sender::Settings;
use crate::server::Behaviour;
use crate::support::{bootstrap, redis_url, require_kafka, require_redis, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_gets_what_its_replies_ask_for_and_only_that() {
    require_kafka().await;
    require_redis().await;
    let topic = unique_name("webhooks");
    let group = unique_name("webhooks");
    let config = DemoConfig {
        settings: Settings {
            bootstrap: bootstrap(),
            redis_url: redis_url(),
            topic: topic.clone(),
            group,
            partitions: 4,
            retry_tiers: vec![Duration::from_secs(1), Duration::from_secs(5)],
            request_timeout: Duration::from_secs(10),
            endpoint_rate: 20,
            min_failing_endpoints: 10,
        },
        run_id: "t1".to_owned(),
        // 10 webhooks to each of 20 endpoints: the 8 that misbehave and 12 healthy ones.
        events: 200,
        endpoints: 20,
        outage: Duration::from_secs(2),
        settle_timeout: Duration::from_secs(90),
    };
    let report = demo::run_demo(config, std::future::pending())
        .await
        .expect("the demo runs");
    let summary = report.summary();
    eprintln!("{summary}");
    assert!(report.settled, "not every webhook settled:{summary}");
    assert_eq!(report.published.len(), 200);

    // What the server saw: 2xx answers per event, calls per endpoint.
    let mut accepted: BTreeMap<&str, usize> = BTreeMap::new();
    let mut calls: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &report.server_calls {
        *calls.entry(c.endpoint_id.as_str()).or_default() += 1;
        if (200..300).contains(&c.status) {
            *accepted
                .entry(
                    c.event_id
                        .as_deref()
                        .expect("every request has a webhook-id"),
                )
                .or_default() += 1;
        }
    }
    let letters: BTreeMap<&str, &demo::DeadLetter> = (report.dead_letters.iter())
        .map(|d| (d.event_id.as_deref().expect("event-id kept"), d))
        .collect();
    assert_eq!(
        letters.len(),
        report.dead_letters.len(),
        "one dead letter per webhook at most:{summary}"
    );
    let of = |b: Behaviour| {
        (report.published.iter())
            .filter(move |p| Behaviour::of(&p.event.endpoint_id) == Some(b))
            .map(|p| p.event.event_id.as_str())
    };

    // Healthy, flaky, rate-limited and down endpoints: each webhook delivered exactly once,
    // none dead-lettered.
    for (b, webhooks) in [
        (Behaviour::Healthy, 120),
        (Behaviour::Flaky, 30),
        (Behaviour::RateLimited, 10),
        (Behaviour::Down, 20),
    ] {
        assert_eq!(of(b).count(), webhooks, "{b:?}");
        for id in of(b) {
            assert_eq!(
                accepted.get(id),
                Some(&1),
                "{id} ({b:?}) delivered exactly once:{summary}"
            );
            assert!(
                !letters.contains_key(id),
                "{id} ({b:?}) dead-lettered:{summary}"
            );
        }
    }

    // The gone endpoint: called once; all 10 webhooks dead-lettered as permanent, the one
    // that got the 410 with its words, the other 9 without a call, saying it is gone.
    assert_eq!(calls.get("gone-1"), Some(&1), "{summary}");
    let mut gone: Vec<&demo::DeadLetter> = of(Behaviour::Gone)
        .map(|id| {
            *letters
                .get(id)
                .unwrap_or_else(|| panic!("{id} not dead-lettered:{summary}"))
        })
        .collect();
    assert_eq!(gone.len(), 10);
    gone.sort_by_key(|d| d.attempts.clone());
    assert!(
        gone.iter().all(|d| d.failure_kind == "permanent"),
        "{gone:?}"
    );
    assert_eq!(
        (gone[9].attempts.as_str(), gone[9].error.as_str()),
        ("1", "gone-1: 410 Gone: this endpoint was deleted")
    );
    for d in &gone[..9] {
        assert_eq!(
            (d.attempts.as_str(), d.error.as_str()),
            (
                "0",
                "destination gone: gone-1: 410 Gone: this endpoint was deleted"
            )
        );
    }

    // The rejecting endpoint: each webhook called once, dead-lettered as permanent.
    assert_eq!(calls.get("rejecting-1"), Some(&10), "{summary}");
    for id in of(Behaviour::Rejecting) {
        let d = letters
            .get(id)
            .unwrap_or_else(|| panic!("{id} not dead-lettered:{summary}"));
        assert_eq!(d.failure_kind, "permanent");
        assert_eq!(d.attempts, "1");
        assert!(d.error.contains("422"), "{}", d.error);
    }

    // The down endpoints: they really were down while webhooks came (refused calls), their
    // breakers opened, every refused call was held (no attempt used: each was delivered as
    // attempt 1), and none of their webhooks was dead-lettered (above).
    let down_calls: Vec<&delivery::Call> = (report.calls.iter())
        .filter(|c| Behaviour::of(&c.endpoint_id) == Some(Behaviour::Down))
        .collect();
    let refused = (down_calls.iter())
        .filter(|c| matches!(&c.outcome, Outcome::Unavailable(e) if e.contains("cannot connect")))
        .count();
    assert!(refused >= 2, "each down endpoint refused a call:{summary}");
    assert!(
        (down_calls.iter())
            .filter(|c| c.outcome == Outcome::Delivered)
            .all(|c| c.attempt == 1),
        "{down_calls:?}"
    );
    for endpoint in ["down-1", "down-2"] {
        assert_eq!(
            report.opened.get(endpoint),
            Some(&false),
            "{endpoint}'s breaker opened:{summary}"
        );
    }
    assert_eq!(report.opened.get("gone-1"), Some(&true), "{summary}");

    // The rate-limited endpoint: it asked for pauses, and no call came within one.
    let pauses = calls_inside_pauses(&report.server_calls);
    assert!(
        !pauses.is_empty(),
        "ratelimited-1 answered 429 at least once:{summary}"
    );
    for (pause, inside) in &pauses {
        assert_eq!(pause.endpoint_id, "ratelimited-1");
        assert!(
            inside.is_empty(),
            "called within the {} s asked for: {inside:?}",
            pause.retry_after.unwrap_or_default()
        );
    }

    // The flaky endpoints: the webhook that failed its 3 in-place attempts went to the retry
    // tier and was delivered from there (above: exactly once).
    let from_tier = (report.calls.iter())
        .filter(|c| Behaviour::of(&c.endpoint_id) == Some(Behaviour::Flaky))
        .filter(|c| c.topic == format!("{topic}.retry.1") && c.outcome == Outcome::Delivered)
        .count();
    assert!(from_tier >= 3, "one per flaky endpoint at least:{summary}");

    // Nothing else: the dead-letter topic holds the gone and rejecting webhooks only, each
    // with its provenance; every webhook's offset is committed; six endpoints failing never
    // opened the consumer-wide breaker (it needs ten).
    let read = support::read_all(&format!("{topic}.dlt")).await;
    assert_eq!(read.len(), 20, "{summary}");
    for letter in &read {
        assert_eq!(letter.header_str(dlt::ORIGINAL_TOPIC), topic);
        let key = String::from_utf8_lossy(letter.key.as_deref().unwrap_or_default()).into_owned();
        assert!(
            key == "gone-1" || key == "rejecting-1",
            "dead letter for {key}"
        );
    }
    assert_eq!(report.uncommitted, 0, "{summary}");
    let breaker = report.breaker.as_ref().expect("the sender has a breaker");
    assert_eq!(
        (breaker.state, breaker.opened),
        (BreakerState::Closed, 0),
        "{summary}"
    );
    assert!(
        report.fates.iter().all(|f| !matches!(f, Fate::Unsettled)),
        "{summary}"
    );
    assert!(report.surprises().is_empty(), "{summary}");
}
