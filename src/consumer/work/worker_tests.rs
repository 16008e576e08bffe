//! Broker-free tests of the per-record pipeline (decode → claim → handle → retry →
//! dead-letter → complete/release), driven through [`WorkerContext::process`] with a scripted
//! handler, a recording dead-letter sink, the in-memory idempotency store and paused time.
//!
//! Every helper that touches the worker's interface sits in the "harness" section, so an
//! interface change is fixed there once.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt as _;
use serde::Deserialize;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{KeepSlot, WorkerContext};
use crate::codec::{Codec, DecodeError, JsonCodec};
use crate::consumer::breaker::{Breaker, BreakerPolicy, OutageGate, ProbeMemo};
use crate::consumer::dedup::{Dedup, DedupKey};
use crate::consumer::schedule::{JobEnd, Stop};
use crate::dead_letter::{
    DeadLetter, DeadLetterError, DeadLetterReason, DeadLetterReceipt, DeadLetterSink, PendingLetter,
};
use crate::handler::{Handler, HandlerError};
use crate::idempotency::memory::InMemoryIdempotencyStore;
use crate::idempotency::testing::{CannotRenew, HookedStore, StoreAnswer, StoreCall, StoreHook};
use crate::idempotency::{Claim, ClaimToken, IdempotencyStore, StoreError};
use crate::message::Message;
use crate::metrics::ConsumerMetrics;
use crate::record::{Headers, RawRecord};
use crate::retry::RetryPolicy;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(6 * 3600);

/// The dead-letter reason of a record whose handler panicked on every attempt. Today a panic is
/// an ordinary transient failure; change this one line if panics get their own kind.
const PANIC_EXHAUSTED: DeadLetterReason = DeadLetterReason::Panic;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Debug, Deserialize)]
struct Order {
    id: String,
}

/// A record of `TOPIC` with a key, a binary header and the given value.
fn raw(value: Option<&[u8]>) -> RawRecord {
    RawRecord {
        topic: TOPIC.into(),
        partition: 3,
        offset: 42,
        key: Some(b"customer-7".into()),
        value: value.map(Into::into),
        headers: Headers::new().with("origin", b"\xff\x00bin".to_vec()),
        timestamp: Some(1_700_000_000_000),
        log_append_time: false,
    }
}

/// A well-formed order event.
fn order(id: &str) -> RawRecord {
    raw(Some(format!(r#"{{"id":"{id}"}}"#).as_bytes()))
}

/// The store key the worker uses for order `id`: namespaced by the consumer group.
fn store_key(id: &str) -> String {
    format!("{GROUP}:{id}")
}

/// What a fresh claim on a key says, seen from outside the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    /// Claimable: never claimed, released, or its lease lapsed.
    Free,
    /// Another token holds a live claim.
    Held,
    /// Completed.
    Done,
}

/// Looks at a key without disturbing it: a probe claim that acquires is released at once.
async fn key_state(store: &InMemoryIdempotencyStore, key: &str) -> KeyState {
    match store.claim(key, LEASE).await.expect("in-memory claim") {
        Claim::Acquired(token) => {
            store.release(key, &token).await.expect("release the probe");
            KeyState::Free
        }
        Claim::Busy => KeyState::Held,
        Claim::Done => KeyState::Done,
    }
}

async fn acquire(store: &InMemoryIdempotencyStore, key: &str, lease: Duration) -> ClaimToken {
    match store.claim(key, lease).await.expect("in-memory claim") {
        Claim::Acquired(token) => token,
        other => panic!("expected to acquire {key}, got {other:?}"),
    }
}

/// What the handler does on one attempt.
#[derive(Debug, Clone, Copy)]
enum Step {
    Succeed,
    Transient,
    /// Transient, asking for the next attempt no sooner than this.
    Throttled(Duration),
    /// Permanent, with a retry-after hint the worker must ignore.
    Permanent,
    Panic,
    /// Sleeps this long, then succeeds.
    Stall(Duration),
    /// A downstream outage: transient until this paused time, then success.
    DownUntil(Duration),
    /// The handler says "unavailable" until this paused time, then succeeds.
    UnavailableUntil(Duration),
}

use Step::{DownUntil, Panic, Permanent, Stall, Succeed, Throttled, Transient, UnavailableUntil};

/// One handler call as the handler saw it.
#[derive(Debug, Clone, PartialEq)]
struct Call {
    attempt: u32,
    /// Paused time since the harness was built.
    at: Duration,
    order: String,
    /// The record's store key as a fresh claim saw it during the call (with an in-memory store).
    key: Option<KeyState>,
    /// The claim token the message carried.
    token: Option<ClaimToken>,
}

/// Plays `steps`: attempt n runs `steps[n - 1]`, the last step repeats.
struct ScriptedHandler {
    steps: Vec<Step>,
    t0: Instant,
    probe: Option<InMemoryIdempotencyStore>,
    calls: Mutex<Vec<Call>>,
    /// For each attempt told its lane's next records: their order ids (see
    /// `Handler::handle_in_lane`).
    lanes: Mutex<Vec<Vec<String>>>,
}

#[async_trait]
impl Handler for ScriptedHandler {
    type Event = Order;

    fn handle_in_lane<'a>(
        &'a self,
        message: &'a Message<Order>,
        lane: crate::handler::sealed::Lane<'_, Order>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>> {
        let ahead = lane.ahead(10);
        let ids = ahead.iter().map(|m| m.event().id.clone()).collect();
        self.lanes.lock().unwrap().push(ids);
        // Kept while the attempt runs, as the batch adapter keeps them while their batch runs.
        Box::pin(async move {
            let _in_the_batch = ahead;
            self.handle(message).await
        })
    }

    async fn handle(&self, message: &Message<Order>) -> Result<(), HandlerError> {
        let attempt = message.attempt();
        let key = match &self.probe {
            Some(store) => Some(key_state(store, &store_key(&message.event().id)).await),
            None => None,
        };
        self.calls.lock().unwrap().push(Call {
            attempt,
            at: self.t0.elapsed(),
            order: message.event().id.clone(),
            key,
            token: message.claim_token().cloned(),
        });
        let step = self.steps[(attempt as usize)
            .saturating_sub(1)
            .min(self.steps.len() - 1)];
        match step {
            Succeed => Ok(()),
            Transient => Err(HandlerError::transient(format!(
                "smtp 451 on attempt {attempt}"
            ))),
            Throttled(d) => Err(HandlerError::transient("429 too many requests").retry_after(d)),
            Permanent => Err(HandlerError::permanent(format!(
                "mailbox unknown on attempt {attempt}"
            ))
            .retry_after(secs(60))),
            Panic => panic!("boom on attempt {attempt}"),
            Stall(d) => {
                sleep(d).await;
                Ok(())
            }
            DownUntil(t) if self.t0.elapsed() < t => {
                Err(HandlerError::transient("connection refused"))
            }
            UnavailableUntil(t) if self.t0.elapsed() < t => {
                Err(HandlerError::unavailable("connection refused"))
            }
            DownUntil(_) | UnavailableUntil(_) => Ok(()),
        }
    }
}

/// Takes one from a countdown; `u32::MAX` means "always".
fn take_one(left: &AtomicU32) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// A dead-letter sink that fails (or panics) a given number of times, then acknowledges.
#[derive(Debug)]
struct RecordingSink {
    t0: Instant,
    panics_left: AtomicU32,
    failures_left: AtomicU32,
    /// Paused time of every `send` call, failed ones included.
    sends: Mutex<Vec<Duration>>,
    /// The letters acknowledged.
    acked: Mutex<Vec<DeadLetter>>,
}

#[async_trait]
impl DeadLetterSink for RecordingSink {
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        self.sends.lock().unwrap().push(self.t0.elapsed());
        if take_one(&self.panics_left) {
            panic!("sink bug");
        }
        if take_one(&self.failures_left) {
            return Err(DeadLetterError {
                coordinates: letter.record.coordinates(),
                destination: format!("{TOPIC}.dlt"),
                source: "broker unreachable".into(),
            });
        }
        let mut acked = self.acked.lock().unwrap();
        acked.push(letter.clone());
        Ok(DeadLetterReceipt {
            topic: format!("{TOPIC}.dlt"),
            partition: Some(letter.record.partition),
            offset: Some(acked.len() as i64 - 1),
        })
    }
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        self.send(letter) // through the failures and panics above
    }
    fn topics_for(&self, _source_topic: &str) -> Vec<String> {
        Vec::new()
    }
}

/// Faults of an in-memory store ([`FlakyStore::hooked`]): it answers `Unavailable` to every
/// call while `down`, and logs the token calls it answered; optionally a broken one whose every renewal drops the claim and
/// says it is lost (`forget_on_renew`), or a slow one whose completions take
/// `complete_delay`.
#[derive(Debug, Default)]
struct FlakyStore {
    inner: InMemoryIdempotencyStore,
    down: AtomicBool,
    forget_on_renew: bool,
    complete_delay: Duration,
    claim_delay: Duration,
    claims: AtomicU32,
    /// `(operation, token, ok)` of every `renew`, `complete` and `release`, with the paused
    /// time it was answered at.
    log: Mutex<Vec<(&'static str, ClaimToken, bool, Instant)>>,
}

impl FlakyStore {
    fn down() -> Arc<Self> {
        let store = FlakyStore::default();
        store.down.store(true, Ordering::SeqCst);
        Arc::new(store)
    }

    fn up() -> Arc<Self> {
        Arc::new(FlakyStore::default())
    }

    /// Claims succeed; every renewal drops the claim and says it is lost (a broken store).
    fn forgetful() -> Arc<Self> {
        Arc::new(FlakyStore {
            forget_on_renew: true,
            ..FlakyStore::default()
        })
    }

    /// `inner`, whose completions (marking done) take `delay`.
    fn slow_complete(inner: InMemoryIdempotencyStore, delay: Duration) -> Arc<Self> {
        Arc::new(FlakyStore {
            inner,
            complete_delay: delay,
            ..FlakyStore::default()
        })
    }

    /// Up, answering its first claim after `delay` (the others at once).
    fn slow_claim(delay: Duration) -> Arc<Self> {
        Arc::new(FlakyStore {
            claim_delay: delay,
            ..FlakyStore::default()
        })
    }

    /// The store these faults happen to: `inner` behind this hook, one key at a time (so
    /// batches go down with the single calls).
    fn hooked(self: &Arc<Self>) -> Arc<dyn IdempotencyStore> {
        let inner = Arc::new(self.inner.clone());
        Arc::new(HookedStore::new(inner, self.clone()).one_by_one())
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn note(&self, op: &'static str, token: &ClaimToken, result: &Result<(), StoreError>) {
        self.log
            .lock()
            .unwrap()
            .push((op, token.clone(), result.is_ok(), Instant::now()));
    }

    /// `(token, ok)` of the calls of `op`.
    fn calls_of(&self, op: &str) -> Vec<(ClaimToken, bool)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.0 == op)
            .map(|c| (c.1.clone(), c.2))
            .collect()
    }

    /// When the `renew` calls were answered.
    fn renew_times(&self) -> Vec<Instant> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.0 == "renew")
            .map(|c| c.3)
            .collect()
    }

    fn check(&self, operation: &'static str) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                operation,
                source: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl StoreHook for FlakyStore {
    async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
        match *call {
            StoreCall::Claim { .. } => {
                let first = self.claims.fetch_add(1, Ordering::SeqCst) == 0;
                if first {
                    tokio::time::sleep(self.claim_delay).await;
                }
            }
            StoreCall::Complete { .. } if !self.complete_delay.is_zero() => {
                tokio::time::sleep(self.complete_delay).await;
            }
            StoreCall::Renew { key, token, .. } if self.forget_on_renew => {
                self.check("renew")?;
                // Drop the claim and say so: the key is free again at once.
                self.inner.release(key, token).await?;
                return Err(StoreError::LeaseLost {
                    key: key.to_owned(),
                });
            }
            _ => {}
        }
        self.check(call.operation())
    }

    fn after(&self, call: &StoreCall<'_>, answer: StoreAnswer<'_>) {
        if let (Some(token), StoreAnswer::TokenCall(result)) = (call.token(), answer) {
            self.note(call.operation(), token, result);
        }
    }
}

