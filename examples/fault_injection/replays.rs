//! Replays: records delivered again after a consumer had already finished them, counted per
//! fault from the outcome logs (see the module docs, "Replays").
//!
//! A record (its tier, partition and offset) is *finished* once a consumer process noted a
//! final outcome for it: `handled`, `duplicate`, `dead-lettered` or `forwarded` (not
//! `abandoned`, which is given up unsettled, nor `left-for-later`). Every final outcome of a
//! record after its first is a *replay*: the record reached a handler again, or the
//! idempotency check, which skipped it as a duplicate. Replays are attributed to the fault
//! during whose window (from its start to the next fault's) they were noted. Records a new
//! owner skipped because the commit metadata named them finished reach no observer: they are
//! the consumers' `skipped_finished`, counted per window from their status lines.

use std::collections::{BTreeMap, HashSet};

use crate::faults::FaultKind;
use crate::outcomes::Final;

/// The start of one fault's window.
pub(crate) struct Mark {
    /// `kill 1/2`, `broker-restart 1/1`, ...
    pub(crate) label: String,
    /// When the fault began (ms since the epoch).
    pub(crate) at_ms: u64,
    /// Kills: records finished at offsets the group's commits did not cover when the process
    /// died, which a next owner without commit metadata delivers again.
    pub(crate) finished_above: Option<u64>,
    /// Each consumer process's `skipped_finished` when the fault began.
    pub(crate) skipped: BTreeMap<usize, u64>,
}

/// One fault's figures.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub(crate) label: String,
    pub(crate) replayed: u64,
    pub(crate) skipped: u64,
    pub(crate) finished_above: Option<u64>,
}

/// A run's replays.
#[derive(Debug, Clone, Default)]
pub(crate) struct Replays {
    /// `finished-offsets` or `none`.
    pub(crate) commit_metadata: &'static str,
    /// Replays and skips before the first fault (none expected: no rebalance yet).
    pub(crate) before_faults: (u64, u64),
    pub(crate) windows: Vec<Window>,
    pub(crate) replayed: u64,
    pub(crate) skipped: u64,
}

/// The label of the `n`-th (1-based) fault of its kind, of `of`.
pub(crate) fn label(kind: FaultKind, n: usize, of: usize) -> String {
    let name = match kind {
        FaultKind::Kill => "kill",
        FaultKind::DltKill => "kill-after-dead-letter",
        FaultKind::Broker => "broker-restart",
        FaultKind::LoadedBroker => "loaded-broker-restart",
        FaultKind::Redis => "redis-outage",
        FaultKind::Zombie => "zombie",
        FaultKind::Outage => "downstream-outage",
    };
    format!("{name} {n}/{of}")
}

/// Distinct records among `finals` at offsets `commits` does not cover (per tier: the
/// source's commits, then each tier topic's).
pub(crate) fn finished_above(finals: &[Final], commits: &[Vec<i64>]) -> u64 {
    finals
        .iter()
        .filter(|f| {
            commits
                .get(f.tier as usize)
                .and_then(|c| c.get(f.partition as usize))
                .is_some_and(|&c| f.offset >= c)
        })
        .map(|f| (f.tier, f.partition, f.offset))
        .collect::<HashSet<_>>()
        .len() as u64
}

/// Counts the replays in `finals` per fault window (`marks`, in order), and the records
/// skipped as finished per window from the processes' `skipped_finished` at each mark and at
/// the end (`skipped_end`).
pub(crate) fn count(
    commit_metadata: &'static str,
    finals: &[Final],
    marks: &[Mark],
    skipped_end: &BTreeMap<usize, u64>,
) -> Replays {
    // In the order they were noted: a zombie and its successor note outcomes at once.
    let mut in_time: Vec<&Final> = finals.iter().collect();
    in_time.sort_by_key(|f| f.time_ms);
    let mut seen = HashSet::new();
    let mut per_window = vec![0u64; marks.len() + 1];
    for f in in_time {
        if !seen.insert((f.tier, f.partition, f.offset)) {
            // Window 0: before the first fault; window i: from mark i - 1 on.
            per_window[marks.partition_point(|m| m.at_ms <= f.time_ms)] += 1;
        }
    }
    // Skipped per window: what each process skipped between the window's mark and the next.
    let empty = BTreeMap::new();
    let skipped_between = |from: &BTreeMap<usize, u64>, to: &BTreeMap<usize, u64>| -> u64 {
        to.iter()
            .map(|(p, &n)| n.saturating_sub(from.get(p).copied().unwrap_or(0)))
            .sum()
    };
    let ends: Vec<&BTreeMap<usize, u64>> = marks
        .iter()
        .skip(1)
        .map(|m| &m.skipped)
        .chain(std::iter::once(skipped_end))
        .collect();
    let windows: Vec<Window> = marks
        .iter()
        .zip(&ends)
        .zip(&per_window[1..])
        .map(|((m, end), &replayed)| Window {
            label: m.label.clone(),
            replayed,
            skipped: skipped_between(&m.skipped, end),
            finished_above: m.finished_above,
        })
        .collect();
    let first = marks.first().map_or(skipped_end, |m| &m.skipped);
    Replays {
        commit_metadata,
        before_faults: (per_window[0], skipped_between(&empty, first)),
        replayed: per_window.iter().sum(),
        skipped: skipped_between(&empty, skipped_end),
        windows,
    }
}

