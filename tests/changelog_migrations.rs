//! Every migration line of CHANGELOG.md's `[Unreleased]` section, as written, against the
//! current API: each function below holds one entry's "after" code (the changelog's text,
//! with its placeholders — `..`, `g`, `n` — filled in), so a change that breaks a migration
//! line fails to compile here, and the changelog is fixed with it. Entries whose migration is
//! not Rust (Cargo features, commands) are not here.
//!
//! Most functions only need to compile; the test at the end runs the ones that need no
//! broker. Needs no services.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kourier::rdkafka::producer::FutureProducer;
use kourier::tiers::{Admission, LedgerKey};
use kourier::{
    Claim, ClaimToken, DeadLetter, DeadLetterError, DeadLetterReason, DeadLetterReceipt,
    DeadLetterSink, DedupKey, Error, FailureKind, Header, Headers, Idempotency, IdempotencyStore,
    InMemoryIdempotencyStore, Message, MissingTopics, PendingLetter, ProcessingOrder, Publisher,
    RawRecord, RetryDecision, RetryingConsumer, RetryingConsumerBuilder, ShutdownReport,
    StoreError, handler_fn,
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Ev {
    id: String,
}

fn builder() -> RetryingConsumerBuilder<impl kourier::Handler<Event = Ev>> {
    RetryingConsumer::builder(handler_fn(|_m: Message<Ev>| async { Ok(()) }))
}

// ───────────── Changed ─────────────

/// **dead-letter**: every `DeadLetterSink` method is required (a sink of its own).
#[derive(Debug)]
struct OwnSink;

#[async_trait]
impl DeadLetterSink for OwnSink {
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        let _ = letter;
        unimplemented!()
    }
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        self.send(letter)
    }
    fn topics_for(&self, _: &str) -> Vec<String> {
        Vec::new()
    }
}

/// **dead-letter**: ... in a wrapper, forward both.
#[derive(Debug)]
struct WrapperSink {
    inner: kourier::KafkaDeadLetterSink,
}

#[async_trait]
impl DeadLetterSink for WrapperSink {
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        self.inner.send(letter).await
    }
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        self.inner.enqueue(letter).await
    }
    fn topics_for(&self, source_topic: &str) -> Vec<String> {
        self.inner.topics_for(source_topic)
    }
}

/// **idempotency**: every `IdempotencyStore` method is required (a store of its own that
/// cannot renew).
#[derive(Debug)]
struct OwnStore(InMemoryIdempotencyStore);

#[async_trait]
impl IdempotencyStore for OwnStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        self.0.claim(key, lease).await
    }
    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.0.complete(key, token, ttl).await
    }
    async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }
    async fn claim_many(&self, keys: &[&str], lease: Duration) -> Vec<Result<Claim, StoreError>> {
        kourier::idempotency::claim_one_by_one(self, keys, lease).await
    }
    async fn complete_many(
        &self,
        claims: &[(&str, &ClaimToken)],
        ttl: Duration,
    ) -> Vec<Result<(), StoreError>> {
        kourier::idempotency::complete_one_by_one(self, claims, ttl).await
    }
    async fn renew(&self, _: &str, _: &ClaimToken, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::Unsupported { operation: "renew" })
    }
}

/// **record**: `RawRecord` is `#[non_exhaustive]`.
fn raw_record_builder(record: RawRecord, key: Option<kourier::RecordBytes>) -> [RawRecord; 3] {
    let built = RawRecord::builder("t")
        .partition(1)
        .offset(7)
        .key("k")
        .value("v")
        .timestamp(1)
        .build();
    let mut r = RawRecord::builder("t").build();
    r.key = key;
    let from_elsewhere = r;
    let mut r = record.clone();
    r.offset = 8;
    [built, from_elsewhere, r]
}

/// **tiers**: `LedgerKey` and `Admission` are `#[non_exhaustive]`.
fn ledger_key() -> LedgerKey<'static> {
    LedgerKey::new("g", "t", b"k")
}

fn match_admission(admission: Admission) -> Option<u32> {
    match admission {
        Admission::Run { .. } => None,
        Admission::Defer(tier) => Some(tier),
        _ => None,
    }
}