/// A codec that panics: a bug in user code outside the handler.
struct PanickingCodec;

impl Codec<Order> for PanickingCodec {
    fn decode(&self, _: &RawRecord) -> Result<Order, DecodeError> {
        panic!("codec bug")
    }
}

/// How to build a worker for one test.
struct Setup {
    steps: Vec<Step>,
    policy: RetryPolicy,
    handler_timeout: Option<Duration>,
    codec: Arc<dyn Codec<Order>>,
    sink_failures: u32,
    sink_panics: u32,
    store: Option<Arc<dyn IdempotencyStore>>,
    probe: Option<InMemoryIdempotencyStore>,
    lease: Duration,
    run_without_store_on_outage: bool,
    retry_panics: bool,
    stall_threshold: Duration,
    dedup_key_panics: bool,
    /// Dedup by this header instead of the order id.
    dedup_header: Option<&'static str>,
    breaker: Option<BreakerPolicy>,
    destinations: Option<crate::Destinations<Order>>,
    /// Transactional output (a producer that never connects: nothing is committed for real).
    transactional: bool,
}

/// A worker whose handler plays `steps`, with `RetryPolicy::fixed(500 ms, 3)` (4 attempts),
/// JSON decoding, no dedup, no handler timeout and a sink that acknowledges everything.
/// Order `o-1`, whose handler stalls for `stall`, with its claim in a store that is up and
/// a 3 s lease: the store, the order's dedup key, the harness.
fn stalled_claim(stall: Duration) -> (Arc<FlakyStore>, String, Harness) {
    let store = FlakyStore::up();
    let h = script([Stall(stall)])
        .dedup_in(store.hooked())
        .lease(secs(3))
        .build();
    (store, store_key("o-1"), h)
}

fn script(steps: impl Into<Vec<Step>>) -> Setup {
    let steps = steps.into();
    assert!(!steps.is_empty(), "a script needs a step");
    Setup {
        steps,
        policy: RetryPolicy::fixed(ms(500), 3),
        handler_timeout: None,
        codec: Arc::new(JsonCodec::<Order>::new()),
        sink_failures: 0,
        sink_panics: 0,
        store: None,
        probe: None,
        lease: LEASE,
        run_without_store_on_outage: false,
        retry_panics: true,
        stall_threshold: secs(3600),
        dedup_key_panics: false,
        dedup_header: None,
        breaker: None,
        destinations: None,
        transactional: false,
    }
}

impl Setup {
    fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn handler_timeout(mut self, limit: Duration) -> Self {
        self.handler_timeout = Some(limit);
        self
    }

    fn codec(mut self, codec: impl Codec<Order>) -> Self {
        self.codec = Arc::new(codec);
        self
    }

    fn sink_failures(mut self, n: u32) -> Self {
        self.sink_failures = n;
        self
    }

    fn sink_panics(mut self, n: u32) -> Self {
        self.sink_panics = n;
        self
    }

    /// Dedup by order id in `store`; the handler records the key's state on every call.
    fn dedup(mut self, store: &InMemoryIdempotencyStore) -> Self {
        self.store = Some(Arc::new(store.clone()));
        self.probe = Some(store.clone());
        self
    }

    /// Dedup by order id in any store (no probing from the handler).
    fn dedup_in(mut self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.store = Some(store);
        self
    }

    fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    fn run_without_store_on_outage(mut self) -> Self {
        self.run_without_store_on_outage = true;
        self
    }

    fn retry_panics(mut self, retry: bool) -> Self {
        self.retry_panics = retry;
        self
    }

    fn stall_threshold(mut self, threshold: Duration) -> Self {
        self.stall_threshold = threshold;
        self
    }

    fn breaker(mut self, policy: BreakerPolicy) -> Self {
        self.breaker = Some(policy);
        self
    }

    fn destinations(mut self, destinations: crate::Destinations<Order>) -> Self {
        self.destinations = Some(destinations);
        self
    }

    /// Transactional output, with a producer that never connects: its transactions commit
    /// only when the test says so ([`Transactions::committed_without_broker`]).
    ///
    /// [`Transactions::committed_without_broker`]: crate::consumer::transaction::Transactions::committed_without_broker
    fn transactional(mut self) -> Self {
        self.transactional = true;
        self
    }

    /// Dedup in `store` by the value of header `name` (no decoding needed).
    fn dedup_by_header(mut self, store: &InMemoryIdempotencyStore, name: &'static str) -> Self {
        self.store = Some(Arc::new(store.clone()));
        self.dedup_header = Some(name);
        self
    }

    /// Dedup in `store` with a key function that panics.
    fn panicking_dedup_key(mut self, store: &InMemoryIdempotencyStore) -> Self {
        self.store = Some(Arc::new(store.clone()));
        self.dedup_key_panics = true;
        self
    }

    fn build(self) -> Harness {
        let t0 = Instant::now();
        let handler = Arc::new(ScriptedHandler {
            steps: self.steps,
            t0,
            probe: self.probe,
            calls: Mutex::new(Vec::new()),
            lanes: Mutex::new(Vec::new()),
        });
        let sink = Arc::new(RecordingSink {
            t0,
            panics_left: AtomicU32::new(self.sink_panics),
            failures_left: AtomicU32::new(self.sink_failures),
            sends: Mutex::new(Vec::new()),
            acked: Mutex::new(Vec::new()),
        });
        let key_panics = self.dedup_key_panics;
        let header = self.dedup_header;
        let dedup = self.store.map(|store| {
            let key = match header {
                Some(name) => DedupKey::header(name),
                None => DedupKey::from_fn(move |m: &Message<Order>| {
                    assert!(!key_panics, "no key for {}", m.event().id);
                    Some(m.event().id.clone())
                }),
            };
            Dedup::new(
                store,
                key,
                GROUP.to_owned(),
                (self.lease, TTL),
                self.run_without_store_on_outage,
            )
        });
        let metrics = Arc::new(ConsumerMetrics::new(GROUP, &[TOPIC.to_owned()]));
        let worker = WorkerContext {
            handler: handler.clone(),
            codec: self.codec,
            policy: self.policy,
            sink: sink.clone(),
            dedup,
            group_id: GROUP.to_owned(),
            handler_timeout: self.handler_timeout,
            retry_panics: self.retry_panics,
            stall_threshold: self.stall_threshold,
            metrics: metrics.clone(),
            observer: None,
            outage: OutageGate(self.breaker.map(|p| {
                let breaker = Breaker::new(p, metrics.clone());
                Arc::new(if self.destinations.is_some() {
                    breaker.by_destination()
                } else {
                    breaker
                })
            })),
            tiers: None,
            destinations: self.destinations.map(|of| super::DestinationGate {
                breakers: Arc::new(crate::consumer::breaker::DestinationBreakers::new(
                    of.rules(),
                    metrics.clone(),
                    Duration::from_secs(30),
                )),
                park_after: None,
                of,
            }),
            transactions: self.transactional.then(|| {
                let output = crate::transactional::TransactionalOutput::new("unit-test");
                Arc::new(
                    crate::consumer::transaction::Transactions::new(
                        "127.0.0.1:1",
                        Vec::new(),
                        &output,
                    )
                    .expect("a transactional producer (it does not connect)"),
                )
            }),
        };
        Harness {
            worker,
            handler,
            sink,
            cancel: CancellationToken::new(),
            t0,
        }
    }
}

struct Harness {
    worker: WorkerContext<ScriptedHandler>,
    handler: Arc<ScriptedHandler>,
    sink: Arc<RecordingSink>,
    cancel: CancellationToken,
    t0: Instant,
}

impl Harness {
    /// Runs one record to its end: how it ended and when (paused time since the build).
    /// A record still running after an hour of paused time fails the test instead of hanging.
    async fn process(&self, record: RawRecord) -> (JobEnd, Duration) {
        let run = self.worker.process(Arc::new(record), &self.cancel);
        let end = tokio::time::timeout(Duration::from_secs(3600), run)
            .await
            .expect("the record never ended");
        (end, self.t0.elapsed())
    }

    /// Runs order `id` and meanwhile, at paused time `at`, looks at its key in `store`: how
    /// the record ended, and the key's state then.
    async fn process_looking_at(
        &self,
        id: &str,
        store: &InMemoryIdempotencyStore,
        at: Duration,
    ) -> (JobEnd, KeyState) {
        let look = async {
            sleep_until(self.t0 + at).await;
            key_state(store, &store_key(id)).await
        };
        let ((end, _), state) = tokio::join!(self.process(order(id)), look);
        (end, state)
    }

    /// Runs one record whose partition starts draining (revoke, shutdown) at paused time
    /// `at`: how it ended and when.
    async fn process_draining_at(&self, record: RawRecord, at: Duration) -> (JobEnd, Duration) {
        self.process_draining(record, at, None).await
    }

    /// As [`Harness::process_draining_at`], with the drain's deadline at paused time
    /// `deadline` (what a revoke or shutdown sets).
    async fn process_draining_at_until(
        &self,
        record: RawRecord,
        at: Duration,
        deadline: Duration,
    ) -> (JobEnd, Duration) {
        self.process_draining(record, at, Some(deadline)).await
    }

    async fn process_draining(
        &self,
        record: RawRecord,
        at: Duration,
        deadline: Option<Duration>,
    ) -> (JobEnd, Duration) {
        let stop = Stop::default();
        let drain = stop.drain.clone();
        let give_up_by = stop.give_up_by.clone();
        let t0 = self.t0;
        tokio::spawn(async move {
            sleep_until(t0 + at).await;
            if let Some(deadline) = deadline {
                let _ = give_up_by.set(t0 + deadline);
            }
            drain.cancel();
        });
        self.process_with(record, &stop).await
    }

    /// Runs one record with the given stop signals: how it ended and when.
    async fn process_with(&self, record: RawRecord, stop: &Stop) -> (JobEnd, Duration) {
        let run = self.worker.run_job(Arc::new(record), stop, &KeepSlot);
        let end = tokio::time::timeout(Duration::from_secs(3600), run)
            .await
            .expect("the record never ended");
        (end, self.t0.elapsed())
    }

    /// Runs one record, without stop signals, in `slot`: how it ended.
    async fn process_in(&self, record: RawRecord, slot: &ReleaseProbe) -> JobEnd {
        self.worker
            .run_job(Arc::new(record), &Stop::default(), slot)
            .await
    }

    fn counts(&self) -> &crate::metrics::OutcomeCounts {
        &self.worker.metrics.counts
    }

    /// Cancels the record's token at paused time `at`.
    async fn cancel_at(&self, at: Duration) {
        sleep_until(self.t0 + at).await;
        self.cancel.cancel();
    }

    fn calls(&self) -> Vec<Call> {
        self.handler.calls.lock().unwrap().clone()
    }

    fn attempts(&self) -> Vec<u32> {
        self.calls().iter().map(|c| c.attempt).collect()
    }

    fn call_times(&self) -> Vec<Duration> {
        self.calls().iter().map(|c| c.at).collect()
    }

    /// Letters the sink acknowledged.
    fn letters(&self) -> Vec<DeadLetter> {
        self.sink.acked.lock().unwrap().clone()
    }

