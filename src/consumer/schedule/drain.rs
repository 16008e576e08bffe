//! How partitions leave the scheduler: a revoke or the consumer's stop drains them (only gap
//! fillers still run), a record given up outside a drain asks for a reset of its partition,
//! and what was given up is counted for the shutdown report.

use super::scheduler::{ABANDONED_LISTED, Job, PartitionState, Scheduler, Tp};

/// Drops a draining partition's buffered records above its highest started offset (all of
/// them with `keep_gap_fillers` false); returns the records and bytes dropped.
pub(super) fn trim_to_gap_fillers(
    p: &mut PartitionState,
    keep_gap_fillers: bool,
) -> (usize, usize) {
    let (mut records, mut bytes) = (0, 0);
    let limit = p.max_started.filter(|_| keep_gap_fillers);
    p.lanes.retain(|_, lane| {
        // A lane's queue is in offset order: cut it at the first record past the limit.
        let keep = lane
            .queue
            .iter()
            .take_while(|(r, _)| limit.is_some_and(|m| r.offset < m))
            .count();
        for (_, b) in lane.queue.drain(keep..) {
            records += 1;
            bytes += b;
        }
        lane.running || lane.blocked || !lane.queue.is_empty()
    });
    p.queued -= records;
    p.queued_bytes -= bytes;
    (records, bytes)
}

impl Scheduler {
    /// While the breaker holds dispatch, records of draining partitions cannot run: drop
    /// them all, gap fillers included (they are delivered again), so that a revoke or a
    /// shutdown does not wait for a downstream that is down.
    pub(super) fn drop_held_draining(&mut self) {
        if !self.breaker.as_ref().is_some_and(|b| b.holds_dispatch()) {
            return;
        }
        for p in self.partitions.values_mut() {
            if p.draining && p.queued > 0 {
                let (records, bytes) = trim_to_gap_fillers(p, false);
                self.buffered_records -= records;
                self.buffered_bytes -= bytes;
            }
        }
    }

    /// Trims draining partition `tp`'s buffered records to gap fillers again (a job's run
    /// handed records back to it); all of them while the breaker holds dispatch (gap
    /// fillers cannot run then, see [`Scheduler::drop_held_draining`]).
    pub(super) fn trim_draining(&mut self, tp: &Tp) {
        let keep = !self.breaker.as_ref().is_some_and(|b| b.holds_dispatch());
        if let Some(p) = self.partitions.get_mut(tp) {
            let (records, bytes) = trim_to_gap_fillers(p, keep);
            self.buffered_records -= records;
            self.buffered_bytes -= bytes;
        }
    }

    /// Starts revoking `tps`: no new records are taken for them, and of their buffered
    /// records only *gap fillers* are kept — records below the highest offset already
    /// started, which must run for the settled records above them to become committable
    /// (in key or unordered mode records settle out of order). Records above it are dropped:
    /// the next owner reads them. Wait with [`Scheduler::drained`] for the rest.
    pub(crate) fn begin_revoke(&mut self, tps: &[Tp]) {
        for tp in tps {
            if let Some(p) = self.partitions.get_mut(tp) {
                p.draining = true;
                p.stop.drain.cancel();
                let (records, bytes) = trim_to_gap_fillers(p, true);
                self.buffered_records -= records;
                self.buffered_bytes -= bytes;
            }
        }
        self.drop_held_draining();
    }

    /// Tells `tps`' workers that the partitions' assignment was lost: they stop renewing
    /// their claims (see [`Stop::lost`]).
    pub(crate) fn lose(&self, tps: &[Tp]) {
        for tp in tps {
            if let Some(p) = self.partitions.get(tp) {
                p.stop.lost.cancel();
            }
        }
    }

    /// Tells the workers of `tps` (every partition with `None`) when their drain ends: a
    /// record in a retry back-off that ends before `deadline` retries (given up, it would hold
    /// back the commit point of every settled record after it, all delivered again); a longer
    /// one is given up at once. The first deadline set for an assignment stays.
    pub(crate) fn give_up_by(&self, tps: Option<&[Tp]>, deadline: tokio::time::Instant) {
        for (tp, p) in &self.partitions {
            if tps.is_none_or(|tps| tps.contains(tp)) {
                let _ = p.stop.give_up_by.set(deadline);
            }
        }
    }