/// **publisher**: `Publisher::producer()` returns `FutureProducer<ThrottledLogContext>`.
fn publisher_producer(publisher: &Publisher<Ev>) {
    let p: FutureProducer<kourier::ThrottledLogContext> = publisher.producer();
    let _ = p;
}

/// **record**: fewer heap allocations: `RawRecord::topic` is an `Arc<str>`, keys and values
/// `RecordBytes`.
fn record_bytes(mut record: RawRecord, v: Vec<u8>, b: &[u8], s: String) -> (String, Vec<u8>) {
    let read = &*record.topic;
    assert_eq!(read.len(), record.topic.len());
    let topic: String = record.topic.to_string();
    record.topic = "t".into();
    record.topic = String::into(s.clone());
    let _: Option<&[u8]> = record.value.as_deref();
    record.key = Some("k".into());
    let _: kourier::RecordBytes = v.into();
    let _: kourier::RecordBytes = b.into();
    let _: kourier::RecordBytes = s.into();
    let copied = record
        .value
        .as_ref()
        .map(|v| v.to_vec())
        .unwrap_or_default();
    (topic, copied)
}

/// **headers**: a header name is bytes.
fn header_names(h: &Header, s: String, v: Vec<u8>, mut headers: Headers) -> (bool, Header, Header) {
    let named = h.is_named("x");
    let _: Option<&str> = h.key_str();
    let _ = h.key_escaped();
    let built = Header::new(s.clone(), v.clone());
    let literal = Header {
        key: s.into(),
        value: Some(v.into()),
    };
    headers.remove("x");
    (named, built, literal)
}

/// **consumer**: `build()` rejects a `handler_timeout` not below the idempotency lease.
fn lease_above_timeout(
    store: Arc<dyn IdempotencyStore>,
    key: DedupKey<Ev>,
    timeout: Duration,
    margin: Duration,
) {
    let _ = builder()
        .handler_timeout(timeout)
        .idempotency(Idempotency::new(store, key).with_lease(timeout + margin));
}

/// **api**: one path per public item; `DeadLetterCounts`, `java_partition` moved.
fn paths() {
    let _: Option<kourier::DeadLetterReason> = None;
    let _: Option<&dyn kourier::IdempotencyStore> = None;
    let _: Option<(kourier::DeadLetter, kourier::DeadLetterReceipt)> = None;
    let _: Option<(kourier::DeadLetterError, kourier::KafkaDeadLetterSink)> = None;
    let _: Option<(kourier::Claim, kourier::ClaimToken, kourier::StoreError)> = None;
    let _: Option<kourier::InMemoryIdempotencyStore> = None;
    #[cfg(feature = "redis")]
    let _: Option<kourier::RedisIdempotencyStore> = None;
    let _: Option<&dyn kourier::DeadLetterSink> = None;
    let _: Option<kourier::metrics::DeadLetterCounts> = None;
    let _ = kourier::topics::java_partition(b"k", 6);
}

/// **dead_letter**: `DeadLetter` is `#[non_exhaustive]`.
fn dead_letter(record: RawRecord, reason: DeadLetterReason, error: String, n: u32) -> DeadLetter {
    let mut l = DeadLetter::new(record, reason, error);
    l.attempts = n;
    l
}

/// **api**: `Claim`, `RetryDecision` and `Delivery` are `#[non_exhaustive]`.
fn non_exhaustive_matches(claim: Claim, decision: RetryDecision, delivery: kourier::Delivery) {
    let _acquired = match claim {
        Claim::Acquired(_) => true,
        Claim::Done | Claim::Busy => false,
        _ => false,
    };
    let _ = match decision {
        RetryDecision::GiveUp => None,
        _ => Some(()),
    };
    let _ = (delivery.partition, delivery.offset);
}

/// **handler**: `Message::into_event` requires `T: Clone`.
fn into_event(message: Message<Ev>) -> (String, Ev) {
    let id = message.event().id.clone();
    (id, message.into_event())
}

/// **idempotency**: `DedupKey` is opaque.
fn dedup_key(h: &str) {
    let _: DedupKey<Ev> = DedupKey::header(h);
    let _ = DedupKey::from_fn(|m: &Message<Ev>| Some(m.event().id.clone()));
}