    fn only_letter(&self) -> DeadLetter {
        let mut letters = self.letters();
        assert_eq!(letters.len(), 1, "expected exactly one dead letter");
        letters.remove(0)
    }

    /// Times of every `send` call, failed ones included.
    fn sends(&self) -> Vec<Duration> {
        self.sink.sends.lock().unwrap().clone()
    }

    fn handled(&self) -> u64 {
        self.worker.metrics.counts.handled.load(Ordering::Relaxed)
    }

    fn retried(&self) -> u64 {
        self.worker.metrics.counts.retried.load(Ordering::Relaxed)
    }

    fn duplicates(&self) -> u64 {
        self.worker
            .metrics
            .counts
            .duplicates
            .load(Ordering::Relaxed)
    }

    fn dead_lettered(&self, reason: DeadLetterReason) -> u64 {
        self.worker.metrics.counts.dead_lettered().of(reason)
    }

    fn dead_lettered_total(&self) -> u64 {
        self.worker.metrics.counts.dead_lettered().total()
    }

    /// Another record's call failed transiently: with it, the record under test's failures
    /// can open the breaker (one record alone never does).
    async fn another_record_failed(&self) {
        let pass = self
            .worker
            .outage
            .admit(&Stop::default(), ProbeMemo::default(), 99_999)
            .await
            .expect("admitted");
        let _ = pass.failed(
            &HandlerError::transient("refused"),
            0,
            &mut ProbeMemo::default(),
        );
    }

    fn breaker(&self) -> crate::consumer::BreakerStatus {
        self.worker
            .outage
            .0
            .as_ref()
            .expect("built with a breaker")
            .status()
    }
}

/// Asserts `at` lies within `[lo, hi]`.
#[track_caller]
fn assert_within(at: Duration, lo: Duration, hi: Duration) {
    assert!(
        lo <= at && at <= hi,
        "{at:?} is not within [{lo:?}, {hi:?}]"
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Success
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn success_on_the_first_attempt_settles_and_completes_the_key() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Succeed]).dedup(&store).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, Duration::ZERO);
    assert_eq!(
        h.calls(),
        [Call {
            attempt: 1,
            at: Duration::ZERO,
            order: "o-1".into(),
            key: Some(KeyState::Held),
            token: h.calls()[0].token.clone(),
        }]
    );
    assert!(h.sends().is_empty(), "nothing is dead-lettered");
    assert_eq!(key_state(&store, &store_key("o-1")).await, KeyState::Done);
    assert_eq!(h.handled(), 1);
    assert_eq!(h.retried(), 0);
}

#[tokio::test(start_paused = true)]
async fn success_without_dedup_settles_after_one_call() {
    let h = script([Succeed]).build();

    let (end, _) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.attempts(), [1]);
    assert!(h.sends().is_empty());
    assert_eq!(h.handled(), 1);
}

// ---------------------------------------------------------------------------------------------
// 2. Transient failures, then success
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn transient_twice_then_success_retries_on_the_policy_clock() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Transient, Transient, Succeed])
        .dedup(&store)
        .build();
    let key = store_key("o-1");
    // Look at the key from outside while the worker waits out each back-off.
    let during_backoffs = async {
        let mut seen = Vec::new();
        for at in [250, 750] {
            sleep_until(h.t0 + ms(at)).await;
            seen.push(key_state(&store, &key).await);
        }
        seen
    };

    let ((end, took), during_backoffs) = tokio::join!(h.process(order("o-1")), during_backoffs);

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, ms(1000));
    assert_eq!(h.attempts(), [1, 2, 3]);
    assert_eq!(h.call_times(), [ms(0), ms(500), ms(1000)]);
    // Held by the worker during every attempt, released between them, done only at the end.
    let during_attempts: Vec<_> = h.calls().iter().map(|c| c.key).collect();
    assert_eq!(during_attempts, [Some(KeyState::Held); 3]);
    assert_eq!(during_backoffs, [KeyState::Free, KeyState::Free]);
    assert_eq!(key_state(&store, &key).await, KeyState::Done);
    assert!(h.sends().is_empty());
    assert_eq!(h.retried(), 2);
    assert_eq!(h.handled(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_hint_longer_than_the_policy_delay_is_honoured() {
    let h = script([Throttled(secs(2)), Succeed]).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        h.call_times(),
        [ms(0), secs(2)],
        "max(hint 2 s, policy 500 ms)"
    );
    assert_eq!(took, secs(2));
    assert_eq!(h.retried(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_finds_the_key_done_elsewhere_is_skipped_as_a_duplicate() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Transient, Succeed]).dedup(&store).build();
    let key = store_key("o-1");
    // During the back-off another consumer claims and completes the same event.
    let elsewhere = async {
        sleep_until(h.t0 + ms(250)).await;
        let token = acquire(&store, &key, LEASE).await;
        store.complete(&key, &token, TTL).await.unwrap();
    };

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), elsewhere);

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, ms(500));
    assert_eq!(
        h.attempts(),
        [1],
        "the retry must not run the handler again"
    );
    assert_eq!(h.duplicates(), 1);
    assert_eq!(h.handled(), 0);
    assert!(h.sends().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 3. Retries exhausted
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn transient_until_exhausted_dead_letters_after_four_attempts_and_settles_its_key() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Transient]).dedup(&store).build();
    let record = order("o-1");

    let (end, took) = h.process(record.clone()).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, ms(1500));
    assert_eq!(h.attempts(), [1, 2, 3, 4]);
    assert_eq!(h.call_times(), [ms(0), ms(500), ms(1000), ms(1500)]);
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::RetriesExhausted);
    assert_eq!(letter.attempts, 4);
    assert_eq!(letter.error, "smtp 451 on attempt 4", "the last error");
    assert_eq!(*letter.record, record, "the record goes out untouched");
    assert_eq!(letter.group_id, GROUP);
    assert!(letter.first_failure <= letter.last_failure);
    // Dead-lettered settles the delivery: a redelivery is skipped; a redrive carries a
    // redrive count and runs under a key of its own (`#r1`).
    assert_eq!(key_state(&store, &store_key("o-1")).await, KeyState::Done);
    assert_eq!(
        key_state(&store, &format!("{}#r1", store_key("o-1"))).await,
        KeyState::Free
    );
    assert_eq!(h.retried(), 3);
    assert_eq!(h.dead_lettered(DeadLetterReason::RetriesExhausted), 1);
    assert_eq!(h.handled(), 0);
}

// ---------------------------------------------------------------------------------------------
// 4. Permanent failure
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn permanent_failure_dead_letters_at_once_without_retry() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Permanent, Succeed]).dedup(&store).build();
    let record = order("o-1");

    let (end, took) = h.process(record.clone()).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        took,
        Duration::ZERO,
        "no back-off, the retry-after hint ignored"
    );
    assert_eq!(h.attempts(), [1]);
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::Permanent);
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.error, "mailbox unknown on attempt 1");
    assert_eq!(*letter.record, record);
    assert_eq!(key_state(&store, &store_key("o-1")).await, KeyState::Done);
    assert_eq!(h.retried(), 0);
    assert_eq!(h.dead_lettered(DeadLetterReason::Permanent), 1);
}

// ---------------------------------------------------------------------------------------------
// 5. Poison pills
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn undecodable_bytes_are_dead_lettered_raw_without_calling_the_handler() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Succeed]).dedup(&store).build();
    let record = raw(Some(b"\xff\xfe{not json"));

    let (end, took) = h.process(record.clone()).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, Duration::ZERO);
    assert!(h.calls().is_empty(), "the handler never sees a poison pill");
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::Decode);
    assert_eq!(letter.attempts, 0);
    assert!(
        letter.error.starts_with("invalid JSON event"),
        "{}",
        letter.error
    );
    assert_eq!(
        *letter.record, record,
        "key, value bytes and headers unchanged"
    );
    assert!(store.is_empty(), "no claim for a record that never runs");
    assert_eq!(h.dead_lettered(DeadLetterReason::Decode), 1);
}

#[tokio::test(start_paused = true)]
async fn a_null_value_is_dead_lettered_as_null() {
    let h = script([Succeed]).build();
    let record = raw(None);

    let (end, _) = h.process(record.clone()).await;

    assert_eq!(end, JobEnd::Settled);
    assert!(h.calls().is_empty());
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::Decode);
    assert_eq!(letter.attempts, 0);
    assert_eq!(letter.record.value, None, "null stays null");
    assert_eq!(*letter.record, record);
    assert!(letter.error.contains("null value"), "{}", letter.error);
}

// ---------------------------------------------------------------------------------------------
// 6. Duplicates
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_key_already_done_is_skipped_without_calling_the_handler() {
    let store = InMemoryIdempotencyStore::new();
    let key = store_key("o-1");
    let token = acquire(&store, &key, LEASE).await;
    store.complete(&key, &token, TTL).await.unwrap();
    let h = script([Succeed]).dedup(&store).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, Duration::ZERO);
    assert!(h.calls().is_empty());
    assert!(h.sends().is_empty());
    assert_eq!(h.duplicates(), 1);
    assert_eq!(h.handled(), 0);
    assert_eq!(key_state(&store, &key).await, KeyState::Done);
}

#[tokio::test(start_paused = true)]
async fn dedup_is_namespaced_by_group() {
    let store = InMemoryIdempotencyStore::new();
    // Done for another group: this group must still run it.
    let other = "other-group:o-1";
    let token = acquire(&store, other, LEASE).await;
    store.complete(other, &token, TTL).await.unwrap();
    let h = script([Succeed]).dedup(&store).build();

    let (end, _) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.attempts(), [1]);
    assert_eq!(h.duplicates(), 0);
}

// ---------------------------------------------------------------------------------------------
// 7. A failing dead-letter sink
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_failing_sink_is_retried_with_back_off_until_it_acknowledges() {
    let h = script([Permanent]).sink_failures(3).build();
    let record = order("o-1");

    let (end, took) = h.process(record.clone()).await;

    assert_eq!(end, JobEnd::Settled);
    let sends = h.sends();
    assert_eq!(
        sends.len(),
        4,
        "three failures, then the acknowledged write"
    );
    assert_eq!(took, sends[3], "settled only when the sink acknowledged");
    // Infrastructure back-off: 100 ms doubling, each wait jittered within [d/2, d].
    for (i, pair) in sends.windows(2).enumerate() {
        let d = ms(100 << i);
        assert_within(pair[1] - pair[0], d / 2, d);
    }
    assert_eq!(
        h.attempts(),
        [1],
        "a sink failure does not re-run the handler"
    );
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::Permanent);
    assert_eq!(*letter.record, record);
    assert_eq!(
        h.dead_lettered(DeadLetterReason::Permanent),
        1,
        "acknowledged once"
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_while_the_sink_fails_abandons_without_settling() {
    let h = script([Permanent]).sink_failures(u32::MAX).build();

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), h.cancel_at(secs(5)));

    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(took, secs(5), "the back-off is cut short");
    assert!(h.sends().len() >= 4, "kept retrying: {:?}", h.sends());
    assert!(h.letters().is_empty());
    assert_eq!(h.dead_lettered_total(), 0);
    assert_eq!(h.attempts(), [1]);
}

// ---------------------------------------------------------------------------------------------
// 8. Cancel during a retry back-off
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn cancel_during_a_retry_back_off_abandons_at_once() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Transient, Succeed])
        .policy(RetryPolicy::fixed(secs(10), 3))
        .dedup(&store)
        .build();

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), h.cancel_at(secs(1)));

    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(took, secs(1), "not the rest of the 10 s back-off");
    // Let time run on: nothing else may happen for this record.
    sleep(secs(60)).await;
    assert_eq!(h.attempts(), [1]);
    assert!(h.sends().is_empty());
    assert_eq!(h.handled(), 0);
    assert_eq!(
        key_state(&store, &store_key("o-1")).await,
        KeyState::Free,
        "released when the transactions stopped"
    );
}