    /// Cancels the waits (back-off, store and dead-letter retries) of `tps`' workers: they
    /// give their records up unsettled (the revoke timeout passed).
    pub(crate) fn cancel(&self, tps: &[Tp]) {
        for tp in tps {
            if let Some(p) = self.partitions.get(tp) {
                p.stop.abandon.cancel();
            }
        }
    }

    /// Whether `tps` have nothing running and nothing left to run.
    pub(crate) fn drained(&self, tps: &[Tp]) -> bool {
        tps.iter()
            .filter_map(|tp| self.partitions.get(tp))
            .all(|p| p.in_flight == 0 && p.queued == 0)
    }

    /// Forgets `tps`, returning the offsets still to commit for them, each with its commit's
    /// metadata.
    pub(crate) fn remove(&mut self, tps: &[Tp]) -> Vec<((Tp, i64), Option<String>)> {
        let mut out = Vec::new();
        for tp in tps {
            let commit = self.partitions.get(tp).and_then(|p| {
                let point = super::scheduler::commit_point(p, self.commit_metadata_on())?;
                Some(((tp.clone(), point), self.commit_metadata(tp, point)))
            });
            if let Some(p) = self.partitions.remove(tp) {
                p.stop.drain.cancel();
                p.stop.abandon.cancel();
                self.forget_buffered(&p);
                out.extend(commit);
            }
        }
        out
    }

    /// Starts stopping: no new records are taken; buffered records are dropped except gap
    /// fillers (see [`Scheduler::begin_revoke`]), so that after the drain everything that
    /// was handled is committable and a restart handles nothing twice. Dropped records are
    /// not committed: they are delivered again after a restart.
    pub(crate) fn begin_stop(&mut self) {
        self.stopping = true;
        self.shutdown.drain.cancel();
        for p in self.partitions.values_mut() {
            p.draining = true;
            let (records, bytes) = trim_to_gap_fillers(p, true);
            self.buffered_records -= records;
            self.buffered_bytes -= bytes;
        }
        self.drop_held_draining();
    }

    /// Cancels every waiting worker (the shutdown deadline passed).
    pub(crate) fn cancel_all(&self) {
        self.shutdown.abandon.cancel();
    }

    /// After the shutdown deadline and its grace: records still in flight (a handler
    /// blocking its thread cannot be given up) count as abandoned too, without coordinates.
    pub(crate) fn abandon_stuck(&mut self) {
        self.abandoned_at_stop_count += self.in_flight + self.settling;
    }

    /// Records given up unsettled since stopping began: how many, and the first
    /// [`ABANDONED_LISTED`] of them as `topic/partition@offset`.
    pub(crate) fn abandoned_at_stop(&self) -> (usize, Vec<String>) {
        (self.abandoned_at_stop_count, self.abandoned_at_stop.clone())
    }

    /// Tier records given up at the stop while only waiting for their due time.
    pub(crate) fn left_for_later_at_stop(&self) -> usize {
        self.left_for_later_at_stop
    }

    /// Partitions to reset to their commit point (a record of theirs was given up outside a
    /// revoke or a stop), each taken once.
    pub(crate) fn take_resets(&mut self) -> Vec<Tp> {
        std::mem::take(&mut self.resets)
    }

    /// Where `tps` restart after a reset: each partition's first unsettled offset received,
    /// else one past its settled prefix; none for a partition that received nothing.
    pub(crate) fn restart_points(&self, tps: &[Tp]) -> Vec<(Tp, i64)> {
        tps.iter()
            .filter_map(|tp| {
                let p = self.partitions.get(tp)?;
                Some((tp.clone(), p.tracker.restart_point()?))
            })
            .collect()
    }

    pub(super) fn note_abandoned(&mut self, job: &Job) {
        self.abandoned_at_stop_count += 1;
        if self.abandoned_at_stop.len() < ABANDONED_LISTED {
            self.abandoned_at_stop.push(job.record.coordinates());
        }
    }
}
