//! A record's wait for its destination (delivery rule 19 in the crate docs): while the
//! breaker of the record's destination holds it, the record waits without its in-flight
//! slot (records of other destinations take it) and keeps its lane (nothing of its key or
//! partition overtakes it); a revoke or a shutdown gives it up at once.

use std::sync::Arc;

use super::waits::Slot;
use crate::consumer::breaker::{Destination, DestinationBreakers, DestinationPass, Destinations};
use crate::consumer::stop::Stop;
use crate::message::Message;

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

    /// Waits until `destination` lets an attempt go; `None` when the record is given up
    /// first (a revoke or a shutdown: it holds its slot again, over the limit if need be).
    pub(crate) async fn admit<'a>(
        &'a self,
        destination: &Destination,
        stop: &Stop,
        slot: &dyn Slot,
    ) -> Option<DestinationPass<'a>> {
        let breakers = &*self.breakers;
        // The fast path: a destination without failures is not even tracked.
        if let Ok(pass) = breakers.try_admit(destination) {
            return Some(pass);
        }
        slot.park();
        breakers.waiting(destination.id, true);
        let admitted = loop {
            let wait = match breakers.try_admit(destination) {
                Ok(pass) => break Some(pass),
                Err(wait) => wait,
            };
            let changed = wait.changed;
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Checked after registering, so a change in between wakes this waiter.
            let until = match breakers.try_admit(destination) {
                Ok(pass) => break Some(pass),
                Err(wait) => wait.until,
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
                () = stop.drain.cancelled() => break None,
                () = stop.abandon.cancelled() => break None,
            }
        };
        breakers.waiting(destination.id, false);
        let Some(pass) = admitted else {
            slot.resume_now();
            return None;
        };
        match slot.resume() {
            Ok(()) => Some(pass),
            Err(handed) => {
                let resumed = tokio::select! {
                    handed = handed => handed.is_ok(),
                    () = stop.abandon.cancelled() => false,
                    () = stop.drain.cancelled() => false,
                };
                if resumed {
                    Some(pass)
                } else {
                    slot.resume_now();
                    None
                }
            }
        }
    }
}