#[tokio::test(start_paused = true)]
async fn an_already_cancelled_record_is_abandoned_before_the_handler() {
    let h = script([Succeed]).build();
    h.cancel.cancel();

    let (end, _) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Abandoned);
    assert!(h.calls().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 9. Handler panics
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_handler_panic_is_a_failure_that_is_retried() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Panic, Succeed]).dedup(&store).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, ms(500));
    assert_eq!(h.attempts(), [1, 2]);
    assert!(h.sends().is_empty());
    assert_eq!(h.handled(), 1);
    assert_eq!(key_state(&store, &store_key("o-1")).await, KeyState::Done);
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_always_panics_is_dead_lettered_with_the_panic_message() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Panic]).dedup(&store).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, ms(1500));
    assert_eq!(h.attempts(), [1, 2, 3, 4]);
    let letter = h.only_letter();
    assert_eq!(letter.reason, PANIC_EXHAUSTED);
    assert_eq!(letter.attempts, 4);
    assert!(
        letter.error.contains("panicked") && letter.error.contains("boom on attempt 4"),
        "{}",
        letter.error
    );
    // Dead-lettered: the delivery is settled, a redelivery is skipped (a redrive runs under
    // a key of its own).
    assert_eq!(key_state(&store, &store_key("o-1")).await, KeyState::Done);
}

// ---------------------------------------------------------------------------------------------
// 10. Handler timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_handler_slower_than_the_timeout_is_a_transient_failure() {
    let h = script([Stall(secs(10)), Succeed])
        .handler_timeout(secs(1))
        .build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    // Attempt 1 cut at 1 s, then the 500 ms back-off.
    assert_eq!(h.call_times(), [ms(0), ms(1500)]);
    assert_eq!(took, ms(1500));
    assert_eq!(h.retried(), 1);
    assert_eq!(h.handled(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_always_times_out_is_dead_lettered_after_four_attempts() {
    let h = script([Stall(secs(10))]).handler_timeout(secs(1)).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, ms(4 * 1000 + 3 * 500));
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::RetriesExhausted);
    assert_eq!(letter.attempts, 4);
    assert!(
        letter.error.contains("timed out after 1s"),
        "{}",
        letter.error
    );
}

#[tokio::test(start_paused = true)]
async fn a_handler_within_the_timeout_succeeds_first_time() {
    let h = script([Stall(ms(900))]).handler_timeout(secs(1)).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, ms(900));
    assert_eq!(h.attempts(), [1]);
    assert_eq!(h.retried(), 0);
}

// ---------------------------------------------------------------------------------------------
// 11. Store outage
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_store_outage_on_claim_holds_the_record_until_the_store_answers() {
    let store = FlakyStore::down();
    let h = script([Succeed]).dedup_in(store.hooked()).build();
    let recover = async {
        sleep_until(h.t0 + secs(1)).await;
        assert!(h.calls().is_empty(), "must not run while the store is down");
        store.down.store(false, Ordering::SeqCst);
    };

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), recover);

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.attempts(), [1], "waiting on the store is not an attempt");
    // The next claim comes within the wait under way at 1 s: at most the fifth, 1.6 s.
    assert_within(h.call_times()[0], secs(1), ms(2600));
    assert_eq!(took, h.call_times()[0]);
    assert!(store.claims.load(Ordering::SeqCst) >= 3, "it kept asking");
    assert_eq!(
        store.inner.claim(&store_key("o-1"), LEASE).await.unwrap(),
        Claim::Done
    );
    assert!(
        h.sends().is_empty(),
        "an outage is not the record's failure"
    );
    assert_eq!(h.retried(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stop_that_fires_while_the_claim_is_answered_abandons_before_the_handler() {
    let store = FlakyStore::slow_claim(secs(2));
    let h = script([Succeed]).dedup_in(store.hooked()).build();

    let ((end, _), ()) = tokio::join!(h.process(order("o-1")), h.cancel_at(secs(1)));

    assert_eq!(end, JobEnd::Abandoned, "acquired, but the stop came first");
    assert!(h.calls().is_empty(), "the handler never ran");

    // Without a claim (the store failed, and running without it is opted in), the stop is
    // looked at before the handler's first poll too.
    let store = FlakyStore::slow_claim(secs(2));
    store.set_down(true);
    let h = script([Succeed])
        .dedup_in(store.hooked())
        .run_without_store_on_outage()
        .build();

    let ((end, _), ()) = tokio::join!(h.process(order("o-1")), h.cancel_at(secs(1)));

    assert_eq!(end, JobEnd::Abandoned, "no claim, and the stop came first");
    assert!(h.calls().is_empty(), "the handler never ran");
}

#[tokio::test(start_paused = true)]
async fn a_claim_whose_lease_ran_out_before_the_attempt_is_claimed_again_first() {
    // The claim's answer comes after its whole lease (counted from when it was asked).
    let store = FlakyStore::slow_claim(secs(4));
    let h = script([Succeed])
        .dedup_in(store.hooked())
        .lease(secs(3))
        .build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    // The store set the key when the hook let the first claim through (at 4 s): the key
    // is busy under the lapsed token until 7 s, and claimed again then.
    assert!(
        store.claims.load(Ordering::SeqCst) > 1,
        "not run under the lapsed claim: claimed again"
    );
    assert_eq!(h.call_times(), [took], "one call, under a later claim");
    assert!(
        took >= secs(7),
        "after the lapsed claim's key expired: {took:?}"
    );
    assert_eq!(h.attempts(), [1], "the lapsed claim used no attempt");
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_then_cancel_abandons_without_running_the_handler() {
    let store = FlakyStore::down();
    let h = script([Succeed]).dedup_in(store.hooked()).build();

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), h.cancel_at(secs(3)));

    assert_eq!(end, JobEnd::Abandoned, "not skipped, not settled");
    assert_eq!(took, secs(3));
    assert!(h.calls().is_empty());
    assert_eq!(h.duplicates(), 0);
    assert!(h.sends().is_empty());
}

#[tokio::test(start_paused = true)]
async fn with_the_outage_opt_in_the_handler_runs_without_dedup() {
    let store = FlakyStore::down();
    let h = script([Succeed])
        .dedup_in(store.hooked())
        .run_without_store_on_outage()
        .build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, Duration::ZERO, "no waiting for the store");
    assert_eq!(h.attempts(), [1]);
    assert_eq!(store.claims.load(Ordering::SeqCst), 1);
    // Ran without a claim, so nothing was marked done.
    assert!(store.inner.is_empty());
    assert_eq!(h.handled(), 1);
}

// ---------------------------------------------------------------------------------------------
// 12. Busy claims
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_busy_key_waits_for_the_other_claim_and_then_runs_once() {
    let store = InMemoryIdempotencyStore::new();
    let key = store_key("o-1");
    let theirs = acquire(&store, &key, LEASE).await;
    let h = script([Succeed]).dedup(&store).build();
    let other_worker_gives_up = async {
        sleep_until(h.t0 + secs(2)).await;
        assert!(
            h.calls().is_empty(),
            "must not run while another token holds the key"
        );
        store.release(&key, &theirs).await.unwrap();
    };

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), other_worker_gives_up);

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.attempts(), [1], "a busy claim is not an attempt");
    // The next claim comes within the wait under way at 2 s: at most the sixth, 3.2 s.
    assert_within(h.call_times()[0], secs(2), ms(5200));
    assert_eq!(took, h.call_times()[0]);
    assert_eq!(key_state(&store, &key).await, KeyState::Done);
    assert!(h.sends().is_empty());
    assert_eq!(h.duplicates(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_busy_key_whose_holder_vanished_runs_once_its_lease_lapses() {
    let store = InMemoryIdempotencyStore::new();
    let key = store_key("o-1");
    let _abandoned = acquire(&store, &key, secs(3)).await;
    let h = script([Succeed]).dedup(&store).build();

    let (end, _) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.attempts(), [1]);
    // The infrastructure wait under way at 3 s is at most 3.2 s long (the sixth).
    assert_within(h.call_times()[0], secs(3), ms(3000 + 3200));
    assert_eq!(key_state(&store, &key).await, KeyState::Done);
}

#[tokio::test(start_paused = true)]
async fn cancel_while_the_key_is_busy_abandons_without_running() {
    let store = InMemoryIdempotencyStore::new();
    let key = store_key("o-1");
    let _theirs = acquire(&store, &key, LEASE).await;
    let h = script([Succeed]).dedup(&store).build();

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), h.cancel_at(secs(2)));

    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(took, secs(2));
    assert!(h.calls().is_empty());
    assert_eq!(
        key_state(&store, &key).await,
        KeyState::Held,
        "their claim untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// Found bugs: these fail today and document the expected behaviour.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_panicking_codec_dead_letters_the_record_as_decode() {
    let h = script([Succeed]).codec(PanickingCodec).build();
    let record = order("o-1");

    let ended = AssertUnwindSafe(h.process(record.clone()))
        .catch_unwind()
        .await;

    let (end, _) = ended.expect("process() must not panic: the record would never settle");
    assert_eq!(end, JobEnd::Settled);
    assert!(h.calls().is_empty());
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::Decode);
    assert_eq!(*letter.record, record);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_sink_is_retried_like_a_failed_write() {
    let h = script([Permanent]).sink_panics(1).build();

    let ended = AssertUnwindSafe(h.process(order("o-1")))
        .catch_unwind()
        .await;

    let (end, _) = ended.expect("process() must not panic: the record would never settle");
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.sends().len(), 2);
    assert_eq!(h.only_letter().reason, DeadLetterReason::Permanent);
}

#[tokio::test(start_paused = true)]
async fn a_claim_stays_held_while_its_handler_outlives_the_lease() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Stall(secs(3))])
        .dedup(&store)
        .lease(secs(1))
        .build();

    let (end, mid_run) = h.process_looking_at("o-1", &store, secs(2)).await;
    let key = store_key("o-1");

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        mid_run,
        KeyState::Held,
        "another consumer could claim and run the event concurrently"
    );
    assert_eq!(key_state(&store, &key).await, KeyState::Done);
}

