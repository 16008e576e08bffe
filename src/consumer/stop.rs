//! [`Stop`]: how a record's processing is told to stop early (shared by the scheduler, which
//! fires it, and the worker, the breaker and the lease renewal, which wait on it).

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// A cancellation token whose check ([`Signal::is_cancelled`]) is an atomic load: the
/// workers look at their record's stop several times per record, and tokio-util's
/// `CancellationToken::is_cancelled` takes the token's mutex each time. Waiting
/// (`cancelled()`) and passing it on as a token go through the token it derefs to.
///
/// Cancel it through [`Signal::cancel`] (the flag is set before the token is cancelled, so
/// whoever the token wakes sees it set). A signal made with [`Signal::child`] is cancelled
/// with its parent.
#[derive(Debug, Clone, Default)]
pub(crate) struct Signal {
    token: CancellationToken,
    /// Set by [`Signal::cancel`], before the token is cancelled.
    fired: Arc<AtomicBool>,
    /// The flag of the signal this one was made from ([`Signal::child`]).
    parent: Option<Arc<AtomicBool>>,
    /// Its token may be cancelled without its flag (a token from elsewhere, or a child's
    /// child): checks read the token too.
    read_token: bool,
}

impl Signal {
    /// A signal over `token`, which is cancelled elsewhere: its checks read the token.
    #[cfg_attr(not(any(test, feature = "queue")), allow(dead_code))]
    pub(crate) fn watching(token: CancellationToken) -> Signal {
        Signal {
            token,
            read_token: true,
            ..Signal::default()
        }
    }

    /// A signal cancelled when this one is (or on its own).
    pub(crate) fn child(&self) -> Signal {
        Signal {
            token: self.token.child_token(),
            fired: Arc::default(),
            parent: Some(Arc::clone(&self.fired)),
            // Only one generation is followed by the flags: a child's child reads its token.
            read_token: self.read_token || self.parent.is_some(),
        }
    }

    /// Cancels it (and its children).
    pub(crate) fn cancel(&self) {
        self.fired.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether it (or its parent) was cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.fired.load(Ordering::Acquire)
            || self
                .parent
                .as_ref()
                .is_some_and(|p| p.load(Ordering::Acquire))
            || (self.read_token && self.token.is_cancelled())
    }
}

impl Deref for Signal {
    type Target = CancellationToken;

    fn deref(&self) -> &CancellationToken {
        &self.token
    }
}

/// The ways a record's processing is told to stop early.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop {
    /// Give the record up wherever it is (revoke or shutdown deadline passed): it is left
    /// unsettled and delivered again.
    pub(crate) abandon: Signal,
    /// Its partition is being revoked or the consumer is stopping: a record that is only
    /// waiting out a retry back-off is given up at once (nothing of its is running) unless
    /// its back-off ends before [`Stop::deadline`].
    pub(crate) drain: Signal,
    /// When a drain began: when `abandon` will fire (the revoke timeout or the shutdown
    /// deadline).
    pub(crate) give_up_by: Arc<OnceLock<tokio::time::Instant>>,
    /// Its partition's assignment was lost (it may already belong to another member): the
    /// record's claim is no longer renewed during a handler attempt, so the new owner can
    /// take the key once the lease runs out (a dead letter or forward being written keeps
    /// renewing until it is marked settled). Fired with `drain`, before the revoke waits.
    pub(crate) lost: Signal,
}

impl Stop {
    /// When `abandon` fires, once a drain began (see [`Stop::give_up_by`]).
    pub(crate) fn deadline(&self) -> Option<tokio::time::Instant> {
        self.give_up_by.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_cancelled_with_its_parent_and_wakes_waiters_on_its_token() {
        let parent = Signal::default();
        let child = parent.child();
        let grandchild = child.child();
        let sibling = parent.child();
        assert!(!child.is_cancelled() && !grandchild.is_cancelled());
        child.cancel();
        assert!(child.is_cancelled() && grandchild.is_cancelled());
        assert!(
            !parent.is_cancelled() && !sibling.is_cancelled(),
            "not upwards"
        );
        parent.cancel();
        assert!(parent.is_cancelled() && sibling.is_cancelled());
        assert!(
            sibling.token.is_cancelled(),
            "waiters on the token are woken"
        );
    }

    #[test]
    fn a_childs_child_follows_its_grandparent_through_the_token() {
        let root = Signal::default();
        let grandchild = root.child().child();
        root.cancel();
        assert!(grandchild.is_cancelled());
    }

    #[test]
    fn a_watching_signal_reads_the_token_cancelled_elsewhere() {
        let token = CancellationToken::new();
        let signal = Signal::watching(token.clone());
        let child = signal.child();
        assert!(!signal.is_cancelled());
        token.cancel();
        assert!(signal.is_cancelled() && child.is_cancelled());
    }
}
