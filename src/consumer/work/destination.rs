//! A record's wait for its destination (delivery rule 19 in the crate docs): while the
//! breaker of the record's destination holds it, the record waits without its in-flight
//! slot (records of other destinations take it) and keeps its lane (nothing of its key or
//! partition overtakes it); a revoke or a shutdown gives it up at once.

use std::sync::Arc;

use super::waits::Slot;
use crate::consumer::breaker::{
    Denied, Destination, DestinationBreakers, DestinationPass, Destinations,
};
use crate::consumer::stop::Stop;
use crate::message::Message;

/// How a record's wait for its destination ended.
pub(crate) enum Admitted<'a> {
    /// It may make its attempt.
    Pass(DestinationPass<'a>),
    /// Given up while it waited (a revoke or a shutdown): it holds its slot again.
    GaveUp,
    /// Its destination is gone (the handler's words): it is given up, holding its slot.
    Gone(Arc<str>),
}

/// A consumer's destinations: where a record's destination comes from, and their breakers.
pub(crate) struct DestinationGate<T> {
    pub(crate) of: Destinations<T>,
    pub(crate) breakers: Arc<DestinationBreakers>,
}

impl<T> DestinationGate<T> {
    /// The record's destination (`None`: it has none). May panic (the application's
    /// function): the caller guards it.
    pub(crate) fn destination_of(&self, message: &Message<T>) -> Option<Destination> {
        self.of.of(message)
    }

    /// Waits until `destination` lets an attempt go (see [`Admitted`]). The record waits
    /// without its slot; given up, it holds it again (over the limit if need be).
    pub(crate) async fn admit<'a>(
        &'a self,
        destination: &Destination,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Admitted<'a> {
        let breakers = &*self.breakers;
        match breakers.try_admit(destination) {
            // The fast path: a destination without failures is not even tracked.
            Ok(pass) => return Admitted::Pass(pass),
            Err(Denied::Gone(gone)) => return Admitted::Gone(gone),
            Err(Denied::Wait { .. }) => {}
        }
        slot.park();
        breakers.waiting(destination.id, true);
        let admitted = loop {
            let changed = match breakers.try_admit(destination) {
                Ok(pass) => break Admitted::Pass(pass),
                Err(Denied::Gone(gone)) => break Admitted::Gone(gone),
                Err(Denied::Wait { changed, .. }) => changed,
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Checked after registering, so a change in between wakes this waiter.
            let until = match breakers.try_admit(destination) {
                Ok(pass) => break Admitted::Pass(pass),
                Err(Denied::Gone(gone)) => break Admitted::Gone(gone),
                Err(Denied::Wait { until, .. }) => until,
            };
            let until_probe = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut notified => {}
                () = until_probe => {}
                () = stop.drain.cancelled() => break Admitted::GaveUp,
                () = stop.abandon.cancelled() => break Admitted::GaveUp,
            }
        };
        breakers.waiting(destination.id, false);
        let Admitted::Pass(pass) = admitted else {
            // Given up, or gone (its dead letter is written holding the slot).
            slot.resume_now();
            return admitted;
        };
        match slot.resume() {
            Ok(()) => Admitted::Pass(pass),
            Err(handed) => {
                let resumed = tokio::select! {
                    handed = handed => handed.is_ok(),
                    () = stop.abandon.cancelled() => false,
                    () = stop.drain.cancelled() => false,
                };
                if resumed {
                    Admitted::Pass(pass)
                } else {
                    slot.resume_now();
                    Admitted::GaveUp
                }
            }
        }
    }
}