// ---------------------------------------------------------------------------------------------
// 13. Leases that live as long as the work (delivery rule 15 in the crate docs)
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_claim_is_renewed_every_third_of_the_lease_and_completed_by_its_token() {
    let store = FlakyStore::up();
    let h = script([Stall(ms(9500))])
        .dedup_in(store.hooked())
        .lease(secs(3))
        .build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, ms(9500));
    let renews: Vec<Duration> = store.renew_times().iter().map(|t| *t - h.t0).collect();
    assert_eq!(
        renews,
        (1..=9).map(secs).collect::<Vec<_>>(),
        "every second (a third of the 3 s lease) while the 9.5 s handler ran, then no more"
    );
    let token = h.calls()[0]
        .token
        .clone()
        .expect("the handler saw its claim");
    assert!(
        store
            .calls_of("renew")
            .iter()
            .all(|(t, ok)| *t == token && *ok)
    );
    assert_eq!(store.calls_of("complete"), [(token, true)]);
    assert_eq!(h.handled(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_handler_sees_the_claim_token_of_its_attempt() {
    let store = FlakyStore::up();
    let h = script([Transient, Succeed])
        .dedup_in(store.hooked())
        .build();

    let (end, _) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    let tokens: Vec<ClaimToken> = h
        .calls()
        .iter()
        .map(|c| c.token.clone().expect("each attempt holds a claim"))
        .collect();
    assert_eq!(tokens.len(), 2);
    assert_ne!(tokens[0], tokens[1], "each attempt claims anew");
    assert_eq!(
        store.calls_of("release"),
        [(tokens[0].clone(), true)],
        "the failed attempt's claim was released"
    );
    assert_eq!(
        store.calls_of("complete"),
        [(tokens[1].clone(), true)],
        "the successful attempt's claim was completed"
    );

    // Without idempotency there is no claim.
    let h = script([Succeed]).build();
    h.process(order("o-2")).await;
    assert_eq!(h.calls()[0].token, None);
}

#[tokio::test(start_paused = true)]
async fn without_a_claim_on_store_outage_the_handler_sees_no_token() {
    let store = FlakyStore::down();
    let h = script([Succeed])
        .dedup_in(store.hooked())
        .run_without_store_on_outage()
        .build();

    h.process(order("o-1")).await;

    assert_eq!(h.calls()[0].token, None);
}

/// The store fails the renewals until the lease has run out and another worker claimed the
/// key; the next renewal finds the claim lost.
async fn lose_the_claim_mid_run(store: &FlakyStore, key: &str, t0: Instant) -> ClaimToken {
    sleep_until(t0 + ms(500)).await;
    store.set_down(true); // the renewals at 1, 2 and 3 s fail: the 3 s lease runs out
    sleep_until(t0 + ms(3500)).await;
    let theirs = match store.inner.claim(key, LEASE).await.unwrap() {
        Claim::Acquired(token) => token,
        other => panic!("the lapsed key must be claimable, got {other:?}"),
    };
    store.set_down(false); // the renewal at 4 s answers LeaseLost
    theirs
}

#[tokio::test(start_paused = true)]
async fn a_lost_claim_cancels_the_attempt_and_the_record_waits_for_the_new_owner() {
    let (store, key, h) = stalled_claim(secs(10));
    let other_worker = async {
        let theirs = lose_the_claim_mid_run(&store, &key, h.t0).await;
        sleep_until(h.t0 + secs(6)).await;
        assert_eq!(h.handled(), 0, "the cancelled attempt committed nothing");
        store.inner.complete(&key, &theirs, TTL).await.unwrap();
        theirs
    };

    let ((end, took), theirs) = tokio::join!(h.process(order("o-1")), other_worker);

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.attempts(), [1], "the cancelled attempt was the only call");
    assert!(
        took >= secs(6),
        "settled only once the new owner was done ({took:?})"
    );
    assert_eq!(
        h.duplicates(),
        1,
        "settled as a duplicate of the new owner's work"
    );
    assert_eq!(h.handled(), 0);
    assert_eq!(h.retried(), 0, "a lost claim is not a failed attempt");
    assert!(h.sends().is_empty());
    let ours = h.calls()[0].token.clone().unwrap();
    assert_eq!(
        store.calls_of("renew").last(),
        Some(&(ours, false)),
        "renewal stopped at the lost claim"
    );
    assert!(
        store.calls_of("complete").is_empty() && store.calls_of("release").is_empty(),
        "nothing done with the lost claim"
    );
    assert_eq!(
        store.inner.claim(&key, LEASE).await.unwrap(),
        Claim::Done,
        "done by {theirs}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_claim_does_not_count_as_an_attempt_when_the_record_runs_again() {
    let (store, key, h) = stalled_claim(secs(10));
    let other_worker = async {
        let theirs = lose_the_claim_mid_run(&store, &key, h.t0).await;
        sleep_until(h.t0 + secs(6)).await;
        store.inner.release(&key, &theirs).await.unwrap(); // their attempt failed
    };

    let ((end, _), ()) = tokio::join!(h.process(order("o-1")), other_worker);

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        h.attempts(),
        [1, 1],
        "the cancelled attempt is run again as attempt 1"
    );
    let tokens: Vec<_> = h.calls().iter().map(|c| c.token.clone().unwrap()).collect();
    assert_ne!(tokens[0], tokens[1], "the new run holds a claim of its own");
    assert_eq!(h.handled(), 1);
    assert_eq!(h.retried(), 0);
    assert_eq!(store.calls_of("complete"), [(tokens[1].clone(), true)]);
    assert_eq!(key_state(&store.inner, &key).await, KeyState::Done);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_always_loses_claims_makes_the_record_wait_not_spin() {
    let h = script([Stall(secs(60))])
        .dedup_in(FlakyStore::forgetful().hooked())
        .lease(ms(300))
        .build();

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), h.cancel_at(secs(30)));

    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(took, secs(30));
    let calls = h.attempts();
    assert!(
        calls.iter().all(|a| *a == 1),
        "lost claims never count: {calls:?}"
    );
    // Each run lasts until the first renewal (0.1 s); the pauses between runs grow from
    // 0.1 s to 5 s: a few dozen runs in 30 s, not 300 (the key is free at once).
    assert!(
        calls.len() > 3 && calls.len() < 40,
        "{} runs in 30 s",
        calls.len()
    );
    assert_eq!(h.dead_lettered_total(), 0);
}

#[tokio::test(start_paused = true)]
async fn renewal_stops_when_the_partition_assignment_is_lost() {
    let (store, key, h) = stalled_claim(secs(60));
    let stop = Stop::default();
    let revoke = async {
        sleep_until(h.t0 + ms(1500)).await;
        stop.drain.cancel();
        stop.lost.cancel();
        // Renewed last at 1 s: the lease runs out at 4 s and the new owner can claim.
        sleep_until(h.t0 + ms(4500)).await;
        let new_owner = store.inner.claim(&key, LEASE).await.unwrap();
        // The revoke timeout passes: the record is given up.
        sleep_until(h.t0 + secs(10)).await;
        stop.abandon.cancel();
        new_owner
    };

    let ((end, took), new_owner) = tokio::join!(h.process_with(order("o-1"), &stop), revoke);

    assert!(
        matches!(new_owner, Claim::Acquired(_)),
        "the new owner got the key after one lease: {new_owner:?}"
    );
    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(
        took,
        secs(4),
        "the attempt ended with its lease (renewed last at 1 s), not at the revoke timeout"
    );
    let renews: Vec<Duration> = store.renew_times().iter().map(|t| *t - h.t0).collect();
    assert_eq!(
        renews,
        [secs(1)],
        "no renewal after the assignment was lost"
    );
    assert_eq!(
        key_state(&store.inner, &key).await,
        KeyState::Held,
        "the new owner's"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_written_after_the_assignment_was_lost_keeps_its_claim_and_marks_it_settled()
{
    // The broker is away while the letter is written (eight failed writes: at least 8 s of
    // jittered waits, longer than the 3 s lease) and the assignment is lost meanwhile, as when
    // a restarting broker expires the member's session. The letter will be written whatever
    // the assignment: the claim must outlive it, else the partition's next owner takes the key
    // at the lease's end and writes a second letter (delivery rule 18).
    let store = FlakyStore::up();
    let key = store_key("o-1");
    let h = script([Permanent])
        .dedup_in(store.hooked())
        .lease(secs(3))
        .sink_failures(8)
        .build();
    let stop = Stop::default();
    let next_owner = async {
        sleep_until(h.t0 + ms(50)).await;
        stop.drain.cancel();
        stop.lost.cancel();
        sleep_until(h.t0 + ms(4500)).await;
        key_state(&store.inner, &key).await
    };

    let ((end, _), at_the_lease_end) =
        tokio::join!(h.process_with(order("o-1"), &stop), next_owner);

    assert_eq!(
        at_the_lease_end,
        KeyState::Held,
        "the next owner cannot take the key while the letter is still being written"
    );
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.letters().len(), 1);
    assert!(
        store.renew_times().iter().any(|t| *t - h.t0 > secs(3)),
        "renewed past the first lease: {:?}",
        store.renew_times()
    );
    assert_eq!(
        key_state(&store.inner, &key).await,
        KeyState::Done,
        "marked settled: a replay of the record is skipped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_revoke_keeps_renewing_while_it_waits_and_renewal_ends_with_the_given_up_record() {
    let (store, key, h) = stalled_claim(secs(60));
    let stop = Stop::default();
    let revoke = async {
        sleep_until(h.t0 + ms(1500)).await;
        stop.drain.cancel(); // the revoke starts waiting for the record
        sleep_until(h.t0 + ms(5500)).await;
        let during_the_wait = key_state(&store.inner, &key).await;
        stop.abandon.cancel(); // the revoke timeout passed
        during_the_wait
    };

    let ((end, took), during_the_wait) = tokio::join!(h.process_with(order("o-1"), &stop), revoke);

    assert_eq!(
        during_the_wait,
        KeyState::Held,
        "renewed while the revoke waited"
    );
    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(took, ms(5500));
    let renewed = store.renew_times().len();
    assert_eq!(renewed, 5, "at 1, 2, 3, 4 and 5 s");
    // The attempt was dropped with its renewal: the claim lapses one lease after the last
    // renewal (5 s + 3 s) and is never renewed again.
    sleep_until(h.t0 + secs(8)).await;
    assert_eq!(key_state(&store.inner, &key).await, KeyState::Free);
    assert_eq!(store.renew_times().len(), renewed);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_renew_lets_the_lease_run_out_as_before() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Stall(secs(3))])
        .dedup_in(Arc::new(HookedStore::new(
            Arc::new(store.clone()),
            CannotRenew,
        )))
        .lease(secs(1))
        .build();

    let (end, mid_run) = h.process_looking_at("o-1", &store, secs(2)).await;
    let key = store_key("o-1");

    assert_eq!(end, JobEnd::Settled, "the attempt is not cancelled");
    assert_eq!(h.attempts(), [1]);
    assert_eq!(
        mid_run,
        KeyState::Free,
        "not renewed: the lease ran out at 1 s"
    );
    assert_eq!(
        key_state(&store, &key).await,
        KeyState::Free,
        "the late complete was fenced off"
    );
}

#[tokio::test(start_paused = true)]
async fn complete_is_retried_until_the_lease_from_the_last_renewal_runs_out() {
    let store = FlakyStore::up();
    let h = script([Stall(ms(29_900))])
        .dedup_in(store.hooked())
        .lease(secs(30))
        .build();
    let outage = async {
        // Down when the handler returns at 29.9 s; renewed last at 20 s, so the lease holds
        // until 50 s: complete keeps trying that long, and gives up at its first failure
        // past it (waits are at most 5 s). Counting from the claim it would give up at
        // 30 s; counting from completion, at 59.9 s.
        sleep_until(h.t0 + secs(29)).await;
        store.set_down(true);
    };

    let ((end, took), ()) = tokio::join!(h.process(order("o-1")), outage);

    assert_eq!(end, JobEnd::Settled);
    assert!(
        took >= secs(50) && took <= secs(55),
        "gave up marking it done when the lease from the last renewal ran out ({took:?})"
    );
    let completes = store.calls_of("complete");
    assert!(completes.len() >= 2 && completes.iter().all(|(_, ok)| !ok));
}

#[tokio::test(start_paused = true)]
async fn max_elapsed_counts_the_time_spent_waiting() {
    // Attempts at 0, 0.5, 1.0 s; a fourth at 1.5 s would pass the 1.2 s limit.
    let h = script([Transient])
        .policy(RetryPolicy::fixed(ms(500), 10).with_max_elapsed(ms(1200)))
        .build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.attempts(), [1, 2, 3]);
    assert_eq!(took, ms(1000));
    assert_eq!(h.only_letter().reason, DeadLetterReason::RetriesExhausted);
}

