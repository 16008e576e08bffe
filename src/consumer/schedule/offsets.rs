//! Per-partition offset tracking: which offset may be committed.
//!
//! Records of a partition may settle out of order (key mode, unordered mode). Committing
//! offset `n` tells Kafka that everything below `n` is done, so only the *contiguous settled
//! prefix* of the records we were given may be committed. Offsets are not assumed dense
//! (transaction markers and compaction leave gaps): the tracker only knows the offsets it
//! was handed.

use std::collections::VecDeque;

/// Tracks the records received from one partition and which of them are settled.
#[derive(Debug, Default, Clone)]
pub(crate) struct OffsetTracker {
    /// Received and not yet part of the settled prefix, in offset order: (offset, settled).
    pending: VecDeque<(i64, bool)>,
    /// The highest offset ever received.
    last_received: Option<i64>,
    /// Next offset to commit: one past the end of the contiguous settled prefix.
    watermark: Option<i64>,
    /// The first offset received (for lag before the first commit).
    first_received: Option<i64>,
    /// Records settled so far (what a commit's metadata says changes with it).
    settles: u64,
}

impl OffsetTracker {
    /// Notes that `offset` was received. Returns `false` (and ignores it) when it is not
    /// above every offset received before, i.e. a redelivery within the same assignment.
    pub(crate) fn received(&mut self, offset: i64) -> bool {
        if self.last_received.is_some_and(|last| offset <= last) {
            return false;
        }
        self.last_received = Some(offset);
        self.first_received.get_or_insert(offset);
        self.pending.push_back((offset, false));
        true
    }

    /// Marks `offset` settled. Returns whether the commit watermark moved.
    /// Unknown offsets (never received, or already in the prefix) are ignored.
    pub(crate) fn settled(&mut self, offset: i64) -> bool {
        // Records of a partition mostly settle in order: the oldest pending one first, found
        // without a search.
        let at = match self.pending.front() {
            Some(&(o, _)) if o == offset => Ok(0),
            _ => self.pending.binary_search_by_key(&offset, |&(o, _)| o),
        };
        match at {
            Ok(i) if !self.pending[i].1 => self.pending[i].1 = true,
            _ => return false,
        }
        self.settles += 1;
        let mut moved = false;
        while let Some(&(o, true)) = self.pending.front() {
            self.pending.pop_front();
            self.watermark = Some(o + 1);
            moved = true;
        }
        moved
    }

    /// The offset to commit (one past the last record of the settled prefix), if any
    /// record has been settled.
    pub(crate) fn committable(&self) -> Option<i64> {
        self.watermark
    }

    /// The first offset received.
    pub(crate) fn first_received(&self) -> Option<i64> {
        self.first_received
    }

    /// Where to read again from to deliver every record not yet settled: the first
    /// unsettled offset received, else one past the settled prefix.
    pub(crate) fn restart_point(&self) -> Option<i64> {
        self.pending.front().map(|&(o, _)| o).or(self.watermark)
    }

    /// Records settled so far.
    pub(crate) fn settles(&self) -> u64 {
        self.settles
    }

    /// The settled records at or above `from` (a commit point at most the watermark), as
    /// inclusive ranges in increasing order, not touching: `from` up to the watermark, then
    /// each run of records settled above the first unsettled one (offsets between two of a
    /// run that were never received are inside its range).
    pub(crate) fn finished_ranges(&self, from: i64) -> Vec<(i64, i64)> {
        let mut ranges: Vec<(i64, i64)> = Vec::new();
        if let Some(w) = self.watermark
            && w > from
        {
            ranges.push((from, w - 1));
        }
        let mut run: Option<(i64, i64)> = None;
        for &(offset, settled) in &self.pending {
            match (settled, run.as_mut()) {
                (true, Some(r)) => r.1 = offset,
                (true, None) => run = Some((offset, offset)),
                (false, _) => ranges.extend(run.take()),
            }
        }
        ranges.extend(run);
        ranges
    }