/// **consumer**: `kourier::Ordering` is renamed `kourier::ProcessingOrder`.
fn processing_order() {
    let _ = builder().ordering(ProcessingOrder::Key);
}

/// **consumer**: `build()` refuses `group.id` and `bootstrap.servers` in `kafka_config`.
fn setters(g: &str, s: &str) {
    let _ = builder().group_id(g).bootstrap_servers(s);
}

/// **consumer**: `run` / `run_until_signal` return `Result<ShutdownReport>`.
async fn run_report(
    consumer: RetryingConsumer<impl kourier::Handler>,
    signal: impl std::future::Future<Output = ()> + Send,
) -> kourier::Result<()> {
    consumer.run(signal).await?.into_result()?;
    Ok(())
}

fn clean(report: &ShutdownReport) -> bool {
    report.is_clean()
}

/// **consumer**: topics must exist when `run()` starts.
fn create_missing(partitions: u16) {
    let _ = builder().missing_topics(MissingTopics::create(partitions));
    let _ = kourier::topics::TopicAdmin::ensure;
}

/// **handler**: a panicking handler is `FailureKind::Panic`.
fn panic_kinds(
    kind: FailureKind,
    reason: DeadLetterReason,
    counts: kourier::metrics::DeadLetterCounts,
) -> u64 {
    let _ = matches!(kind, FailureKind::Panic) || matches!(reason, DeadLetterReason::Panic);
    counts.panic
}

/// **error**: `Error::Config` no longer reports its `ConfigError` as `source()`.
fn config_error(error: &Error) -> Option<&kourier::ConfigError> {
    match error {
        Error::Config(e) => Some(e),
        _ => None,
    }
}

/// **consumer** (behaviour change): to wait longer on a revoke, raise
/// `max.poll.interval.ms`.
fn long_revoke() {
    let _ = builder()
        .kafka_config("max.poll.interval.ms", "900000")
        .revoke_timeout(Duration::from_secs(600));
}

#[test]
fn the_migrations_that_need_no_broker_do_what_the_changelog_says() {
    let record = RawRecord::builder("t").offset(7).build();
    let [built, elsewhere, moved] = raw_record_builder(record.clone(), Some("k2".into()));
    assert_eq!(
        (
            built.coordinates(),
            built.key.as_deref(),
            built.value.as_deref()
        ),
        ("t/1@7".to_owned(), Some(&b"k"[..]), Some(&b"v"[..]))
    );
    assert_eq!((built.timestamp, built.log_append_time), (Some(1), false));
    assert_eq!(elsewhere.key.as_deref(), Some(&b"k2"[..]));
    assert_eq!(
        (moved.offset, moved.topic.clone()),
        (8, record.topic.clone())
    );

    let (topic, _) = record_bytes(record.clone(), vec![1], &[2], "s".into());
    assert_eq!(topic, "t");

    let (named, built, literal) = header_names(
        &Header::new("x", "1"),
        "n".into(),
        b"v".to_vec(),
        Headers::new().with("x", "1").with("y", "2"),
    );
    assert!(named);
    assert_eq!(built, literal, "Header::new is the literal's equivalent");

    let letter = dead_letter(record, DeadLetterReason::Permanent, "e".into(), 3);
    assert_eq!(letter.attempts, 3);

    let key = ledger_key();
    assert_eq!((key.group, key.topic, key.key), ("g", "t", &b"k"[..]));
    assert_eq!(match_admission(Admission::Defer(2)), Some(2));
}

#[tokio::test]
async fn a_store_of_its_own_answers_batches_one_by_one_and_cannot_renew() {
    let store = OwnStore(InMemoryIdempotencyStore::new());
    let lease = Duration::from_secs(30);
    let answers = store.claim_many(&["a", "b"], lease).await;
    let tokens: Vec<ClaimToken> = answers
        .into_iter()
        .map(|a| match a {
            Ok(Claim::Acquired(t)) => t,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(matches!(
        store.renew("a", &tokens[0], lease).await,
        Err(StoreError::Unsupported { operation: "renew" })
    ));
    let done = store
        .complete_many(&[("a", &tokens[0]), ("b", &tokens[1])], lease)
        .await;
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    assert_eq!(store.claim("b", lease).await.unwrap(), Claim::Done);
}