// ---------------------------------------------------------------------------------------------
// 13. Panics as their own kind, draining, stalls (issue 11)
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn with_retry_panics_off_a_panic_is_dead_lettered_at_once_as_panic() {
    let h = script([Panic]).retry_panics(false).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, Duration::ZERO, "no back-off");
    assert_eq!(h.attempts(), [1]);
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::Panic);
    assert_eq!(letter.attempts, 1);
    assert_eq!(h.counts().panics.load(Ordering::Relaxed), 1);
    assert_eq!(h.retried(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_dedup_key_function_dead_letters_the_record_as_panic_without_a_call() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Succeed]).panicking_dedup_key(&store).build();

    let (end, _) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert!(h.calls().is_empty(), "the handler never runs");
    let letter = h.only_letter();
    assert_eq!(letter.reason, DeadLetterReason::Panic);
    assert_eq!(letter.attempts, 0);
    assert!(
        letter
            .error
            .contains("dedup key function panicked: no key for o-1")
    );
    assert_eq!(h.counts().panics.load(Ordering::Relaxed), 1);
    assert_eq!(
        key_state(&store, &store_key("o-1")).await,
        KeyState::Free,
        "released when the transactions stopped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_draining_partition_gives_up_a_record_waiting_out_its_back_off_at_once() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Transient, Succeed])
        .policy(RetryPolicy::fixed(secs(30), 3))
        .dedup(&store)
        .build();

    let (end, took) = h.process_draining_at(order("o-1"), secs(1)).await;

    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(
        took,
        secs(1),
        "given up when the drain began, not after 30 s"
    );
    assert_eq!(h.attempts(), [1]);
    assert!(h.sends().is_empty(), "not dead-lettered");
    assert_eq!(h.counts().abandoned.load(Ordering::Relaxed), 1);
    // Its claim was released after the failed attempt: the next owner can run it.
    assert_eq!(
        key_state(&store, &store_key("o-1")).await,
        KeyState::Free,
        "released when the transactions stopped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_lets_a_back_off_that_ends_before_its_deadline_retry() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Transient, Succeed])
        .policy(RetryPolicy::fixed(secs(30), 3))
        .dedup(&store)
        .build();

    let (end, took) = h
        .process_draining_at_until(order("o-1"), secs(1), secs(60))
        .await;

    assert_eq!(
        end,
        JobEnd::Settled,
        "retried within the drain, not given up"
    );
    assert_eq!(took, secs(30));
    assert_eq!(h.attempts(), [1, 2]);
    assert_eq!(key_state(&store, &store_key("o-1")).await, KeyState::Done);
    // A back-off that would end after the deadline is given up when the drain begins.
    let h = script([Transient, Succeed])
        .policy(RetryPolicy::fixed(secs(30), 3))
        .build();
    let (end, took) = h
        .process_draining_at_until(order("o-2"), secs(1), secs(20))
        .await;
    assert_eq!((end, took), (JobEnd::Abandoned, secs(1)));
    assert_eq!(h.attempts(), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_draining_partition_lets_a_running_handler_finish() {
    let h = script([Stall(secs(5))]).build();

    let (end, took) = h.process_draining_at(order("o-1"), secs(1)).await;

    assert_eq!(end, JobEnd::Settled, "only back-off waits are cut short");
    assert_eq!(took, secs(5));
    assert_eq!(h.handled(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_record_in_flight_past_the_stall_threshold_is_counted_once() {
    let h = script([Stall(secs(10))]).stall_threshold(secs(2)).build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, secs(10));
    assert_eq!(h.counts().stalled.load(Ordering::Relaxed), 1);
    let quick = script([Succeed]).stall_threshold(secs(2)).build();
    quick.process(order("o-2")).await;
    assert_eq!(quick.counts().stalled.load(Ordering::Relaxed), 0);
}

// ---------------------------------------------------------------------------------------------
// Outage breaker (delivery rule 16 in the crate docs)
// ---------------------------------------------------------------------------------------------

/// Opens after 4 consecutive failures (no rate trigger), probes after 1 s, doubling to 8 s.
/// The tests let another record fail first ([`Harness::another_record_failed`]): the record
/// under test's third failure opens it. The record under test probes alone through long
/// outages: the bound on its own failed probes is tested on its own
/// (`a_record_that_fails_its_share_of_probes_takes_its_normal_path`).
fn outage_breaker() -> BreakerPolicy {
    BreakerPolicy::default()
        .without_failure_rate()
        .with_consecutive_failures(4)
        .with_open_interval(secs(1), secs(8))
        .with_probes_per_record(1000)
}

#[tokio::test(start_paused = true)]
async fn an_outage_uses_up_no_attempts_and_dead_letters_nothing() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([DownUntil(secs(60))])
        .breaker(outage_breaker())
        .dedup(&store)
        .build();
    h.another_record_failed().await;

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        h.dead_lettered_total(),
        0,
        "an outage is not a failure of the record"
    );
    assert_eq!(h.handled(), 1);
    // Attempts 1 and 2 fail on the policy's clock; the third failure opens the breaker and is
    // not counted: every later call is attempt 3 again, and the policy (4 attempts) is never
    // exhausted however long the outage lasts.
    let attempts = h.attempts();
    assert_eq!(&attempts[..3], [1, 2, 3]);
    assert!(attempts[3..].iter().all(|&a| a == 3), "{attempts:?}");
    assert_eq!(
        h.retried(),
        2,
        "only the two failures before it opened were retries"
    );
    // After it opened, one probe per open interval: 1 s, then doubling to the 8 s cap. It
    // failed in this outage, so it leaves each probe to a fresh record for the grace period
    // (0.5 s) first: there is no scheduler here to say it has none.
    let times: Vec<u64> = h
        .call_times()
        .iter()
        .map(|t| t.as_millis() as u64)
        .collect();
    assert_eq!(
        times,
        [
            0, 500, 1000, 2500, 5000, 9500, 18_000, 26_500, 35_000, 43_500, 52_000, 60_500
        ]
    );
    assert_eq!(took, Duration::from_millis(60_500));
    let b = h.breaker();
    assert_eq!(b.state, crate::consumer::BreakerState::Closed);
    assert_eq!((b.opened, b.probes, b.held_failures), (9, 9, 9));
    assert_eq!(key_state(&store, &store_key("o-1")).await, KeyState::Done);
    // Every call held the claim; between calls it was released (see the drain test).
    assert!(h.calls().iter().all(|c| c.key == Some(KeyState::Held)));
}

/// With destinations, a destination known down that fails again (its probe) is its own
/// business: the consumer-wide breaker counts it once, when it opened the destination, and
/// never again (it cannot open or re-open the consumer's breaker alone). Before, each of
/// its failed probes counted: with two other destinations failing, the consumer's breaker
/// opened.
#[tokio::test(start_paused = true)]
async fn a_destination_known_down_counts_once_for_the_consumer_breaker() {
    let h = script([UnavailableUntil(secs(30))])
        .breaker(
            BreakerPolicy::default()
                .without_failure_rate()
                .with_consecutive_failures(3)
                .with_min_destinations(2),
        )
        .destinations(
            crate::Destinations::from_fn(|m: &Message<Order>| Some(m.event().id.clone()))
                .with_open_interval(secs(1), secs(1)),
        )
        .build();
    // Another destination failed once: the consumer's breaker needs a second destination.
    let pass = (h.worker.outage)
        .admit_as(&Stop::default(), ProbeMemo::default(), 77, true)
        .await
        .expect("admitted");
    let _ = pass.failed(
        &HandlerError::transient("refused"),
        0,
        &mut ProbeMemo::default(),
    );

    let (end, _) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.dead_lettered_total(), 0);
    // o-1's destination opened at its first call and was probed once a second.
    let calls = h.call_times().len();
    assert!(calls >= 30, "{calls} calls in 30 s");
    let b = h.breaker();
    assert_eq!(
        b.opened, 0,
        "one failure of each of two destinations in a row: {b:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_record_waiting_for_the_breaker_holds_no_claim_and_a_drain_gives_it_up_at_once() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([DownUntil(secs(3600))])
        .breaker(outage_breaker().with_open_interval(secs(10), secs(10)))
        .dedup(&store)
        .build();
    h.another_record_failed().await;
    let t0 = h.t0;
    let probe_store = store.clone();
    let while_waiting = tokio::spawn(async move {
        sleep_until(t0 + secs(3)).await;
        key_state(&probe_store, &store_key("o-1")).await
    });

    let (end, took) = h.process_draining_at(order("o-1"), secs(5)).await;

    assert_eq!(
        while_waiting.await.unwrap(),
        KeyState::Free,
        "released before waiting"
    );
    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(
        took,
        secs(5),
        "given up when the drain began, not at the next probe"
    );
    assert_eq!(h.attempts(), [1, 2, 3]);
    assert!(h.sends().is_empty(), "not dead-lettered");
    assert_eq!(h.breaker().waiting, 0);
    assert_eq!(
        key_state(&store, &store_key("o-1")).await,
        KeyState::Free,
        "released when the transactions stopped"
    );
}

#[tokio::test(start_paused = true)]
async fn unavailable_never_uses_attempts_even_without_a_breaker() {
    let h = script([UnavailableUntil(secs(20))])
        .policy(RetryPolicy::no_retries())
        .build();

    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.dead_lettered_total(), 0);
    assert_eq!(h.handled(), 1);
    assert!(h.attempts().iter().all(|&a| a == 1), "{:?}", h.attempts());
    // Backing off 100 ms doubling to 5 s (with jitter): a handful of calls, not a spin.
    let calls = h.calls().len();
    assert!((5..=20).contains(&calls), "{calls} calls");
    assert_within(took, secs(20), secs(25));
}

#[tokio::test(start_paused = true)]
async fn unavailable_opens_the_breaker_and_permanent_failures_are_still_dead_lettered() {
    let h = script([UnavailableUntil(secs(30))])
        .breaker(outage_breaker().with_consecutive_failures(2))
        .policy(RetryPolicy::no_retries())
        .build();
    h.another_record_failed().await;
    let (end, _) = h.process(order("o-1")).await;
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.dead_lettered_total(), 0);
    assert!(h.breaker().opened >= 1);
    assert_eq!(h.breaker().state, crate::consumer::BreakerState::Closed);

    let p = script([Permanent])
        .breaker(outage_breaker().with_consecutive_failures(2))
        .build();
    p.another_record_failed().await;
    let (end, took) = p.process(order("o-2")).await;
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(took, Duration::ZERO, "dead-lettered at once");
    assert_eq!(p.dead_lettered(DeadLetterReason::Permanent), 1);
    assert_eq!(
        p.breaker().opened,
        0,
        "a permanent failure says nothing about the downstream"
    );
}

#[tokio::test(start_paused = true)]
async fn a_record_failing_alone_never_opens_the_breaker_and_is_dead_lettered_as_without_one() {
    // Its own failures, however many in a row: its retry policy (4 attempts) decides.
    let h = script([Transient])
        .breaker(outage_breaker().with_consecutive_failures(2))
        .build();
    let (end, _) = h.process(order("o-1")).await;
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.attempts(), [1, 2, 3, 4]);
    assert_eq!(h.only_letter().reason, DeadLetterReason::RetriesExhausted);
    assert_eq!(h.breaker().opened, 0);
}

#[tokio::test(start_paused = true)]
async fn with_a_breaker_a_record_that_fails_alone_below_the_threshold_is_still_dead_lettered() {
    // Two attempts fail, fewer than the breaker's three: the policy decides as before.
    let h = script([Transient])
        .policy(RetryPolicy::fixed(ms(500), 1))
        .breaker(outage_breaker())
        .build();
    let (end, _) = h.process(order("o-1")).await;
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.only_letter().reason, DeadLetterReason::RetriesExhausted);
    assert_eq!(h.breaker().opened, 0);
}

// ---------------------------------------------------------------------------------------------
// Outcomes written off the lane's critical path (completion, dead letter)
// ---------------------------------------------------------------------------------------------

