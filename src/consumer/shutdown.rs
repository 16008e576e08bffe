//! Graceful shutdown (DESIGN rule 8): the poll thread's last steps, and the ready-made
//! shutdown signal.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use tracing::{error, info, warn};

use super::commit::commit_settled;
use super::flow::apply_flow;
use super::hub::Hub;
use super::scheduler::Scheduler;
use crate::error::{Error, Result};

/// How long each poll waits while in-flight records drain.
const DRAIN_POLL_TIMEOUT: Duration = Duration::from_millis(50);

/// Stop taking records, let in-flight work finish within the deadline (still polling, so
/// the consumer stays in its group), commit what settled, then close.
pub(crate) fn shutdown<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    hub: &Hub,
    timeout: Duration,
) {
    info!(?timeout, "shutting down: finishing in-flight records");
    let deadline = Instant::now() + timeout;
    let changes = {
        let mut s = hub.lock();
        // Before the drain fires: a worker woken by it reads the deadline at once.
        s.give_up_by(None, tokio::time::Instant::now() + timeout);
        s.begin_stop();
        s.flow_control()
    };
    apply_flow(consumer, &hub.metrics, &changes);
    let drained = |s: &Scheduler| s.in_flight() == 0 && s.buffered().0 == 0;
    loop {
        if drained(&hub.lock()) {
            break;
        }
        if Instant::now() >= deadline {
            let running = hub.lock().in_flight();
            warn!(
                running,
                "shutdown deadline passed: abandoning in-flight records (they are not committed)"
            );
            hub.lock().cancel_all();
            hub.wait_until(Duration::from_secs(1), drained);
            hub.lock().abandon_stuck();
            break;
        }
        // Records that still arrive are dropped by the stopping scheduler (not committed).
        let _ = consumer.poll(DRAIN_POLL_TIMEOUT);
    }
    commit_settled(consumer, hub, "shutdown");
    hub.set_closing();
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM: a ready-made shutdown future for
/// [`RetryingConsumer::run`](crate::RetryingConsumer::run).
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

/// How a run ended, from [`RetryingConsumer::run`](crate::RetryingConsumer::run).
///
/// A clean shutdown handled, dead-lettered or skipped every record it started and committed
/// them. Records given up unsettled — still in a handler when the shutdown timeout passed,
/// or only waiting out a retry back-off when shutdown began (they are given up at once) —
/// are listed here; their offsets were not committed, so they are delivered again after a
/// restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "a shutdown may have abandoned records: check `is_clean()` or use `into_result()`"]
pub struct ShutdownReport {
    /// How many records were given up unsettled.
    pub abandoned: usize,
    /// The first 100 of them, as `topic/partition@offset`. A handler that blocks its thread
    /// (not just its task) cannot be given up: such records are counted in
    /// [`abandoned`](Self::abandoned) but not listed.
    pub abandoned_records: Vec<String>,
    /// Retry-tier records that were only waiting for their due time when the shutdown
    /// began: nothing of them had run, they are not committed and run after a restart,
    /// once due. Not a sign of trouble: they do not make the shutdown unclean.
    pub left_for_later: usize,
}

impl ShutdownReport {
    /// Whether no record was given up (records [left for later](Self::left_for_later) do
    /// not count).
    pub fn is_clean(&self) -> bool {
        self.abandoned == 0
    }

    /// `Ok(())` for a clean shutdown, else [`Error::Abandoned`].
    ///
    /// # Errors
    /// [`Error::Abandoned`] when records were given up unsettled.
    pub fn into_result(self) -> Result<()> {
        if self.is_clean() {
            Ok(())
        } else {
            Err(Error::Abandoned {
                count: self.abandoned,
                records: self.abandoned_records,
            })
        }
    }
}
