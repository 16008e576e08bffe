//! A record's wait for its destination (delivery rule 19 in the crate docs): while the
//! breaker of the record's destination holds it, the record waits without its in-flight
//! slot (records of other destinations take it) and keeps its lane (nothing of its key or
//! partition overtakes it); a revoke or a shutdown gives it up at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::waits::Slot;
use crate::clock;
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
    /// It waited [`park_after`](DestinationGate::park_after) for its open destination: it
    /// is to be parked in a retry tier, holding its slot.
    Park,
}

/// A consumer's destinations: where a record's destination comes from, and their breakers.
pub(crate) struct DestinationGate<T> {
    pub(crate) of: Destinations<T>,
    pub(crate) breakers: Arc<DestinationBreakers>,
    /// How long a record waits for its open destination before it is parked in a retry
    /// tier (`None`: it waits in place; the builder sets it only when the consumer has
    /// retry tiers that can take the record without breaking its order).
    pub(crate) park_after: Option<Duration>,
}

impl<T> DestinationGate<T> {
    /// The record's destination (`None`: it has none). May panic (the application's
    /// function): the caller guards it.
    pub(crate) fn destination_of(&self, message: &Message<T>) -> Option<Destination> {
        self.of.of(message)
    }

    /// Waits until `destination` lets an attempt go (see [`Admitted`]). The record waits
    /// without its slot; given up, it holds it again (over the limit if need be).
    ///
    /// `waiting_since`: when the record first waited for its destination (kept across its
    /// attempts: a probe that fails does not restart its wait toward
    /// [`park_after`](Self::park_after)).
    pub(crate) async fn admit<'a>(
        &'a self,
        destination: &Destination,
        stop: &Stop,
        slot: &dyn Slot,
        waiting_since: &mut Option<Instant>,
    ) -> Admitted<'a> {
        let breakers = &*self.breakers;
        // A place under the destination's cap, once its turn came.
        let mut place = None;
        match breakers.try_admit_with(destination, &mut place) {
            // The fast path: a destination without failures is not even tracked.
            Ok(pass) => return Admitted::Pass(pass),
            Err(Denied::Gone(gone)) => return Admitted::Gone(gone),
            Err(Denied::Wait { .. } | Denied::Place(_)) => {}
        }
        slot.park();
        breakers.waiting(destination.id, true);
        // Parked once it has waited this long for its destination while it is down (not
        // for a cap or a rate limit: those free up on their own).
        let since = *waiting_since.get_or_insert_with(Instant::now);
        let park_at = self.park_after.map(|after| clock::after(since, after));
        let admitted = loop {
            let changed = match breakers.try_admit_with(destination, &mut place) {
                Ok(pass) => break Admitted::Pass(pass),
                Err(Denied::Gone(gone)) => break Admitted::Gone(gone),
                Err(Denied::Wait { changed, .. }) => changed,
                Err(Denied::Place(places)) => {
                    // Its turn for a place: the semaphore hands a freed place to the record
                    // that has waited longest, waking it alone.
                    tokio::select! {
                        taken = places.acquire_owned() => place = taken.ok(),
                        () = stop.drain.cancelled() => break Admitted::GaveUp,
                        () = stop.abandon.cancelled() => break Admitted::GaveUp,
                    }
                    continue;
                }
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Checked after registering, so a change in between wakes this waiter.
            let (until, down) = match breakers.try_admit_with(destination, &mut place) {
                Ok(pass) => break Admitted::Pass(pass),
                Err(Denied::Gone(gone)) => break Admitted::Gone(gone),
                // Its destination's records are being parked: so is it, at once (each
                // waiting its own `park_after` in turn would hold its lane that long).
                Err(Denied::Wait { parking: true, .. }) if park_at.is_some() => {
                    break Admitted::Park;
                }
                Err(Denied::Wait { until, down, .. }) => (until, down),
                Err(Denied::Place(_)) => continue,
            };
            let park = async {
                match park_at {
                    Some(t) if down => tokio::time::sleep_until(t).await,
                    _ => std::future::pending().await,
                }
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
                () = park => break Admitted::Park,
                () = stop.drain.cancelled() => break Admitted::GaveUp,
                () = stop.abandon.cancelled() => break Admitted::GaveUp,
            }
        };
        // A place it took and did not use goes to the next waiting record.
        drop(place);
        breakers.waiting(destination.id, false);
        let Admitted::Pass(pass) = admitted else {
            // Given up, gone (its dead letter is written holding the slot) or parked (its
            // forward is written holding the slot).
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::consumer::breaker::DestinationMemo;
    use crate::consumer::work::waits::KeepSlot;
    use crate::handler::HandlerError;
    use crate::metrics::ConsumerMetrics;
    use crate::record::RecordBytes;

    fn gate(of: Destinations<()>, park_after: Option<Duration>) -> DestinationGate<()> {
        DestinationGate {
            breakers: Arc::new(DestinationBreakers::new(
                of.rules(),
                Arc::new(ConsumerMetrics::new("g", &["t".to_owned()])),
                Duration::from_secs(30),
            )),
            park_after,
            of,
        }
    }

    fn endpoint() -> Destination {
        Destination {
            id: 7,
            name: RecordBytes::from("endpoint-7"),
        }
    }

    /// Whether `admit` ended within `within` (and how).
    async fn admitted_within(
        g: &DestinationGate<()>,
        d: &Destination,
        within: Duration,
    ) -> Option<&'static str> {
        let stop = Stop::default();
        let admitted = tokio::time::timeout(within, g.admit(d, &stop, &KeepSlot, &mut None)).await;
        admitted.ok().map(|a| match a {
            Admitted::Pass(_) => "pass",
            Admitted::GaveUp => "gave up",
            Admitted::Gone(_) => "gone",
            Admitted::Park => "park",
        })
    }

    /// A record of an open destination is parked once it waited `park_after`; without
    /// `park_after` it goes on waiting.
    #[tokio::test(start_paused = true)]
    async fn a_record_waiting_for_an_open_destination_is_parked_after_its_wait() {
        let of = || {
            Destinations::by_key()
                .with_open_interval(Duration::from_secs(60), Duration::from_secs(60))
        };
        for (park_after, expected) in [(Some(Duration::from_secs(10)), Some("park")), (None, None)]
        {
            let g = gate(of(), park_after);
            let d = endpoint();
            let pass = g.breakers.try_admit(&d).ok().expect("closed");
            let held = pass.failed(
                &d,
                1,
                &HandlerError::unavailable("connection refused"),
                &mut DestinationMemo::default(),
            );
            assert!(held.is_held());
            assert_eq!(
                admitted_within(&g, &d, Duration::from_secs(11)).await,
                expected,
                "park_after {park_after:?}"
            );
        }
    }

    /// The wait toward `park_after` is the record's whole wait for its destination: a
    /// probe it makes and fails in between (every open interval, here 1 s) does not
    /// restart it, so it is parked 2.5 s after it first waited (after probes at 1 s and 2 s).
    #[tokio::test(start_paused = true)]
    async fn probes_in_between_do_not_restart_the_wait_toward_parking() {
        let second = Duration::from_secs(1);
        let g = gate(
            Destinations::by_key().with_open_interval(second, second),
            Some(Duration::from_millis(2_500)),
        );
        let d = endpoint();
        let down = || HandlerError::unavailable("connection refused");
        let pass = g.breakers.try_admit(&d).ok().expect("closed");
        pass.failed(&d, 1, &down(), &mut DestinationMemo::default());
        let (started, stop) = (Instant::now(), Stop::default());
        let mut since = None;
        let mut probes = 0;
        loop {
            let admitted = tokio::time::timeout(
                Duration::from_secs(10),
                g.admit(&d, &stop, &KeepSlot, &mut since),
            )
            .await
            .expect("admitted or parked within 10 s");
            match admitted {
                Admitted::Park => break,
                Admitted::Pass(probe) => {
                    probes += 1;
                    probe.failed(&d, 1, &down(), &mut DestinationMemo::default());
                }
                Admitted::GaveUp | Admitted::Gone(_) => panic!("neither given up nor gone"),
            }
            assert!(probes < 5, "not parked after {probes} probes");
        }
        assert_eq!(started.elapsed(), Duration::from_millis(2_500));
        assert_eq!(probes, 2);
    }

    /// Once a record of an open destination was parked, its next records are parked at once
    /// (in key order each would otherwise hold its lane for its own `park_after`), until
    /// the destination closes.
    #[tokio::test(start_paused = true)]
    async fn once_a_destination_parks_its_next_records_park_at_once() {
        let g = gate(
            Destinations::by_key()
                .with_open_interval(Duration::from_secs(60), Duration::from_secs(60)),
            Some(Duration::from_secs(5)),
        );
        let d = endpoint();
        let pass = g.breakers.try_admit(&d).ok().expect("closed");
        pass.failed(
            &d,
            1,
            &HandlerError::unavailable("refused"),
            &mut DestinationMemo::default(),
        );
        // How long the next record waits until it is parked.
        let parked_after = || async {
            let started = Instant::now();
            let admitted = admitted_within(&g, &d, Duration::from_secs(6)).await;
            assert_eq!(admitted, Some("park"));
            started.elapsed()
        };
        assert_eq!(
            parked_after().await,
            Duration::from_secs(5),
            "the first waits park_after"
        );
        g.breakers.parked(d.id);
        assert_eq!(
            parked_after().await,
            Duration::ZERO,
            "the next is parked at once"
        );
    }

    /// Places under a cap go to waiting records first come, first served: with a cap of 1
    /// and three records waiting in turn, each freed place goes to the longest waiting one
    /// (and a waiter given up passes its turn on).
    #[tokio::test(start_paused = true)]
    async fn places_under_a_cap_go_to_the_longest_waiting_record() {
        let g = Arc::new(gate(Destinations::by_key().with_max_in_flight(1), None));
        let d = endpoint();
        let running = g.breakers.try_admit(&d).ok().expect("the one place");
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut stops = Vec::new();
        for waiter in 0..4 {
            let (g, d, order_tx) = (g.clone(), d.clone(), order_tx.clone());
            let stop = Stop::default();
            stops.push(stop.clone());
            tokio::spawn(async move {
                if let Admitted::Pass(pass) = g.admit(&d, &stop, &KeepSlot, &mut None).await {
                    order_tx.send(waiter).unwrap();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    pass.succeeded();
                }
            });
            // Each waiter queues before the next starts.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stops[1].drain.cancel();
        tokio::time::sleep(Duration::from_millis(1)).await;
        running.succeeded();
        let mut order = Vec::new();
        while order.len() < 3 {
            let next = tokio::time::timeout(Duration::from_secs(60), order_rx.recv()).await;
            order.push(next.expect("a place was handed on").expect("a waiter went"));
        }
        assert_eq!(order, [0, 2, 3]);
    }

    /// A record waiting for a place under its destination's cap (the destination is not
    /// down) is never parked: the place frees up on its own.
    #[tokio::test(start_paused = true)]
    async fn a_record_waiting_at_a_cap_is_not_parked() {
        let g = gate(
            Destinations::by_key().with_max_in_flight(1),
            Some(Duration::from_secs(1)),
        );
        let d = endpoint();
        let running = g.breakers.try_admit(&d).ok().expect("first place");
        assert_eq!(admitted_within(&g, &d, Duration::from_secs(5)).await, None);
        running.succeeded();
        assert_eq!(
            admitted_within(&g, &d, Duration::from_secs(5)).await,
            Some("pass")
        );
    }
}
