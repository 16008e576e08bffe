//! The scheduler's buffer limits and flow-control decisions: how much room is left for the
//! poll thread's next batch, and which partitions to pause and resume.

use super::scheduler::{Scheduler, Tp};

/// Pause/resume requests from [`Scheduler::flow_control`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FlowChanges {
    pub(crate) pause: Vec<Tp>,
    pub(crate) resume: Vec<Tp>,
}

impl Scheduler {
    /// How many more records the buffer takes before it is full (0 when its bytes are).
    ///
    /// At 0 the poll thread stops pulling records in
    /// bulk (it still polls, slowly, to stay in the group and serve rebalances). This is the
    /// normal back-pressure when handlers are slower than Kafka, and it costs nothing: the
    /// records wait in librdkafka's bounded pre-fetch queue.
    pub(crate) fn room(&self) -> usize {
        if self.buffered_bytes >= self.limits.max_buffered_bytes {
            0
        } else {
            self.limits
                .max_buffered_records
                .saturating_sub(self.buffered_records)
        }
    }

    /// How many more bytes the buffer takes before it is full.
    pub(crate) fn room_bytes(&self) -> usize {
        self.limits
            .max_buffered_bytes
            .saturating_sub(self.buffered_bytes)
    }

    /// The room worth waiting for before pulling records again: a whole poll batch (or half
    /// the buffer, if that is smaller), so a full buffer refills in batches, not one record
    /// per wake-up.
    pub(crate) fn batch_room(&self, max_poll_batch: usize) -> usize {
        max_poll_batch
            .min(self.limits.max_buffered_records / 2)
            .max(1)
    }

    /// Decides which partitions to pause or resume, with hysteresis.
    ///
    /// Pausing is kept for real stalls, because librdkafka drops a paused partition's
    /// pre-fetched records and fetches them again on resume: a partition is paused when it
    /// alone holds its per-partition limit for [`PAUSE_GRACE`] (one fetch response of a fast
    /// partition overshoots the limit at once, and is drained in milliseconds); when it holds
    /// `max_uncommitted_per_partition` records started past its commit point for that grace,
    /// or twice that at once (a record holding the commit point while its dead letter is
    /// acknowledged lets tens of milliseconds of a fast partition pile up behind it); or —
    /// when the buffer overflows its limits by a further 10 % despite the slowed polling
    /// (handlers stuck everywhere) — every partition holding records is. Partitions resume
    /// once the overflow is gone (below half of the limits) and they are below half of their
    /// own limit.
    pub(crate) fn flow_control(&mut self) -> FlowChanges {
        let l = self.limits;
        // Bytes are held at the limit itself (a few large records overshoot it fast, and
        // memory is the point of this bound); records get 10 % slack, since pausing makes
        // librdkafka drop and re-fetch its pre-fetched records.
        if self.buffered_records
            >= l.max_buffered_records
                .saturating_add(l.max_buffered_records / 10)
            || self.buffered_bytes >= l.max_buffered_bytes
        {
            self.throttled = true;
        } else if self.buffered_records <= l.max_buffered_records / 2
            && self.buffered_bytes <= l.max_buffered_bytes / 2
        {
            self.throttled = false;
        }
        let per_partition = l.max_buffered_records_per_partition;
        let now = std::time::Instant::now();
        let uncommitted_limit = l.max_uncommitted_per_partition;
        let mut changes = FlowChanges::default();
        for (tp, p) in &mut self.partitions {
            // Started past the commit point: the tracker's unsettled records (running, or
            // settled behind an unsettled one) but those still buffered, which are not work
            // done (the buffer limits bound them; counted, a full buffer behind a record
            // waiting for its retry paused the partition until its buffer had run dry).
            let uncommitted = p.tracker.unsettled().saturating_sub(p.queued);
            if p.uncommitted_paused {
                p.uncommitted_paused = uncommitted > uncommitted_limit / 2;
            } else if uncommitted >= uncommitted_limit {
                // Held at the limit for the grace without a break, or at twice the limit:
                // a record that holds the commit point for a moment (a dead letter waiting
                // for its acknowledgement) must not pause a fast partition, since pausing
                // drops its pre-fetched records.
                let since = *p.uncommitted_since.get_or_insert(now);
                if uncommitted >= uncommitted_limit.saturating_mul(2)
                    || now.duration_since(since) >= self.pause_grace
                {
                    p.uncommitted_paused = true;
                    p.uncommitted_since = None;
                    tracing::warn!(
                        partition = %format_args!("{}/{}", tp.0, tp.1),
                        uncommitted,
                        limit = uncommitted_limit,
                        "partition paused: too many records started past its commit point (one record is holding it back)"
                    );
                }
            } else {
                p.uncommitted_since = None;
            }
            let over_limit = if p.queued >= per_partition {
                let since = *p.over_limit_since.get_or_insert(now);
                now.duration_since(since) >= self.pause_grace
            } else {
                p.over_limit_since = None;
                false
            };
            if self.stopping {
                if !p.paused {
                    p.paused = true;
                    changes.pause.push(tp.clone());
                }
            } else if p.paused {
                if !self.throttled && !p.uncommitted_paused && p.queued <= per_partition / 2 {
                    p.paused = false;
                    changes.resume.push(tp.clone());
                }
            } else if over_limit || p.uncommitted_paused || (self.throttled && p.queued > 0) {
                p.paused = true;
                changes.pause.push(tp.clone());
            }
        }
        changes
    }

    /// Partitions paused by flow control.
    pub(crate) fn paused(&self) -> Vec<Tp> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.paused)
            .map(|(tp, _)| tp.clone())
            .collect()
    }
}
