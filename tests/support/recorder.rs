//! A handler for consumer tests: each event says how its handling goes (fail transiently a
//! number of times, fail permanently, take a while, panic, wait for the test), and a log of
//! every call the handler made, which the tests read back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::{Handler, HandlerError, Message, async_trait};
use serde::{Deserialize, Serialize};

use super::consumer::wait_for;
use super::produce::TestRecord;

/// The header [`Ev::record`] puts the event id in.
pub(crate) const EVENT_ID_HEADER: &str = "event-id";

/// The test event. `id` names the record; `event_id` is a business id (a dedup key), empty
/// when the test has no use for one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ev {
    pub(crate) id: u64,
    #[serde(default)]
    pub(crate) event_id: String,
    pub(crate) key: String,
    /// Transient failures before success.
    #[serde(default)]
    pub(crate) fail_transient: u32,
    /// Fails permanently until the log is [fixed](Log::fix) (a bug fixed before a redrive).
    #[serde(default)]
    pub(crate) permanent: bool,
    #[serde(default)]
    pub(crate) sleep_ms: u64,
    #[serde(default)]
    pub(crate) panic: bool,
    /// After sleeping, waits until the test [opens the gate](Log::open_gate) (at most 60 s).
    #[serde(default)]
    pub(crate) gated: bool,
}

impl Ev {
    /// An event that succeeds at once.
    pub(crate) fn new(id: u64, key: &str) -> Ev {
        Ev {
            id,
            event_id: String::new(),
            key: key.into(),
            fail_transient: 0,
            permanent: false,
            sleep_ms: 0,
            panic: false,
            gated: false,
        }
    }

    /// An event with a business id.
    pub(crate) fn with_event_id(id: u64, event_id: &str, key: &str) -> Ev {
        Ev {
            event_id: event_id.into(),
            ..Ev::new(id, key)
        }
    }

    pub(crate) fn fail_transient(mut self, times: u32) -> Ev {
        self.fail_transient = times;
        self
    }

    pub(crate) fn permanent(mut self) -> Ev {
        self.permanent = true;
        self
    }

    pub(crate) fn sleep_ms(mut self, ms: u64) -> Ev {
        self.sleep_ms = ms;
        self
    }

    pub(crate) fn gated(mut self) -> Ev {
        self.gated = true;
        self
    }

    /// Keyed by `key`, the event as JSON, and the event id (when there is one) in the
    /// [`EVENT_ID_HEADER`] header.
    pub(crate) fn record(&self) -> TestRecord {
        let record = self.record_without_header();
        if self.event_id.is_empty() {
            record
        } else {
            record.header(EVENT_ID_HEADER, Some(self.event_id.clone().into_bytes()))
        }
    }

    /// Keyed by `key`, no headers: only the typed event knows its event id.
    pub(crate) fn record_without_header(&self) -> TestRecord {
        TestRecord::new()
            .key(self.key.as_bytes())
            .value(serde_json::to_vec(self).expect("the event serializes"))
    }
}

/// One handler call.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) id: u64,
    pub(crate) event_id: String,
    pub(crate) key: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) attempt: u32,
    pub(crate) started: Instant,
    pub(crate) ended: Instant,
    pub(crate) ok: bool,
    /// The claim token the attempt held ([`Message::claim_token`]), with idempotency.
    pub(crate) token: Option<kourier::ClaimToken>,
}

/// What the [`Recorder`] did, shared with the test.
#[derive(Debug, Default)]
pub(crate) struct Log {
    calls: Mutex<Vec<Call>>,
    started: Mutex<Vec<u64>>,
    gate_open: AtomicBool,
    fixed: AtomicBool,
}

impl Log {
    pub(crate) fn new() -> Arc<Log> {
        Arc::new(Log::default())
    }

    /// Every call that ended, in the order they ended.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls that succeeded: the side effects.
    pub(crate) fn successes(&self) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.ok).collect()
    }

    /// The ids of the calls that succeeded, in call order.
    pub(crate) fn succeeded_ids(&self) -> Vec<u64> {
        self.successes().iter().map(|c| c.id).collect()
    }

    /// The ids of the calls that succeeded, sorted.
    pub(crate) fn sorted_succeeded_ids(&self) -> Vec<u64> {
        let mut ids = self.succeeded_ids();
        ids.sort_unstable();
        ids
    }

    /// The attempt numbers of the calls for record `id`, in call order.
    pub(crate) fn attempts_of(&self, id: u64) -> Vec<u32> {
        self.calls()
            .iter()
            .filter(|c| c.id == id)
            .map(|c| c.attempt)
            .collect()
    }

    /// The calls for events with business id `event_id`.
    pub(crate) fn calls_for(&self, event_id: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.event_id == event_id)
            .collect()
    }

    /// Whether a call for record `id` has started (it may not have ended).
    pub(crate) fn has_started(&self, id: u64) -> bool {
        self.started.lock().unwrap().contains(&id)
    }

    /// Lets gated events finish.
    pub(crate) fn open_gate(&self) {
        self.gate_open.store(true, Ordering::SeqCst);
    }

    /// Waits until `n` calls have succeeded, failing the test after `timeout`.
    pub(crate) async fn wait_succeeded(&self, n: usize, timeout: Duration) {
        let what = format!("{n} successful handler calls");
        wait_for(&what, timeout, || self.successes().len() >= n).await;
    }

    /// From now on, permanent events succeed.
    pub(crate) fn fix(&self) {
        self.fixed.store(true, Ordering::SeqCst);
    }
}

/// Handles [`Ev`]s as they say, logging each call in its [`Log`].
#[derive(Debug)]
pub(crate) struct Recorder(pub(crate) Arc<Log>);

#[async_trait]
impl Handler for Recorder {
    type Event = Ev;

    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        let started = Instant::now();
        let ev = m.event();
        self.0.started.lock().unwrap().push(ev.id);
        if ev.panic {
            panic!("event {} makes the handler panic", ev.id);
        }
        if ev.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(ev.sleep_ms)).await;
        }
        if ev.gated {
            while !self.0.gate_open.load(Ordering::SeqCst)
                && started.elapsed() < Duration::from_secs(60)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let result = if ev.permanent && !self.0.fixed.load(Ordering::SeqCst) {
            Err(HandlerError::permanent(format!(
                "event {} is permanently bad",
                ev.id
            )))
        } else if m.attempt() <= ev.fail_transient {
            Err(HandlerError::transient(format!(
                "event {} failed on attempt {}",
                ev.id,
                m.attempt()
            )))
        } else {
            Ok(())
        };
        self.0.calls.lock().unwrap().push(Call {
            id: ev.id,
            event_id: ev.event_id.clone(),
            key: ev.key.clone(),
            partition: m.partition(),
            offset: m.offset(),
            attempt: m.attempt(),
            started,
            ended: Instant::now(),
            ok: result.is_ok(),
            token: m.claim_token().cloned(),
        });
        result
    }
}
