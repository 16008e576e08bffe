//! Graceful shutdown (delivery rule 8 in the crate docs): the poll thread's last steps, and the ready-made
//! shutdown signal.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::client::PollConsumer;
use super::commit::commit_final;
use super::flow::apply_flow;
use crate::clock;
use crate::consumer::schedule::Hub;
use crate::consumer::schedule::Scheduler;
use crate::error::{Error, Result};

/// How long each poll waits while in-flight records drain.
const DRAIN_POLL_TIMEOUT: Duration = Duration::from_millis(50);

/// Stop taking records, let in-flight work finish within the deadline (still polling, so
/// the consumer stays in its group), commit what settled (retried until the deadline; a
/// failure is kept for the report), then close.
pub(crate) fn shutdown(consumer: &impl PollConsumer, hub: &Hub, timeout: Duration) {
    info!(?timeout, "shutting down: finishing in-flight records");
    let deadline = clock::after(Instant::now(), timeout);
    let changes = {
        let mut s = hub.lock();
        // Before the drain fires: a worker woken by it reads the deadline at once.
        s.give_up_by(None, clock::deadline_in(timeout));
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
        consumer.poll_and_drop(DRAIN_POLL_TIMEOUT);
    }
    commit_final(consumer, hub, deadline);
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
///
/// The final commit is tried until the shutdown deadline (with a short back-off, the
/// consumer polling meanwhile so that it stays in its group). When it still fails, the
/// report says so: [`commit_error`](Self::commit_error) holds the last error and
/// [`uncommitted`](Self::uncommitted) the partitions left uncommitted; their records settled
/// since the last commit are delivered again after a restart, and the shutdown is not clean.
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
    /// The final commit's last error, when it failed until the shutdown deadline; `None`
    /// when it succeeded or nothing was left to commit.
    pub commit_error: Option<rdkafka::error::KafkaError>,
    /// When the final commit failed: each partition it left uncommitted, as
    /// `topic/partition@offset` with the offset it should have been committed at (the next
    /// record to read). Records of that partition from its last committed offset up to
    /// there are delivered again after a restart. Empty when the commit succeeded.
    pub uncommitted: Vec<String>,
}

impl ShutdownReport {
    /// Whether no record was given up and the final commit succeeded (records
    /// [left for later](Self::left_for_later) do not count).
    pub fn is_clean(&self) -> bool {
        self.abandoned == 0 && self.commit_error.is_none()
    }

