//! The consumers under test: the raw baseline's settings and kourier's builder with the run's
//! overrides, the benchmark handler, and a kourier consumer running in the background.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kourier::rdkafka::config::ClientConfig;
use kourier::{Handler, HandlerError, Message, ProcessingOrder, RetryingConsumer, async_trait};
use serde::Deserialize;

use crate::args::Args;
use crate::measure::{LatencyRecorder, epoch_micros};
use crate::services::{bootstrap, client_config};
use crate::{BoxResult, QUEUED_MAX_KBYTES, SENT_AT_HEADER};

pub(crate) fn consumer_config(args: &Args, group: &str) -> ClientConfig {
    // Exactly what kourier's builder sets (builder.rs), so both arms fetch alike.
    let mut config = client_config();
    config
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("queued.max.messages.kbytes", QUEUED_MAX_KBYTES.to_string())
        .set("fetch.max.bytes", "16777216")
        .set("fetch.queue.backoff.ms", "20")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    for (k, v) in &args.consumer_config {
        config.set(k, v);
    }
    config
}

/// A kourier consumer with the run's settings (`--consumer-config`, buffer sizes, limits).
pub(crate) fn kourier_builder(
    args: &Args,
    handler: BenchHandler,
    group: &str,
    topic: &str,
) -> kourier::RetryingConsumerBuilder<BenchHandler> {
    let mut builder = RetryingConsumer::builder(handler)
        .bootstrap_servers(bootstrap())
        .group_id(group)
        .topic(topic);
    for (k, v) in &args.consumer_config {
        builder = builder.kafka_config(k, v);
    }
    if let Some(n) = args.buffer_records {
        builder = builder.max_buffered_records(n as usize);
    }
    if let Some(n) = args.partition_buffer {
        builder = builder.max_buffered_records_per_partition(n as usize);
    }
    match args.ordering.as_deref() {
        Some("key") => builder = builder.ordering(ProcessingOrder::Key),
        Some("unordered") => builder = builder.ordering(ProcessingOrder::Unordered),
        _ => {}
    }
    if let Some(n) = args.max_in_flight {
        builder = builder.max_in_flight(n as usize);
    }
    if let Some(n) = args.uncommitted_per_partition {
        builder = builder.max_uncommitted_per_partition(n as usize);
    }
    builder
}

/// The handler's event: only the id is read; serde skips the padding.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct BenchEvent {
    pub(crate) id: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Handler calls that returned.
    pub(crate) handled: AtomicU64,
    /// Failures returned (permanent in scenario d, transient in e).
    pub(crate) failed: AtomicU64,
    /// First handler entry.
    pub(crate) first: OnceLock<Instant>,
}

#[derive(Debug)]
pub(crate) enum Behaviour {
    Noop,
    FailEvery(u64),
    Sleep(Duration),
    /// Sleep, and fail the first attempt of every `every`-th record transiently.
    SleepFailFirst {
        every: u64,
        sleep: Duration,
    },
    /// Record `handler entry − sent-at`.
    Latency(Arc<LatencyRecorder>),
    /// Deliver to the record's destination (the destination scenarios).
    Deliver(Arc<dyn Deliver>),
}

/// The destination scenarios' work for one record (`destinations::Endpoints`,
/// `hot::HotEndpoints`): record `id`, its `attempt` (1 for the first), sent at `sent` (the
/// header's text).
#[async_trait]
pub(crate) trait Deliver: std::fmt::Debug + Send + Sync {
    async fn deliver(&self, id: u64, attempt: u32, sent: Option<&[u8]>)
    -> Result<(), HandlerError>;
}

#[derive(Debug)]
pub(crate) struct BenchHandler {
    pub(crate) progress: Arc<Progress>,
    pub(crate) behaviour: Behaviour,
}

#[async_trait]
impl Handler for BenchHandler {
    type Event = BenchEvent;

    async fn handle(&self, message: &Message<BenchEvent>) -> Result<(), HandlerError> {
        self.progress.first.get_or_init(Instant::now);
        let result = match &self.behaviour {
            Behaviour::Noop => Ok(()),
            Behaviour::FailEvery(k) => {
                if message.event().id.is_multiple_of(*k) {
                    self.progress.failed.fetch_add(1, AtomicOrdering::Relaxed);
                    Err(HandlerError::permanent("benchmark: permanent failure"))
                } else {
                    Ok(())
                }
            }
            Behaviour::Sleep(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
            Behaviour::SleepFailFirst { every, sleep } => {
                tokio::time::sleep(*sleep).await;
                // Chosen by a hash of the id, not the id itself: ids `≡ k (mod keys)` share a
                // key, so `id % every` would make every record of some keys fail.
                let pick = message.event().id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                if message.attempt() == 1 && pick.is_multiple_of(*every) {
                    self.progress.failed.fetch_add(1, AtomicOrdering::Relaxed);
                    // Not counted as handled: the retry is.
                    return Err(HandlerError::transient("benchmark: transient failure"));
                }
                Ok(())
            }
            Behaviour::Latency(recorder) => {
                recorder.record(message.headers().get(SENT_AT_HEADER), epoch_micros());
                Ok(())
            }
            Behaviour::Deliver(endpoints) => {
                endpoints
                    .deliver(
                        message.event().id,
                        message.attempt(),
                        message.headers().get(SENT_AT_HEADER),
                    )
                    .await
            }
        };
        self.progress.handled.fetch_add(1, AtomicOrdering::Relaxed);
        result
    }
}

pub(crate) fn runtime() -> BoxResult<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

// A kourier consumer running in the background of a runtime: the integration tests' own.
#[path = "../../tests/support/background.rs"]
mod background;
pub(crate) use background::Running;

impl Running {
    pub(crate) async fn stop(self) -> BoxResult<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .map_err(|_| "consumer did not shut down within 120 s")??
            .map(|_report| ())
            .map_err(Into::into)
    }
}