/// A slot that records when the record released its lane (paused time since `t0`).
struct ReleaseProbe {
    t0: Instant,
    released: Mutex<Vec<Duration>>,
    /// Paused times the slot was given up (`park`).
    parked: Mutex<Vec<Duration>>,
}

impl ReleaseProbe {
    fn new(t0: Instant) -> Self {
        ReleaseProbe {
            t0,
            released: Mutex::new(Vec::new()),
            parked: Mutex::new(Vec::new()),
        }
    }

    fn parked(&self) -> Vec<Duration> {
        self.parked.lock().unwrap().clone()
    }

    fn released(&self) -> Vec<Duration> {
        self.released.lock().unwrap().clone()
    }
}

impl super::Slot for ReleaseProbe {
    fn park(&self) {
        self.parked.lock().unwrap().push(self.t0.elapsed());
    }
    fn resume(&self) -> Result<(), tokio::sync::oneshot::Receiver<()>> {
        Ok(())
    }
    fn resume_now(&self) {}
    fn release(&self) {
        let mut released = self.released.lock().unwrap();
        if released.is_empty() {
            released.push(self.t0.elapsed());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_success_releases_the_lane_at_once_and_settles_only_when_the_key_is_done() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Succeed])
        .dedup_in(FlakyStore::slow_complete(store.clone(), secs(2)).hooked())
        .build();
    let slot = ReleaseProbe::new(h.t0);

    let end = h.process_in(order("o-1"), &slot).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        slot.released(),
        [Duration::ZERO],
        "the lane is released as soon as the handler succeeded"
    );
    assert_eq!(
        h.t0.elapsed(),
        secs(2),
        "the job ends when complete has finished"
    );
    assert_eq!(key_state(&store, &store_key("o-1")).await, KeyState::Done);
}

#[tokio::test(start_paused = true)]
async fn a_success_without_dedup_keeps_its_lane_to_the_end() {
    let h = script([Succeed]).build();
    let slot = ReleaseProbe::new(h.t0);

    let end = h.process_in(order("o-1"), &slot).await;

    assert_eq!(end, JobEnd::Settled);
    assert!(
        slot.released().is_empty(),
        "nothing left to write: finish as before"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_releases_the_lane_and_a_failing_write_holds_the_record_unsettled() {
    let h = script([Permanent]).sink_failures(3).build();
    let slot = ReleaseProbe::new(h.t0);

    let end = h.process_in(order("o-1"), &slot).await;

    let sends = h.sends();
    assert_eq!(
        sends.len(),
        4,
        "three failed writes, then the acknowledged one"
    );
    assert_eq!(
        slot.released(),
        [Duration::ZERO],
        "the lane is released before the first write"
    );
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        h.t0.elapsed(),
        sends[3],
        "settled (committable) only when the broker acknowledged"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_write_that_never_succeeds_is_abandoned_unsettled_after_release() {
    let h = script([Permanent]).sink_failures(u32::MAX).build();
    let slot = ReleaseProbe::new(h.t0);
    let stop = Stop::default();
    let abandon = stop.abandon.clone();

    let run = h.worker.run_job(Arc::new(order("o-1")), &stop, &slot);
    let (end, ()) = tokio::join!(run, async {
        sleep_until(h.t0 + secs(5)).await;
        abandon.cancel();
    });

    assert_eq!(slot.released(), [Duration::ZERO]);
    assert_eq!(
        end,
        JobEnd::Abandoned,
        "never settled: its offset is not committed"
    );
    assert!(h.letters().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Claims fetched ahead for the lane's next records
// ---------------------------------------------------------------------------------------------

/// A slot whose lane holds `next` after the record.
struct LaneSlot {
    stop: Arc<Stop>,
    next: Vec<Arc<RawRecord>>,
}

impl super::Slot for LaneSlot {
    fn park(&self) {}
    fn resume(&self) -> Result<(), tokio::sync::oneshot::Receiver<()>> {
        Ok(())
    }
    fn resume_now(&self) {}
    fn release(&self) {}
    fn lane_ahead(&self, max: usize) -> Option<(Arc<Stop>, Vec<Arc<RawRecord>>)> {
        Some((
            self.stop.clone(),
            self.next.iter().take(max).cloned().collect(),
        ))
    }
}

#[tokio::test(start_paused = true)]
async fn the_lanes_next_records_run_on_the_claims_fetched_with_the_first() {
    let store = FlakyStore::up();
    let h = script([Succeed, Succeed]).dedup_in(store.hooked()).build();
    // o-3 was handled before: its claim fetched ahead answers done.
    let Claim::Acquired(token) = store.inner.claim(&store_key("o-3"), LEASE).await.unwrap() else {
        panic!("o-3 claimable");
    };
    store
        .inner
        .complete(&store_key("o-3"), &token, TTL)
        .await
        .unwrap();
    let records: Vec<Arc<RawRecord>> = ["o-1", "o-2", "o-3"]
        .into_iter()
        .map(|id| Arc::new(order(id)))
        .collect();
    let stop = Stop::default();
    let lane = LaneSlot {
        stop: Arc::default(),
        next: records[1..].to_vec(),
    };

    let first = h.worker.run_job(records[0].clone(), &stop, &lane).await;
    let claims = store.claims.load(Ordering::SeqCst);
    let rest = [
        h.worker.run_job(records[1].clone(), &stop, &KeepSlot).await,
        h.worker.run_job(records[2].clone(), &stop, &KeepSlot).await,
    ];

    assert_eq!(claims, 3, "o-1 claimed o-2's and o-3's keys with its own");
    assert_eq!([first, rest[0], rest[1]], [JobEnd::Settled; 3]);
    assert_eq!(
        store.claims.load(Ordering::SeqCst),
        claims,
        "o-2 and o-3 asked the store nothing"
    );
    assert_eq!(h.handled(), 2, "o-1 and o-2 handled, o-3 a duplicate");
    assert_eq!(
        key_state(&store.inner, &store_key("o-2")).await,
        KeyState::Done
    );
    // Each handled record ran under a claim (o-2's fetched ahead) and completed with it.
    let ran: Vec<ClaimToken> = h
        .calls()
        .iter()
        .map(|c| c.token.clone().expect("each attempt holds a claim"))
        .collect();
    let completed: Vec<ClaimToken> = store
        .calls_of("complete")
        .into_iter()
        .map(|(token, ok)| {
            assert!(ok, "completed");
            token
        })
        .collect();
    assert_eq!(ran, completed);
}

#[tokio::test(start_paused = true)]
async fn a_claim_fetched_ahead_for_a_record_that_ends_early_is_released() {
    let store = FlakyStore::up();
    let h = script([Succeed]).dedup_in(store.hooked()).build();
    let first = Arc::new(order("o-1"));
    let next = Arc::new(order("o-2"));
    let lane = LaneSlot {
        stop: Arc::default(),
        next: vec![next.clone()],
    };
    let stop = Stop::default();
    assert_eq!(h.worker.run_job(first, &stop, &lane).await, JobEnd::Settled);
    assert_eq!(
        key_state(&store.inner, &store_key("o-2")).await,
        KeyState::Held
    );
    // o-2's job ends before it claims (here: given up as its partition is abandoned).
    let abandoned = Stop::default();
    abandoned.abandon.cancel();
    assert_eq!(
        h.worker.run_job(next, &abandoned, &KeepSlot).await,
        JobEnd::Abandoned
    );
    assert_eq!(
        key_state(&store.inner, &store_key("o-2")).await,
        KeyState::Free,
        "released at its job's end, not left for the lease"
    );
}

// ---------------------------------------------------------------------------------------------
// One event, one outcome (delivery rule 18); waits that honour the drain (rule 14)
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_dead_lettered_record_delivered_again_is_skipped_not_dead_lettered_twice() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Permanent]).dedup(&store).build();
    assert_eq!(h.process(order("o-1")).await.0, JobEnd::Settled);
    assert_eq!(h.letters().len(), 1);

    // The same record again (a crash before its offset was committed), and a second
    // publish of the event at another offset: skipped, no handler call, no second letter.
    let mut again = order("o-1");
    again.offset = 77;
    assert_eq!(h.process(order("o-1")).await.0, JobEnd::Settled);
    assert_eq!(h.process(again).await.0, JobEnd::Settled);
    assert_eq!(h.attempts(), [1], "the handler ran once");
    assert_eq!(h.letters().len(), 1, "one dead letter per event");
    assert_eq!(h.duplicates(), 2);

    // A redrive of the letter (redrive count 1) is a new delivery: it runs.
    let mut redriven = order("o-1");
    redriven.headers = Headers::new().with(crate::dead_letter::headers::REDRIVE_COUNT, "1");
    assert_eq!(h.process(redriven.clone()).await.0, JobEnd::Settled);
    assert_eq!(h.attempts(), [1, 1]);
    assert_eq!(h.letters().len(), 2);
    // ...once: the same redrive twice is one delivery.
    assert_eq!(h.process(redriven).await.0, JobEnd::Settled);
    assert_eq!(h.attempts(), [1, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_poison_pill_with_a_header_key_is_dead_lettered_once() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Succeed])
        .dedup_by_header(&store, "event-id")
        .build();
    let mut pill = raw(Some(b"{not json"));
    pill.headers = Headers::new().with("event-id", "e-9");
    assert_eq!(h.process(pill.clone()).await.0, JobEnd::Settled);
    assert_eq!(h.process(pill).await.0, JobEnd::Settled);
    assert_eq!(h.letters().len(), 1, "a redelivered poison pill is skipped");
    assert_eq!(h.duplicates(), 1);
    assert!(h.calls().is_empty());
    assert_eq!(
        key_state(&store, &format!("{GROUP}:e-9")).await,
        KeyState::Done
    );
}

#[tokio::test(start_paused = true)]
async fn a_tier_hop_and_a_redrive_claim_keys_of_their_own() {
    use crate::dead_letter::headers::{REDRIVE_COUNT, tier::HOP};
    let store = InMemoryIdempotencyStore::new();
    let h = script([Succeed]).dedup(&store).build();
    let with = |headers: Headers| {
        let mut r = order("o-1");
        r.headers = headers;
        r
    };
    h.process(with(Headers::new().with(HOP, "2"))).await;
    h.process(with(Headers::new().with(REDRIVE_COUNT, "1").with(HOP, "1")))
        .await;
    let calls = h.calls();
    assert_eq!(calls.len(), 2);
    for (key, state) in [
        (store_key("o-1"), KeyState::Free),
        (format!("{}#h2", store_key("o-1")), KeyState::Done),
        (format!("{}#r1#h1", store_key("o-1")), KeyState::Done),
    ] {
        assert_eq!(key_state(&store, &key).await, state, "{key}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_record_waiting_for_a_busy_key_gives_up_its_slot_and_a_drain_ends_the_wait_at_once() {
    let store = InMemoryIdempotencyStore::new();
    let _elsewhere = acquire(&store, &store_key("o-1"), secs(600)).await;
    let h = script([Succeed]).dedup(&store).build();
    let slot = ReleaseProbe::new(h.t0);
    let stop = Stop::default();
    let (drain, give_up_by) = (stop.drain.clone(), stop.give_up_by.clone());
    let t0 = h.t0;
    tokio::spawn(async move {
        sleep_until(t0 + secs(2)).await;
        // The shutdown deadline is far: the wait must not last until then.
        let _ = give_up_by.set(t0 + secs(30));
        drain.cancel();
    });

    let run = h.worker.run_job(Arc::new(order("o-1")), &stop, &slot);
    let end = tokio::time::timeout(secs(3600), run)
        .await
        .expect("the record never ended");

    assert_eq!(end, JobEnd::Abandoned);
    assert_eq!(h.t0.elapsed(), secs(2), "given up when the drain began");
    assert!(h.calls().is_empty());
    let parked = slot.parked();
    assert!(
        !parked.is_empty() && parked[0] < ms(200),
        "the slot is given up while the key is busy: {parked:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn copies_of_one_event_count_as_one_record_for_the_breaker() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Transient])
        .dedup(&store)
        .policy(RetryPolicy::fixed(ms(500), 1))
        .breaker(
            BreakerPolicy::default()
                .without_failure_rate()
                .with_consecutive_failures(2),
        )
        .build();
    // Two copies of event o-1 at different offsets (a second publish, or a redelivery next
    // to a stale tier copy), failing at the same time: one event failing on its own.
    let mut copy = order("o-1");
    copy.offset = 43;
    let ((a, _), (b, _)) = tokio::join!(h.process(order("o-1")), h.process(copy));
    assert_eq!((a, b), (JobEnd::Settled, JobEnd::Settled));
    assert_eq!(h.breaker().opened, 0, "one event never opens the breaker");
    assert_eq!(
        h.letters().len(),
        1,
        "its retry policy dead-lettered it, once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_record_that_fails_its_share_of_probes_takes_its_normal_path() {
    let h = script([Transient])
        .policy(RetryPolicy::no_retries())
        .breaker(
            BreakerPolicy::default()
                .without_failure_rate()
                .with_consecutive_failures(2)
                .with_open_interval(secs(1), secs(2))
                .with_probes_per_record(3),
        )
        .build();
    h.another_record_failed().await;

    // Fails, opens the breaker (held: no attempt used), then probes alone every 1-2 s and
    // fails each probe: after its third failed probe its failure counts and its policy (no
    // retries) dead-letters it, instead of holding the breaker open for ever.
    let (end, took) = h.process(order("o-1")).await;

    assert_eq!(end, JobEnd::Settled);
    assert_eq!(h.dead_lettered(DeadLetterReason::RetriesExhausted), 1);
    assert_eq!(
        h.calls().len(),
        4,
        "one held failure, then three failed probes"
    );
    assert!(took <= secs(10), "{took:?}");
}

/// The handler is told its lane's next records (decoded, up to the first that cannot be)
/// only where running them ahead skips nothing of their turn: not with an idempotency store
/// (their claims are taken at their turn), not while the partition drains.
#[tokio::test(start_paused = true)]
async fn the_lanes_next_records_are_offered_before_a_drain_and_with_a_store_while_claimed() {
    let next: Vec<Arc<RawRecord>> = vec![
        Arc::new(order("o-2")),
        Arc::new(order("o-3")),
        Arc::new(raw(Some(b"not json"))),
        Arc::new(order("o-5")),
    ];
    // Runs `next[0]` (settled) in a lane holding the rest: what its handler was offered, per
    // attempt.
    let offered = async |setup: Setup, stop: &Stop, lane: &[&str]| {
        let (lead, next) = lane.split_first().expect("a lead");
        let h = setup.build();
        let lane = LaneSlot {
            stop: Arc::default(),
            next: next.iter().map(|id| Arc::new(order(id))).collect(),
        };
        let end = h.worker.run_job(Arc::new(order(lead)), stop, &lane).await;
        assert_eq!(end, JobEnd::Settled);
        h.handler.lanes.lock().unwrap().clone()
    };

    let h = script([Succeed]).build();
    let lane = LaneSlot {
        stop: Arc::default(),
        next,
    };
    let end = h
        .worker
        .run_job(Arc::new(order("o-1")), &Stop::default(), &lane)
        .await;
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        *h.handler.lanes.lock().unwrap(),
        [vec!["o-2".to_owned(), "o-3".to_owned()]],
        "the lane's next records up to the one that cannot be decoded"
    );
    let draining = Stop::default();
    draining.drain.cancel();
    assert_eq!(
        offered(script([Succeed]), &draining, &["o-1", "o-2"]).await,
        [Vec::<String>::new()],
        "none while draining"
    );

    // With a store: the lead's claim fetches the lane's claims ahead; only the prefix whose
    // claims are held for them is offered. o-4 is busy (another worker holds it), o-7 done.
    let store = InMemoryIdempotencyStore::new();
    let Claim::Acquired(_busy) = store.claim(&store_key("o-4"), LEASE).await.unwrap() else {
        panic!("o-4 claimable");
    };
    let Claim::Acquired(token) = store.claim(&store_key("o-7"), LEASE).await.unwrap() else {
        panic!("o-7 claimable");
    };
    store
        .complete(&store_key("o-7"), &token, TTL)
        .await
        .unwrap();
    let with_store = || script([Succeed]).dedup_in(Arc::new(store.clone()));
    assert_eq!(
        offered(
            with_store(),
            &Stop::default(),
            &["o-1", "o-2", "o-3", "o-4", "o-5"]
        )
        .await,
        [vec!["o-2".to_owned(), "o-3".to_owned()]],
        "a busy key ends the prefix"
    );
    assert_eq!(
        offered(
            with_store(),
            &Stop::default(),
            &["o-9", "o-6", "o-7", "o-8"]
        )
        .await,
        [vec!["o-6".to_owned()]],
        "a done key (a duplicate, skipped at its turn) ends the prefix"
    );
}

/// The claims of the records offered ahead hold while the attempt that took them runs (three
/// leases here): the sweeper does not release them, and they are renewed. Each record then
/// takes its claim at its turn, with the token its message carried, and its key is marked
/// done.
#[tokio::test(start_paused = true)]
async fn the_claims_of_records_offered_ahead_hold_while_their_batch_runs() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Stall(LEASE * 3), Succeed])
        .dedup_in(Arc::new(store.clone()))
        .build();
    let next: Vec<Arc<RawRecord>> = vec![Arc::new(order("o-2")), Arc::new(order("o-3"))];
    let lane = LaneSlot {
        stop: Arc::default(),
        next: next.clone(),
    };
    let stop = Stop::default();
    let during = async {
        sleep(LEASE * 2).await;
        [
            key_state(&store, &store_key("o-2")).await,
            key_state(&store, &store_key("o-3")).await,
        ]
    };
    let (end, during) = tokio::join!(
        h.worker.run_job(Arc::new(order("o-1")), &stop, &lane),
        during
    );
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(
        *h.handler.lanes.lock().unwrap(),
        [vec!["o-2".to_owned(), "o-3".to_owned()]]
    );
    assert_eq!(
        during,
        [KeyState::Held; 2],
        "held two leases into the attempt that took them"
    );
    for record in next {
        let end = h.worker.run_job(record, &stop, &KeepSlot).await;
        assert_eq!(end, JobEnd::Settled);
    }
    assert_eq!(key_state(&store, &store_key("o-2")).await, KeyState::Done);
    assert_eq!(key_state(&store, &store_key("o-3")).await, KeyState::Done);
    assert_eq!(h.handled(), 3);
}

/// A revoke while the batch runs (the lane's partition drains): the sweeper, which releases
/// the claims fetched ahead for a draining partition, leaves those lent to the batch until it
/// ended.
#[tokio::test(start_paused = true)]
async fn the_claims_lent_to_a_batch_are_released_at_a_drain_only_once_it_ended() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Stall(LEASE)])
        .dedup_in(Arc::new(store.clone()))
        .build();
    let lane_stop = Arc::new(Stop::default());
    let lane = LaneSlot {
        stop: lane_stop.clone(),
        next: vec![Arc::new(order("o-2"))],
    };
    let during = async {
        sleep(LEASE / 2).await;
        lane_stop.drain.cancel();
        sleep(LEASE / 4).await;
        key_state(&store, &store_key("o-2")).await
    };
    let stop = Stop::default();
    let (end, during) = tokio::join!(
        h.worker.run_job(Arc::new(order("o-1")), &stop, &lane),
        during
    );
    assert_eq!(end, JobEnd::Settled);
    assert_eq!(*h.handler.lanes.lock().unwrap(), [vec!["o-2".to_owned()]]);
    assert_eq!(during, KeyState::Held, "not released while the batch runs");
    sleep(secs(1)).await;
    assert_eq!(
        key_state(&store, &store_key("o-2")).await,
        KeyState::Free,
        "released once it ended"
    );
}