    /// `Ok(())` for a clean shutdown, else [`Error::Abandoned`] or [`Error::Commit`].
    ///
    /// # Errors
    /// [`Error::Abandoned`] when records were given up unsettled (whether or not the final
    /// commit failed too); else [`Error::Commit`] when the final commit failed.
    pub fn into_result(self) -> Result<()> {
        if self.abandoned > 0 {
            return Err(Error::Abandoned {
                count: self.abandoned,
                records: self.abandoned_records,
            });
        }
        match self.commit_error {
            Some(source) => Err(Error::Commit {
                uncommitted: self.uncommitted,
                source,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::super::client::fake::{
        Call, FakeConsumer, around_a_record_given_up, end_after, hub_running, tp,
    };
    use super::*;
    use crate::consumer::schedule::JobEnd;

    /// `shutdown_timeout(Duration::MAX)`: the deadline is capped (rule 17), the shutdown
    /// ends at once with nothing in flight. It panicked on the poll thread before
    /// (`Instant::now() + timeout`), and `run()` returned "the poll thread panicked".
    #[test]
    fn a_shutdown_timeout_of_duration_max_shuts_down() {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "g")
            .create()
            .expect("a consumer needs no broker to exist");
        let hub = Hub::idle_for_tests();
        shutdown(&consumer, &hub, Duration::MAX);
        assert!(hub.closing());
    }

    const MS: Duration = Duration::from_millis(1);

    /// Delivery rule 8: the records running when the shutdown begins finish within the
    /// deadline (the consumer polling meanwhile, its partitions paused) and are committed;
    /// the shutdown ends as soon as they did.
    #[test]
    fn a_shutdown_lets_running_records_finish_and_commits_them() {
        let (hub, jobs) = hub_running(3, Duration::from_secs(30));
        let started = Instant::now();
        let workers: Vec<_> = jobs
            .into_iter()
            .zip([60, 20, 40])
            .map(|(job, ms)| end_after(&hub, job, ms * MS, JobEnd::Settled))
            .collect();
        let consumer = FakeConsumer::new();
        shutdown(&consumer, &hub, Duration::from_secs(10));
        let took = started.elapsed();
        for w in workers {
            w.join().unwrap();
        }
        assert!(took >= 60 * MS, "waited for the last record: {took:?}");
        assert!(took < Duration::from_secs(2), "not the deadline: {took:?}");
        assert_eq!(
            consumer.calls_but_polls(),
            [Call::Pause(vec![tp()]), Call::Commit(vec![(tp(), 3)])]
        );
        let polls = consumer.calls();
        let polls = &polls[1..polls.len() - 1];
        assert!(!polls.is_empty(), "it polled while waiting");
        assert!(
            polls.iter().all(|c| *c == Call::Poll(DRAIN_POLL_TIMEOUT)),
            "{polls:?}"
        );
        assert!(hub.closing());
        assert_eq!(hub.lock().abandoned_at_stop(), (0, vec![]));
        assert!(hub.take_final_commit_failure().is_none());
    }

    /// At the deadline, not before, the record still running is cancelled and given up
    /// (listed for the report); what settled below it is committed.
    #[test]
    fn at_the_deadline_a_shutdown_abandons_what_runs_and_commits_the_rest() {
        let deadline = Duration::from_millis(300);
        let (hub, jobs) = hub_running(3, Duration::from_secs(30));
        let (consumer, took, cancelled_at) =
            around_a_record_given_up(&hub, jobs, |consumer| shutdown(consumer, &hub, deadline));
        assert!(
            cancelled_at >= deadline,
            "cancelled early: {cancelled_at:?}"
        );
        assert!(
            took >= deadline && took < deadline + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(
            consumer.calls_but_polls(),
            [Call::Pause(vec![tp()]), Call::Commit(vec![(tp(), 1)])]
        );
        assert_eq!(
            hub.lock().abandoned_at_stop(),
            (1, vec!["t/0@1".to_owned()])
        );
        assert!(hub.closing());
    }

    /// A handler that blocks its thread ignores the cancel: after the deadline and a
    /// second's grace the shutdown goes on without it, counting it abandoned (unlisted).
    #[test]
    fn a_record_that_ignores_the_cancel_is_counted_abandoned_after_the_grace() {
        let deadline = Duration::from_millis(200);
        let (hub, jobs) = hub_running(2, Duration::from_secs(30));
        let [j0, j1] = <[_; 2]>::try_from(jobs).unwrap();
        assert!(hub.finish(j0, JobEnd::Settled).is_none());
        let started = Instant::now();
        let consumer = FakeConsumer::new();
        shutdown(&consumer, &hub, deadline);
        let took = started.elapsed();
        assert!(
            took >= deadline + Duration::from_secs(1) && took < deadline + Duration::from_secs(2),
            "the deadline and the grace: {took:?}"
        );
        assert_eq!(hub.lock().abandoned_at_stop(), (1, vec![]));
        assert_eq!(
            consumer.calls_but_polls(),
            [Call::Pause(vec![tp()]), Call::Commit(vec![(tp(), 1)])]
        );
        drop(j1);
    }

    /// A final commit that fails is tried again after a pause during which the consumer
    /// polls; its success leaves nothing to report.
    #[test]
    fn a_failed_final_commit_is_retried_with_polls_between() {
        let (hub, mut jobs) = hub_running(1, Duration::from_secs(30));
        assert!(hub.finish(jobs.remove(0), JobEnd::Settled).is_none());
        let consumer = FakeConsumer::new();
        consumer.fail_commits(
            1,
            &KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress),
        );
        shutdown(&consumer, &hub, Duration::from_secs(10));
        let calls = consumer.calls();
        let commit = Call::Commit(vec![(tp(), 1)]);
        assert_eq!(consumer.commits(), [vec![(tp(), 1)], vec![(tp(), 1)]]);
        assert_eq!(calls.first(), Some(&Call::Pause(vec![tp()])));
        assert_eq!(calls[1], commit, "nothing ran: no drain polls");
        assert_eq!(calls.last(), Some(&commit));
        let between = &calls[2..calls.len() - 1];
        assert!(
            !between.is_empty() && between.iter().all(|c| matches!(c, Call::Poll(_))),
            "{between:?}"
        );
        let times = consumer.commit_times();
        assert!(times[1] - times[0] >= 100 * MS, "the back-off: {times:?}");
        assert!(hub.take_final_commit_failure().is_none());
        assert!(hub.closing());
    }

    #[test]
    fn a_failed_final_commit_is_not_a_clean_shutdown() {
        let clean = ShutdownReport::default();
        assert!(clean.is_clean());
        assert!(clean.into_result().is_ok());

        let source = KafkaError::ConsumerCommit(RDKafkaErrorCode::GroupAuthorizationFailed);
        let failed = ShutdownReport {
            commit_error: Some(source.clone()),
            uncommitted: vec!["t/0@3".into()],
            ..ShutdownReport::default()
        };
        assert!(!failed.is_clean());
        let err = failed.clone().into_result().expect_err("not clean");
        assert!(err.is_commit_failed(), "{err:?}");
        match &err {
            Error::Commit {
                uncommitted,
                source: s,
            } => {
                assert_eq!(uncommitted, &["t/0@3".to_owned()]);
                assert_eq!(s, &source);
            }
            other => panic!("expected Error::Commit, got {other:?}"),
        }
        assert_eq!(
            crate::error::error_chain(&err),
            "final commit at shutdown failed; 1 partitions left uncommitted (first: t/0@3): \
             Consumer commit error: GroupAuthorizationFailed (Broker: Group authorization failed)"
        );

        let both = ShutdownReport {
            abandoned: 1,
            abandoned_records: vec!["t/0@3".into()],
            ..failed
        };
        assert!(both.into_result().expect_err("not clean").is_abandoned());
    }
}