impl Replays {
    /// The per-fault log line's text.
    pub(crate) fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .windows
            .iter()
            .map(|w| {
                format!(
                    "{}: {} replayed{}, {} skipped as finished",
                    w.label,
                    w.replayed,
                    w.finished_above.map_or(String::new(), |n| format!(
                        " ({n} finished above the commits at the kill)"
                    )),
                    w.skipped
                )
            })
            .collect();
        let (replayed, skipped) = self.before_faults;
        if replayed + skipped > 0 {
            parts.push(format!(
                "before the first fault: {replayed} replayed, {skipped} skipped as finished"
            ));
        }
        format!(
            "replays (commit_metadata={}): {}; in all {} replayed, {} skipped as finished",
            self.commit_metadata,
            if parts.is_empty() {
                "no fault".to_owned()
            } else {
                parts.join("; ")
            },
            self.replayed,
            self.skipped
        )
    }
}

/// The line comparing a run without commit metadata (`before`) with one with it (`after`),
/// both with the same seed: per fault `before -> after` replays, then the totals.
pub(crate) fn compare(before: &Replays, after: &Replays) -> String {
    let per_fault: Vec<String> = before
        .windows
        .iter()
        .zip(&after.windows)
        .map(|(b, a)| {
            if b.label == a.label {
                format!("{}: {} -> {}", b.label, b.replayed, a.replayed)
            } else {
                format!("{} {} -> {} {}", b.label, b.replayed, a.label, a.replayed)
            }
        })
        .collect();
    format!(
        "replays before -> after (commit_metadata none -> finished-offsets): {}; in all {} -> {} \
         replayed, {} -> {} skipped as finished",
        if per_fault.is_empty() {
            "no fault".to_owned()
        } else {
            per_fault.join(", ")
        },
        before.replayed,
        after.replayed,
        before.skipped,
        after.skipped
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(time_ms: u64, offset: i64) -> Final {
        Final {
            time_ms,
            tier: 0,
            partition: 0,
            offset,
        }
    }

    #[test]
    fn replays_fall_in_the_window_they_were_noted_in() {
        let finals = [
            fin(10, 0),
            fin(11, 1),
            fin(12, 2),
            // After the kill at 20: 1 and 2 again, 3 new.
            fin(25, 1),
            fin(26, 2),
            fin(27, 3),
            // After the broker restart at 40: 3 again.
            fin(45, 3),
        ];
        let marks = [
            Mark {
                label: "kill 1/1".into(),
                at_ms: 20,
                finished_above: Some(2),
                skipped: BTreeMap::from([(0, 0)]),
            },
            Mark {
                label: "broker-restart 1/1".into(),
                at_ms: 40,
                finished_above: None,
                skipped: BTreeMap::from([(0, 0), (1, 5)]),
            },
        ];
        let r = count("none", &finals, &marks, &BTreeMap::from([(0, 0), (1, 7)]));
        assert_eq!(r.before_faults, (0, 0));
        assert_eq!(
            r.windows.iter().map(|w| w.replayed).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(
            r.windows.iter().map(|w| w.skipped).collect::<Vec<_>>(),
            [5, 2]
        );
        assert_eq!((r.replayed, r.skipped), (3, 7));
        assert_eq!(finished_above(&finals, &[vec![2]]), 2);
        let mut after = r.clone();
        after.windows[0].replayed = 0;
        after.replayed = 1;
        assert_eq!(
            compare(&r, &after),
            "replays before -> after (commit_metadata none -> finished-offsets): kill 1/1: 2 -> 0, \
             broker-restart 1/1: 1 -> 1; in all 3 -> 1 replayed, 7 -> 7 skipped as finished"
        );
    }
}
