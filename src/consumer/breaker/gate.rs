//! The worker's side of the breaker: the gate a record passes before each attempt
//! ([`OutageGate::admit`]), the pass it reports its result with ([`Pass`]), and what the
//! breaker tells it to do after a failure ([`Verdict`]).

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::machine::{Breaker, Caller, Failure, Pass, ProbeMemo};
use crate::consumer::stop::Stop;
use crate::handler::{FailureKind, HandlerError};
use crate::retry::infra_backoff;

/// What the worker does with a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The usual path: the retry policy decides (retry or dead-letter).
    Policy,
    /// Not the record's fault: wait this long (cancellable), then go back to the breaker,
    /// without counting the attempt.
    Hold(Duration),
}

impl Pass<'_> {
    /// Whether this attempt is the breaker's probe (one record tells whether the downstream
    /// is back).
    pub(crate) fn is_probe(&self) -> bool {
        self.probe
    }

    /// The attempt succeeded.
    pub(crate) fn succeeded(mut self) {
        if let Some(b) = self.breaker.take() {
            b.on_success(self.epoch, self.probe);
        }
    }

    /// The attempt failed with `error`; `holds` is how many times this record was held
    /// already (for the back-off of an unavailable downstream while the breaker is closed).
    /// A record the open breaker held before (`memo`) does not count toward opening it again.
    pub(crate) fn failed(
        mut self,
        error: &HandlerError,
        holds: u32,
        memo: &mut ProbeMemo,
    ) -> Verdict {
        let unavailable = error.kind() == FailureKind::Unavailable;
        let counted = unavailable || error.kind() == FailureKind::Transient;
        let held_in = match self.breaker.take() {
            // An unavailable failure is the handler's word that the downstream is down: it
            // needs no second record to count.
            Some(b) if counted => {
                // A record that failed its share of probes takes its normal path now (its
                // attempt counts): records failing on their own cannot hold the breaker
                // open forever (see `with_probes_per_record`).
                let spent = self.probe && !unavailable && {
                    memo.failed_probes = memo.failed_probes.saturating_add(1);
                    memo.failed_probes >= b.policy.probes_per_record()
                };
                let held = b.on_failure(
                    self.epoch,
                    self.probe,
                    Failure {
                        caller: (!unavailable || self.isolated).then_some(self.caller),
                        hint: error.retry_after_hint(),
                        held_in: memo.outage,
                        unavailable,
                        spent,
                    },
                );
                if spent && self.probe {
                    warn!(
                        failed_probes = memo.failed_probes,
                        "a record failed its share of breaker probes: its failures count as attempts again (its retry policy decides)"
                    );
                    return Verdict::Policy;
                }
                held
            }
            Some(b) => {
                b.return_probe(self.probe);
                None
            }
            None => None,
        };
        if let Some(outage) = held_in {
            memo.outage = Some(outage);
        }
        if held_in.is_some() {
            Verdict::Hold(Duration::ZERO)
        } else if unavailable {
            // Never the record's fault: without an open breaker it waits with back-off.
            let backoff = infra_backoff(Duration::from_millis(100), Duration::from_secs(5), holds);
            Verdict::Hold(backoff.max(error.retry_after_hint().unwrap_or_default()))
        } else {
            Verdict::Policy
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            b.return_probe(self.probe);
        }
    }
}

/// The worker's side of the breaker; without one, only [`HandlerError::unavailable`] is
/// special (the record waits with back-off instead of using up attempts).
#[derive(Debug, Clone, Default)]
pub(crate) struct OutageGate(pub(crate) Option<Arc<Breaker>>);

impl OutageGate {
    /// Waits until the breaker lets an attempt go; `None` when `stop` gives the record up
    /// first (a revoke or shutdown: nothing of the record runs while it waits).
    #[cfg(test)]
    pub(crate) async fn admit(
        &self,
        stop: &Stop,
        memo: ProbeMemo,
        caller: Caller,
    ) -> Option<Pass<'_>> {
        self.admit_as(stop, memo, caller, false).await
    }

    /// [`admit`](Self::admit), for a record counted by its destination when `isolated`
    /// (`caller` is then the destination's identity).
    pub(crate) async fn admit_as(
        &self,
        stop: &Stop,
        memo: ProbeMemo,
        caller: Caller,
        isolated: bool,
    ) -> Option<Pass<'_>> {
        let Some(b) = self.0.as_deref() else {
            return Some(Pass {
                breaker: None,
                epoch: 0,
                probe: false,
                caller,
                isolated,
            });
        };
        // The fast path (closed): one lock, no waiter registered.
        if let Ok(mut pass) = b.try_admit(memo, caller) {
            pass.isolated = isolated;
            return Some(pass);
        }
        let mut counted = WaitingGuard(None);
        loop {
            let notified = b.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Checked after registering, so a change in between wakes this waiter.
            let wake_at = match b.try_admit(memo, caller) {
                Ok(mut pass) => {
                    pass.isolated = isolated;
                    return Some(pass);
                }
                Err(wake_at) => wake_at,
            };
            if counted.0.is_none() {
                counted.0 = Some((b, b.begin_waiting(memo)));
            }
            let until_probe = async {
                match wake_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut notified => {}
                () = until_probe => {}
                () = stop.drain.cancelled() => return None,
                () = stop.abandon.cancelled() => return None,
            }
        }
    }
}

/// Counts a waiting record (and whether it counted as fresh) until it stops waiting.
struct WaitingGuard<'a>(Option<(&'a Breaker, bool)>);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        if let Some((b, fresh)) = self.0 {
            b.end_waiting(fresh);
        }
    }
}
