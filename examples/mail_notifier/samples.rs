//! Sample traffic: a handful of normal notifications plus one of each kind of trouble, and
//! how to publish them.
//!
//! Event ids are `<run id>-NN`, so the events of a new run are new events (not duplicates of
//! the previous run's, which the idempotency store remembers for 6 hours).

use std::time::Duration;

use anyhow::{Context as _, Result};
use kourier::rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use kourier::rdkafka::producer::FutureRecord;
use kourier::{Header, Publisher};

use crate::event::{EVENT_ID_HEADER, NotifyEvent};
use crate::smtp_server::{FLAKY_PREFIX, REJECTED_DOMAIN};

/// What the notifier should do with a sample record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Mailed on the first attempt.
    Mail,
    /// Deferred by the SMTP server once (`451`), mailed on a retry.
    MailAfterRetry,
    /// A second copy of an event already published: skipped, never mailed twice.
    Duplicate,
    /// Not JSON: dead-lettered as `decode`, the handler never sees it.
    Malformed,
    /// The SMTP server refuses the recipient (`550`): dead-lettered as `permanent`.
    Rejected,
    /// `to` is not an address: dead-lettered as `permanent` without talking to the server.
    InvalidAddress,
    /// Published while the SMTP server refuses connections: waits for it (the breaker
    /// opens, probes, closes), then mailed; never dead-lettered for the outage.
    MailAfterOutage,
}

/// The value of a sample record.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    Event(NotifyEvent),
    /// Raw bytes that are not a `NotifyEvent`.
    Malformed(Vec<u8>),
}

/// One record to publish.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) event_id: String,
    pub(crate) user_id: String,
    pub(crate) payload: Payload,
    pub(crate) expect: Expect,
}

/// A sample and where the broker stored it.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub(crate) sample: Sample,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// The sample records of run `run_id`, in publishing order.
pub(crate) fn samples(run_id: &str) -> Vec<Sample> {
    let event = |n: u32, user: &str, to: &str, subject: &str, body: &str, expect| {
        let event_id = format!("{run_id}-{n:02}");
        Sample {
            event_id: event_id.clone(),
            user_id: user.to_owned(),
            payload: Payload::Event(NotifyEvent {
                event_id,
                user_id: user.to_owned(),
                to: to.to_owned(),
                subject: subject.to_owned(),
                body: body.to_owned(),
            }),
            expect,
        }
    };
    let shipped = event(
        2,
        "bob",
        "Bob <bob@example.com>",
        "Your order #1042 has shipped",
        "Hi Bob,\r\n\r\nyour order is on its way.\r\n",
        Expect::Mail,
    );
    let duplicate = Sample {
        expect: Expect::Duplicate,
        ..shipped.clone()
    };
    let malformed_id = format!("{run_id}-04");
    vec![
        event(
            1,
            "alice",
            "Alice <alice@example.com>",
            "Welcome to Kourier",
            "Hi Alice,\r\n\r\nthanks for signing up.\r\n",
            Expect::Mail,
        ),
        shipped,
        event(
            3,
            "alice",
            "alice@example.com",
            "Your password was changed",
            "Hi Alice,\r\n\r\nif this was not you, tell us.\r\n",
            Expect::Mail,
        ),
        // The producer retried after a lost acknowledgement: the same event, published twice.
        duplicate,
        Sample {
            event_id: malformed_id.clone(),
            user_id: "carol".into(),
            payload: Payload::Malformed(
                format!("event_id={malformed_id}; to=carol@example.com; this is not JSON \u{fffd}")
                    .into_bytes(),
            ),
            expect: Expect::Malformed,
        },
        event(
            5,
            "dave",
            &format!("Dave <dave@{REJECTED_DOMAIN}>"),
            "Your invoice",
            "Hi Dave,\r\n\r\nyour invoice is attached.\r\n",
            Expect::Rejected,
        ),
        event(
            6,
            "erin",
            // The server greylists each such address once; the run id makes it new per run.
            &format!("Erin <{FLAKY_PREFIX}+{run_id}@example.com>"),
            "Your login code",
            "Hi Erin,\r\n\r\nyour code is 424242.\r\n",
            Expect::MailAfterRetry,
        ),
        event(
            7,
            "frank",
            "frank.example.com",
            "Welcome to Kourier",
            "Hi Frank,\r\n\r\nthanks for signing up.\r\n",
            Expect::InvalidAddress,
        ),
        event(
            8,
            "carol",
            "carol@example.com",
            "Your weekly digest",
            "Hi Carol,\r\n\r\nhere is what happened this week.\r\n",
            Expect::Mail,
        ),
        event(
            9,
            "bob",
            "bob@example.com",
            "Rate your delivery",
            "Hi Bob,\r\n\r\nhow did we do?\r\n",
            Expect::Mail,
        ),
    ]
}

/// The outage sample of run `run_id`: mails published while the SMTP server is down.
pub(crate) fn outage_samples(run_id: &str) -> Vec<Sample> {
    ["alice", "bob", "carol", "erin", "frank", "grace"]
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let event_id = format!("{run_id}-{:02}", 11 + i);
            Sample {
                event_id: event_id.clone(),
                user_id: (*user).to_owned(),
                payload: Payload::Event(NotifyEvent {
                    event_id,
                    user_id: (*user).to_owned(),
                    to: format!("{user}@example.com"),
                    subject: "Your monthly statement".to_owned(),
                    body: format!("Hi {user},\r\n\r\nyour statement is ready.\r\n"),
                }),
                expect: Expect::MailAfterOutage,
            }
        })
        .collect()
}

/// The typed publisher for `topic`: JSON values keyed by `user_id`, the event id as a header.
pub(crate) fn publisher(bootstrap: &str, topic: &str) -> Result<Publisher<NotifyEvent>> {
    Publisher::<NotifyEvent>::builder(bootstrap, topic)
        .key_fn(|e: &NotifyEvent| e.user_id.clone())
        .headers_fn(|e: &NotifyEvent| vec![Header::new(EVENT_ID_HEADER, e.event_id.as_bytes())])
        .send_timeout(Duration::from_secs(15))
        .build()
        .context("creating the publisher")
}

/// Publishes `samples` one after the other (so the duplicate follows its original) and returns
/// where each was stored. Events go through the typed [`Publisher`]; malformed values through
/// its plain rdkafka producer, which writes whatever bytes it is given.
pub(crate) async fn publish(
    publisher: &Publisher<NotifyEvent>,
    samples: Vec<Sample>,
) -> Result<Vec<Published>> {
    let mut published = Vec::with_capacity(samples.len());
    for sample in samples {
        let (partition, offset) = match &sample.payload {
            Payload::Event(event) => {
                let d = publisher
                    .send(event)
                    .await
                    .with_context(|| format!("publishing event {}", sample.event_id))?;
                (d.partition, d.offset)
            }
            Payload::Malformed(bytes) => {
                let headers = OwnedHeaders::new().insert(KafkaHeader {
                    key: EVENT_ID_HEADER,
                    value: Some(sample.event_id.as_bytes()),
                });
                let record = FutureRecord::to(publisher.topic())
                    .key(sample.user_id.as_bytes())
                    .payload(bytes.as_slice())
                    .headers(headers);
                let d = publisher
                    .producer()
                    .send(record, Duration::from_secs(15))
                    .await
                    .map_err(|(e, _)| e)
                    .with_context(|| format!("publishing malformed record {}", sample.event_id))?;
                (d.partition, d.offset)
            }
        };
        published.push(Published {
            sample,
            partition,
            offset,
        });
    }
    publisher.flush(Duration::from_secs(15)).await?;
    Ok(published)
}
