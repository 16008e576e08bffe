//! Where a consumer is in its life ([`RunState`]) and when its poll loop last went round,
//! for [`ConsumerSnapshot`](crate::ConsumerSnapshot) and the health routes: a liveness probe
//! needs to tell a poll loop that is stuck from one that is merely idle.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

/// Where a consumer is in its life, in [`ConsumerSnapshot::state`](crate::ConsumerSnapshot::state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunState {
    /// Built; [`run`](crate::RetryingConsumer::run) has not been called.
    NotStarted,
    /// `run` was called: creating missing topics, running the startup checks (the cluster
    /// must answer, the topics must exist), subscribing.
    Starting,
    /// Subscribed and polling.
    Running,
    /// Shutdown was requested (or the poll loop met a fatal error): in-flight records finish,
    /// settled offsets are committed, the group is left.
    Stopping,
    /// The poll loop ended cleanly (a [`ShutdownReport`](crate::ShutdownReport) was returned).
    Stopped,
    /// `run` failed: [`ConsumerSnapshot::failure`](crate::ConsumerSnapshot::failure) says why.
    Failed,
}

impl RunState {
    /// `not-started`, `starting`, `running`, `stopping`, `stopped` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::NotStarted => "not-started",
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Stopping => "stopping",
            RunState::Stopped => "stopped",
            RunState::Failed => "failed",
        }
    }

    /// Whether `run` has returned (or its poll thread has ended).
    pub fn is_over(self) -> bool {
        matches!(self, RunState::Stopped | RunState::Failed)
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The run state, why a run failed, and the poll loop's heartbeat.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    state: Mutex<(RunState, Option<String>)>,
    /// What the heartbeat counts from.
    born: Instant,
    /// Nanoseconds from `born` to the poll loop's last round, plus one (0: never).
    last_poll: AtomicU64,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            state: Mutex::new((RunState::NotStarted, None)),
            born: Instant::now(),
            last_poll: AtomicU64::new(0),
        }
    }
}

impl Lifecycle {
    fn lock(&self) -> std::sync::MutexGuard<'_, (RunState, Option<String>)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves to `state`, unless the run is over already (a late stop request does not turn a
    /// failed run back into a stopping one).
    pub(crate) fn set(&self, state: RunState) {
        let mut s = self.lock();
        if !s.0.is_over() {
            s.0 = state;
        }
    }

    /// The run is over: [`RunState::Failed`] with `failure`, else [`RunState::Stopped`].
    pub(crate) fn end(&self, failure: Option<String>) {
        let mut s = self.lock();
        if s.0.is_over() {
            return;
        }
        s.0 = if failure.is_some() {
            RunState::Failed
        } else {
            RunState::Stopped
        };
        s.1 = failure;
    }

    /// The state and, when it failed, why.
    pub(crate) fn state(&self) -> (RunState, Option<String>) {
        self.lock().clone()
    }

    /// The poll loop went round: called once per iteration.
    pub(crate) fn polled(&self) {
        let nanos = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_poll
            .store(nanos.saturating_add(1), AtomicOrdering::Relaxed);
    }

    /// How long ago the poll loop last went round; `None` before its first round.
    pub(crate) fn since_last_poll(&self) -> Option<Duration> {
        match self.last_poll.load(AtomicOrdering::Relaxed) {
            0 => None,
            n => Some(
                self.born
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(n - 1)),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_is_over_stays_over() {
        let l = Lifecycle::default();
        assert_eq!(l.state(), (RunState::NotStarted, None));
        assert_eq!(l.since_last_poll(), None);
        l.set(RunState::Running);
        l.polled();
        assert!(
            l.since_last_poll()
                .is_some_and(|d| d < Duration::from_secs(5))
        );
        l.end(Some("boom".into()));
        l.set(RunState::Stopping);
        l.end(None);
        assert_eq!(l.state(), (RunState::Failed, Some("boom".into())));
    }
}
