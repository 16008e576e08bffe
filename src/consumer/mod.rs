//! [`RetryingConsumer`]: the poll loop, scheduler, workers and offset tracking.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use rdkafka::consumer::BaseConsumer;
use tracing::error;

use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::metrics::DeadLetterCounts;

#[doc(hidden)]
pub mod bench_support;
mod builder;
mod offsets;
mod poll;
mod scheduler;
mod worker;

pub use self::builder::RetryingConsumerBuilder;
pub use self::scheduler::Ordering;
pub use self::worker::DedupKey;

pub(crate) use self::poll::to_raw;
use self::poll::{KourierContext, PollSettings, Shared};
use self::scheduler::Job;
use self::worker::WorkerContext;

/// A Kafka consumer that runs a [`Handler`] for every record with retries, dead-lettering,
/// optional idempotency and at-least-once commits.
///
/// Build one with [`RetryingConsumer::builder`], then [`run`](RetryingConsumer::run) it until
/// a shutdown future resolves. See the crate docs for the delivery guarantees.
pub struct RetryingConsumer<H: Handler> {
    consumer: BaseConsumer<KourierContext>,
    shared: Arc<Shared>,
    worker: Arc<WorkerContext<H>>,
    settings: PollSettings,
}

impl<H: Handler> fmt::Debug for RetryingConsumer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryingConsumer")
            .field("topics", &self.settings.topics)
            .field("group_id", &self.worker.group_id)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> RetryingConsumer<H> {
    /// A handle that reports what the consumer is doing, usable while it runs.
    pub fn monitor(&self) -> ConsumerMonitor {
        ConsumerMonitor {
            shared: self.shared.clone(),
        }
    }

    /// Runs the consumer until `shutdown` resolves, then shuts down gracefully: stops taking
    /// records, lets in-flight records finish within the shutdown timeout, commits settled
    /// offsets synchronously and leaves the group.
    ///
    /// Must be called within a Tokio runtime (any flavour); handlers run as tasks on it.
    /// Polling happens on a dedicated thread, so handlers and back-offs never delay it.
    ///
    /// # Errors
    /// [`Error::Kafka`] when subscribing fails or the client hits a fatal error;
    /// [`Error::PollThread`] when the poll thread could not be started or died.
    pub async fn run<S>(self, shutdown: S) -> Result<()>
    where
        S: Future<Output = ()> + Send,
    {
        let RetryingConsumer {
            consumer,
            shared,
            worker,
            settings,
        } = self;
        let runtime = tokio::runtime::Handle::current();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("kourier-poll".into())
            .spawn(move || {
                // Whatever is dropped here (the handler, the sink, the store) may need the
                // runtime, e.g. a connection pool: keep its context entered.
                let _runtime = runtime.enter();
                let spawn_shared = thread_shared.clone();
                let spawner = runtime.clone();
                let spawn = move |job: Job| {
                    spawner.spawn(work(worker.clone(), spawn_shared.clone(), job));
                };
                let result = poll::poll_loop(consumer, &thread_shared, &settings, &spawn);
                // Drop the handler before `run` returns, inside the runtime context.
                drop(spawn);
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::PollThread(format!("cannot start the poll thread: {e}")))?;

        // Stop the poll thread if this future is dropped, too.
        let _guard = StopOnDrop(shared.clone());
        let mut done_rx = done_rx;
        tokio::select! {
            result = &mut done_rx => return flatten(result),
            () = shutdown => shared.request_stop(),
        }
        flatten(done_rx.await)
    }

    /// Runs until SIGINT (Ctrl-C) or, on Unix, SIGTERM; see [`RetryingConsumer::run`].
    ///
    /// # Errors
    /// As for [`RetryingConsumer::run`].
    pub async fn run_until_signal(self) -> Result<()> {
        self.run(shutdown_signal()).await
    }
}

/// Reports a running consumer's state: see [`RetryingConsumer::monitor`].
#[derive(Debug, Clone)]
pub struct ConsumerMonitor {
    shared: Arc<Shared>,
}

/// A point-in-time view of a consumer, from [`ConsumerMonitor::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerSnapshot {
    /// Records being handled now (running, waiting for a retry or a dead-letter write).
    pub in_flight: usize,
    /// Records received and not started.
    pub buffered_records: usize,
    /// Bytes of the buffered records.
    pub buffered_bytes: usize,
    /// Assigned partitions, as `(topic, partition)`, sorted.
    pub assigned: Vec<(String, i32)>,
    /// Partitions paused by flow control, sorted.
    pub paused: Vec<(String, i32)>,
    /// Records whose handler succeeded, since the consumer was built.
    pub handled: u64,
    /// Transient failures that were (or are being) retried: one per failed attempt followed
    /// by another attempt.
    pub retried: u64,
    /// Dead letters the sink acknowledged, by failure kind.
    pub dead_lettered: DeadLetterCounts,
    /// Records skipped because the idempotency store said their work was done.
    pub duplicates: u64,
}

impl ConsumerMonitor {
    /// The consumer's state now.
    pub fn snapshot(&self) -> ConsumerSnapshot {
        let s = self.shared.lock();
        let list = |tps: Vec<scheduler::Tp>| {
            let mut v: Vec<(String, i32)> =
                tps.into_iter().map(|(t, p)| (t.to_string(), p)).collect();
            v.sort();
            v
        };
        let (buffered_records, buffered_bytes) = s.buffered();
        let counts = &self.shared.metrics.counts;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ConsumerSnapshot {
            in_flight: s.in_flight(),
            buffered_records,
            buffered_bytes,
            assigned: list(s.assigned()),
            paused: list(s.paused()),
            handled: load(&counts.handled),
            retried: load(&counts.retried),
            dead_lettered: counts.dead_lettered(),
            duplicates: load(&counts.duplicates),
        }
    }
}

fn flatten(
    result: std::result::Result<Result<()>, tokio::sync::oneshot::error::RecvError>,
) -> Result<()> {
    result.unwrap_or_else(|_| Err(Error::PollThread("the poll thread panicked".into())))
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.request_stop();
    }
}

/// A worker: runs its job, then keeps taking the next job the scheduler hands it.
async fn work<H: Handler>(ctx: Arc<WorkerContext<H>>, shared: Arc<Shared>, mut job: Job) {
    loop {
        let end = ctx.process(job.record.clone(), &job.cancel).await;
        match shared.finish(&job, end) {
            Some(next) => job = next,
            None => return,
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM: a ready-made shutdown future for
/// [`RetryingConsumer::run`].
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