    /// How many received records are not yet part of the settled prefix.
    pub(crate) fn unsettled(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_settles_advance_the_watermark() {
        let mut t = OffsetTracker::default();
        for o in 0..3 {
            assert!(t.received(o));
        }
        assert_eq!(t.committable(), None);
        assert!(t.settled(0));
        assert_eq!(t.committable(), Some(1));
        assert!(t.settled(1));
        assert!(t.settled(2));
        assert_eq!(t.committable(), Some(3));
        assert_eq!(t.unsettled(), 0);
    }

    #[test]
    fn out_of_order_commits_only_the_contiguous_prefix() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.received(o);
        }
        assert!(!t.settled(12));
        assert!(!t.settled(11));
        assert_eq!(t.committable(), None);
        assert!(t.settled(10));
        assert_eq!(t.committable(), Some(13));
        assert!(!t.settled(14));
        assert_eq!(t.committable(), Some(13));
        assert!(t.settled(13));
        assert_eq!(t.committable(), Some(15));
    }

    #[test]
    fn gaps_are_not_assumed_dense() {
        // 3 and 4 are transaction markers: never delivered.
        let mut t = OffsetTracker::default();
        for o in [1, 2, 5, 9] {
            t.received(o);
        }
        t.settled(5);
        assert_eq!(t.committable(), None, "1 and 2 are still open");
        t.settled(1);
        t.settled(2);
        assert_eq!(t.committable(), Some(6));
        t.settled(9);
        assert_eq!(t.committable(), Some(10));
    }

    /// The first offset received (the lag before the first commit counts from it) stays
    /// the first, whatever settles after it.
    #[test]
    fn the_first_offset_received_is_kept() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.first_received(), None);
        t.received(7);
        t.received(9);
        t.settled(7);
        assert_eq!(t.first_received(), Some(7));
    }

    #[test]
    fn finished_ranges_are_the_prefix_then_runs_of_settled_records() {
        let mut t = OffsetTracker::default();
        for o in [10, 11, 12, 13, 15, 16, 17, 19] {
            t.received(o);
        }
        for o in [10, 11, 13, 15, 17, 19] {
            t.settled(o);
        }
        assert_eq!(t.committable(), Some(12));
        // 13 and 15 are one run (14 was never received); 16 is open; 17; 18 unseen, 19.
        assert_eq!(t.finished_ranges(12), [(13, 15), (17, 19)]);
        assert_eq!(
            t.finished_ranges(10),
            [(10, 11), (13, 15), (17, 19)],
            "from an older commit point"
        );
        assert_eq!(t.settles(), 6);
        assert!(!t.settled(13), "settling twice is not counted");
        assert_eq!(t.settles(), 6);
    }

    #[test]
    fn redeliveries_and_unknown_offsets_are_ignored() {
        let mut t = OffsetTracker::default();
        assert!(t.received(5));
        assert!(!t.received(5));
        assert!(!t.received(3));
        assert!(!t.settled(4));
        assert!(t.settled(5));
        assert!(!t.settled(5), "settling twice is harmless");
        assert_eq!(t.committable(), Some(6));
    }

    proptest! {
        /// For any set of offsets (with gaps) and any completion order, the committable
        /// offset never passes an unsettled record, and reaches the end once all settle.
        #[test]
        fn never_commits_past_an_unsettled_record(
            gaps in proptest::collection::vec(1i64..4, 1..60),
            order in any::<proptest::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in gaps { o += g; offsets.push(o); }
            let mut t = OffsetTracker::default();
            for &o in &offsets { t.received(o); }
            // A permutation from the seed (Fisher-Yates with a tiny LCG).
            let mut perm = offsets.clone();
            let mut s = seed ^ (order.index(1000) as u64);
            for i in (1..perm.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                perm.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut done = std::collections::BTreeSet::new();
            for &o in &perm {
                t.settled(o);
                done.insert(o);
                if let Some(c) = t.committable() {
                    for &x in offsets.iter().filter(|&&x| x < c) {
                        prop_assert!(done.contains(&x), "committable {} passes unsettled {}", c, x);
                    }
                }
            }
            prop_assert_eq!(t.committable(), Some(offsets.last().unwrap() + 1));
        }
    }
}