// ---------------------------------------------------------------------------------------------
// Transactional output with idempotency: a key is marked done once its transaction committed
// ---------------------------------------------------------------------------------------------

/// A slot that keeps the claim a record hands over past its job's end.
#[derive(Default)]
struct KeptClaimSlot(Mutex<Option<super::super::waits::AfterCommit>>);

impl super::Slot for KeptClaimSlot {
    fn park(&self) {}
    fn resume(&self) -> Result<(), tokio::sync::oneshot::Receiver<()>> {
        Ok(())
    }
    fn resume_now(&self) {}
    fn release(&self) {}
    fn complete_after_commit(&self, claim: super::super::waits::AfterCommit) {
        *self.0.lock().unwrap() = Some(claim);
    }
}

/// Runs order `id` with transactional output and dedup in `store`: the claim its job kept.
async fn handled_in_a_transaction(h: &Harness, id: &str) -> super::super::waits::AfterCommit {
    let slot = KeptClaimSlot::default();
    let end = h
        .worker
        .run_job(Arc::new(order(id)), &Stop::default(), &slot)
        .await;
    assert_eq!(end, JobEnd::Settled);
    slot.0
        .lock()
        .unwrap()
        .take()
        .expect("the claim is kept past the job's end")
}

/// The record's job ends with its key still held (its outputs and offset enter the open
/// transaction only then); the claim is renewed past its lease while the transaction stays
/// open, and the key is marked done once it committed.
#[tokio::test(start_paused = true)]
async fn with_transactions_a_key_is_done_only_once_its_transaction_committed() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Succeed]).dedup(&store).transactional().build();
    let kept = handled_in_a_transaction(&h, "o-1").await;
    let key = store_key("o-1");
    assert_eq!(
        key_state(&store, &key).await,
        KeyState::Held,
        "held at the job's end"
    );
    let t = h.worker.transactions.clone().expect("transactional");
    let record = order("o-1");
    let commit_later = async {
        sleep(LEASE * 3).await;
        let before = key_state(&store, &key).await;
        t.committed_without_broker();
        before
    };
    let ((), before) = tokio::join!(
        h.worker.complete_after_commit(kept, &record, Some(0)),
        commit_later
    );
    assert_eq!(
        before,
        KeyState::Held,
        "renewed, not done, three leases later"
    );
    assert_eq!(
        key_state(&store, &key).await,
        KeyState::Done,
        "done after the commit"
    );
}

/// The transactions stop before the record's transaction committed (it failed, or the
/// consumer stopped): the claim is released, so the redelivery runs the record at once; a
/// record that did not finish in a transaction (its partition revoked first) too.
#[tokio::test(start_paused = true)]
async fn with_transactions_a_claim_whose_transaction_never_commits_is_released() {
    let store = InMemoryIdempotencyStore::new();
    let h = script([Succeed, Succeed])
        .dedup(&store)
        .transactional()
        .build();
    let t = h.worker.transactions.clone().expect("transactional");
    let kept = handled_in_a_transaction(&h, "o-1").await;
    let record = order("o-1");
    let close_later = async {
        sleep(secs(1)).await;
        t.close();
    };
    tokio::join!(
        h.worker.complete_after_commit(kept, &record, Some(0)),
        close_later
    );
    assert_eq!(
        key_state(&store, &store_key("o-1")).await,
        KeyState::Free,
        "released when the transactions stopped"
    );

    let kept = handled_in_a_transaction(&h, "o-2").await;
    h.worker
        .complete_after_commit(kept, &order("o-2"), None)
        .await;
    assert_eq!(
        key_state(&store, &store_key("o-2")).await,
        KeyState::Free,
        "released when the record did not finish in a transaction"
    );
}
