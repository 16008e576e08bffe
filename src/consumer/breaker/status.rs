//! The breaker's state as the snapshot and the metrics show it: [`BreakerState`],
//! [`BreakerTransition`], [`BreakerStatus`].

use std::fmt;
use std::time::{Duration, SystemTime};

/// The state of a consumer's outage breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Records run at full speed.
    Closed,
    /// The downstream is down: nothing new is dispatched, failing records wait.
    Open,
    /// One probe record is being (or about to be) tried.
    HalfOpen,
}

impl BreakerState {
    /// The `kourier_breaker_state` gauge's value: 0 closed, 1 open, 2 half-open.
    pub(crate) fn gauge(self) -> usize {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    /// `closed`, `open` or `half-open`: the `state` label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of the breaker's state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerTransition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
    /// When it changed.
    pub at: SystemTime,
}

/// The breaker's state in a [`ConsumerSnapshot`](crate::ConsumerSnapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerStatus {
    /// The state now.
    pub state: BreakerState,
    /// Since when it holds.
    pub since: SystemTime,
    /// Times it opened (re-opening after a failed probe included).
    pub opened: u64,
    /// Probes let through (each half-open period lets one).
    pub probes: u64,
    /// Failed calls the breaker absorbed: they used up no attempt and dead-lettered nothing.
    pub held_failures: u64,
    /// Records waiting in workers for the breaker now.
    pub waiting: usize,
    /// How long the breaker stays open next time it opens (or now, if open).
    pub open_interval: Duration,
    /// The last transitions, oldest first (at most [`BreakerStatus::RECENT`]).
    pub recent: Vec<BreakerTransition>,
}

impl BreakerStatus {
    /// How many transitions [`recent`](Self::recent) keeps.
    pub const RECENT: usize = 32;
}
