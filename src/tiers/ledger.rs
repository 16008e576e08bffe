//! The key-order ledger: which records of a key are in retry tiers.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::StoreError;

/// A record's identity in the ledger: its *source* partition and offset (the same in
/// every tier). Ordered by partition, then offset: "earlier" in [`AdmitStep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct SourceId {
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
}

impl SourceId {
    /// The record at `offset` of source partition `partition`.
    pub fn new(partition: i32, offset: i64) -> Self {
        SourceId { partition, offset }
    }

    /// `partition/offset`, the field name the Redis ledger uses.
    pub fn field(&self) -> String {
        format!("{}/{}", self.partition, self.offset)
    }
}

/// Which key's ledger: consumer group, source topic and key bytes.
///
/// `#[non_exhaustive]`: what tells one key's ledger from another may grow (a namespace, say).
/// A ledger reads the fields; outside kourier, build one with [`LedgerKey::new`] (tests of a
/// ledger of your own).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct LedgerKey<'a> {
    /// The consumer group.
    pub group: &'a str,
    /// The source topic.
    pub topic: &'a str,
    /// The record key.
    pub key: &'a [u8],
}

impl<'a> LedgerKey<'a> {
    /// The ledger of `key` in `topic` for consumer group `group`.
    pub fn new(group: &'a str, topic: &'a str, key: &'a [u8]) -> Self {
        LedgerKey { group, topic, key }
    }
}

/// The ledger's answer before a record runs.
///
/// `#[non_exhaustive]`: a later version may give a ledger more to answer. A ledger of your
/// own builds either variant as it is; code that matches on an answer (a ledger wrapping
/// another) needs a `_` arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Admission {
    /// Run it; `tracked` when the ledger holds it (it must be settled when it ends).
    Run {
        /// The ledger holds the record: [`KeyOrderLedger::settle`] it when it ends.
        tracked: bool,
    },
    /// Do not run it: it is recorded at this tier (1-based); forward it there.
    Defer(u32),
}

/// The shared record of which records of a key are in retry tiers (see the
/// [tiers module docs](crate::tiers#per-key-order-across-tiers-with_key_order)).
///
/// Every method is one atomic step. Errors are retried by the consumer with back-off; the
/// record waits meanwhile (it never runs or settles past an unanswered ledger).
///
/// # Implementing a ledger
///
/// A ledger stores, per [`LedgerKey`], a map from [`SourceId`] to tier. `place` and `settle`
/// write one entry; `admit` is the one rule with a decision in it, and an implementation
/// does not write that rule itself: it reads what the rule needs, calls [`AdmitStep::decide`]
/// (or [`AdmitStep::on_entries`] with the key's entries), writes
/// [`record_at`](AdmitStep::record_at) when there is one and answers
/// [`admission`](AdmitStep::admission) — all in one atomic step (a transaction, a lock, a
/// compare-and-set). [`InMemoryKeyOrderLedger`] does exactly this; `RedisKeyOrderLedger`
/// runs the same rule as a Lua script (one round trip; its tests check the script against
/// `AdmitStep`).
///
/// ```
/// use std::collections::BTreeMap;
/// use kourier::tiers::{Admission, AdmitStep, SourceId};
///
/// // The key's stored entries: record 0/5 is in tier 2.
/// let mut entries = BTreeMap::from([(SourceId::new(0, 5), 2)]);
/// // Record 0/7 comes up in the source topic (tier 0): it must wait behind 0/5, in tier 2.
/// let step = AdmitStep::on_entries(&entries, SourceId::new(0, 7), 0);
/// assert_eq!(step.admission, Admission::Defer(2));
/// if let Some(tier) = step.record_at {
///     entries.insert(SourceId::new(0, 7), tier); // in the same atomic step as the read
/// }
/// assert_eq!(entries.get(&SourceId::new(0, 7)), Some(&2));
/// ```
#[async_trait]
pub trait KeyOrderLedger: Send + Sync + fmt::Debug + 'static {
    /// Decides whether `record`, now at `tier` (0 for the source topic), may run, by the
    /// rule of [`AdmitStep::decide`], and writes what the rule says, in one atomic step.
    async fn admit(
        &self,
        key: LedgerKey<'_>,
        record: SourceId,
        tier: u32,
    ) -> Result<Admission, StoreError>;

    /// Records `record` at `tier` (before it is forwarded there).
    async fn place(
        &self,
        key: LedgerKey<'_>,
        record: SourceId,
        tier: u32,
    ) -> Result<(), StoreError>;

    /// Removes `record` (it succeeded, was a duplicate, or was dead-lettered).
    async fn settle(&self, key: LedgerKey<'_>, record: SourceId) -> Result<(), StoreError>;
}

/// One step of the admission rule of [`KeyOrderLedger::admit`]: the answer, and the entry
/// to write before answering. A pure function of what the ledger holds for the key, so a
/// ledger implementation reuses it instead of re-implementing the rule (see
/// [Implementing a ledger](KeyOrderLedger#implementing-a-ledger)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdmitStep {
    /// What [`KeyOrderLedger::admit`] answers.
    pub admission: Admission,
    /// The tier to record the record at (insert or overwrite its entry) before answering;
    /// `None`: write nothing.
    pub record_at: Option<u32>,
}

impl AdmitStep {
    /// The rule, for `record` now at `tier` (0 for the source topic), from what the ledger
    /// holds for its key: `earlier`, the highest tier of the held records before `record`
    /// (by [`SourceId`] order; `None` when there is none), and `held`, `record`'s own tier
    /// when it is held.
    ///
    /// - An earlier record is held: `record` must wait behind it — recorded at
    ///   `max(tier, held, earlier)` and deferred there ([`Admission::Defer`]).
    /// - Else `record` is held at a higher tier than `tier` (a stale copy): deferred to that
    ///   tier, nothing written.
    /// - Else it runs ([`Admission::Run`]), recorded at `tier` (and `tracked`) when
    ///   `tier > 0` or it was held; a source record of a key with nothing held is not
    ///   recorded.
    pub fn decide(earlier: Option<u32>, held: Option<u32>, tier: u32) -> Self {
        let (admission, record_at) = match (earlier, held) {
            (Some(earlier), _) => {
                let target = earlier.max(tier).max(held.unwrap_or(0));
                (Admission::Defer(target), Some(target))
            }
            (None, Some(t)) if t > tier => (Admission::Defer(t), None),
            (None, None) if tier == 0 => (Admission::Run { tracked: false }, None),
            (None, _) => (Admission::Run { tracked: true }, Some(tier)),
        };
        AdmitStep {
            admission,
            record_at,
        }
    }

    /// [`decide`](Self::decide) on a key's entries (each held record → its tier).
    pub fn on_entries(entries: &BTreeMap<SourceId, u32>, record: SourceId, tier: u32) -> Self {
        let earlier = entries.range(..record).map(|(_, t)| *t).max();
        Self::decide(earlier, entries.get(&record).copied(), tier)
    }
}

/// (group, topic, key) → the key's records in tiers.
type Entries = HashMap<(String, String, Vec<u8>), BTreeMap<SourceId, u32>>;

/// A [`KeyOrderLedger`] in this process's memory: for a single consumer process and tests.
/// It does not survive a restart; use [`RedisKeyOrderLedger`](crate::tiers::RedisKeyOrderLedger)
/// for several processes.
#[derive(Debug, Default)]
pub struct InMemoryKeyOrderLedger {
    keys: Mutex<Entries>,
}

impl InMemoryKeyOrderLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records are held, over all keys.
    pub fn len(&self) -> usize {
        self.lock().values().map(BTreeMap::len).sum()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn scope(key: LedgerKey<'_>) -> (String, String, Vec<u8>) {
    (key.group.to_owned(), key.topic.to_owned(), key.key.to_vec())
}

#[async_trait]
impl KeyOrderLedger for InMemoryKeyOrderLedger {
    async fn admit(
        &self,
        key: LedgerKey<'_>,
        record: SourceId,
        tier: u32,
    ) -> Result<Admission, StoreError> {
        let mut keys = self.lock();
        let scope = scope(key);
        let step = match keys.get(&scope) {
            Some(entries) => AdmitStep::on_entries(entries, record, tier),
            None => AdmitStep::decide(None, None, tier),
        };
        if let Some(at) = step.record_at {
            keys.entry(scope).or_default().insert(record, at);
        }
        Ok(step.admission)
    }

    async fn place(
        &self,
        key: LedgerKey<'_>,
        record: SourceId,
        tier: u32,
    ) -> Result<(), StoreError> {
        self.lock()
            .entry(scope(key))
            .or_default()
            .insert(record, tier);
        Ok(())
    }

    async fn settle(&self, key: LedgerKey<'_>, record: SourceId) -> Result<(), StoreError> {
        let mut keys = self.lock();
        let scope = scope(key);
        if let Some(entries) = keys.get_mut(&scope) {
            entries.remove(&record);
            if entries.is_empty() {
                keys.remove(&scope);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(offset: i64) -> SourceId {
        SourceId {
            partition: 0,
            offset,
        }
    }

    /// Each branch of the rule: (earlier, held, tier) → (answer, entry written).
    #[test]
    fn the_admission_rule_branch_by_branch() {
        let run = |tracked| Admission::Run { tracked };
        for (earlier, held, tier, admission, record_at) in [
            // An earlier record is held: deferred to the highest of the three, recorded there.
            (Some(2), None, 0, Admission::Defer(2), Some(2)),
            (Some(1), Some(3), 2, Admission::Defer(3), Some(3)),
            (Some(1), None, 3, Admission::Defer(3), Some(3)),
            // A stale copy of a record held higher up: deferred there, nothing written.
            (None, Some(3), 1, Admission::Defer(3), None),
            // Held at this tier or below: runs, tracked, recorded at this tier.
            (None, Some(1), 1, run(true), Some(1)),
            (None, Some(1), 2, run(true), Some(2)),
            // Nothing held: a source record runs untracked; a tier record is recorded.
            (None, None, 0, run(false), None),
            (None, None, 2, run(true), Some(2)),
        ] {
            assert_eq!(
                AdmitStep::decide(earlier, held, tier),
                AdmitStep {
                    admission,
                    record_at
                },
                "{earlier:?} {held:?} {tier}"
            );
        }
        // "Earlier" is by source partition, then offset; the record's own entry is `held`.
        let entries = BTreeMap::from([(SourceId::new(0, 9), 1), (SourceId::new(1, 2), 2)]);
        let step = AdmitStep::on_entries(&entries, SourceId::new(1, 5), 0);
        assert_eq!(step.admission, Admission::Defer(2));
        let step = AdmitStep::on_entries(&entries, SourceId::new(0, 9), 1);
        assert_eq!(step.admission, run(true));
    }

    #[tokio::test]
    async fn later_records_are_deferred_behind_earlier_ones_and_released_in_order() {
        let l = InMemoryKeyOrderLedger::new();
        let k = LedgerKey {
            group: "g",
            topic: "t",
            key: b"k",
        };
        // Nothing held: a source record runs untracked.
        assert_eq!(
            l.admit(k, id(1), 0).await.unwrap(),
            Admission::Run { tracked: false }
        );
        // It fails into tier 1.
        l.place(k, id(1), 1).await.unwrap();
        // The next source record of the key is deferred to tier 1.
        assert_eq!(l.admit(k, id(2), 0).await.unwrap(), Admission::Defer(1));
        // Record 1 runs in tier 1, fails into tier 2.
        assert_eq!(
            l.admit(k, id(1), 1).await.unwrap(),
            Admission::Run { tracked: true }
        );
        l.place(k, id(1), 2).await.unwrap();
        // A third source record goes to the highest tier of the earlier ones.
        assert_eq!(l.admit(k, id(3), 0).await.unwrap(), Admission::Defer(2));
        // Record 2 comes up in tier 1: moved up behind record 1.
        assert_eq!(l.admit(k, id(2), 1).await.unwrap(), Admission::Defer(2));
        // Record 3 comes up in tier 2 before record 2 (it overtook it): goes round again.
        assert_eq!(l.admit(k, id(3), 2).await.unwrap(), Admission::Defer(2));
        // Record 1 succeeds in tier 2.
        assert_eq!(
            l.admit(k, id(1), 2).await.unwrap(),
            Admission::Run { tracked: true }
        );
        l.settle(k, id(1)).await.unwrap();
        assert_eq!(
            l.admit(k, id(2), 2).await.unwrap(),
            Admission::Run { tracked: true }
        );
        l.settle(k, id(2)).await.unwrap();
        assert_eq!(
            l.admit(k, id(3), 2).await.unwrap(),
            Admission::Run { tracked: true }
        );
        l.settle(k, id(3)).await.unwrap();
        assert!(l.is_empty());
        // A stale copy of a record held higher up is sent up, not run.
        l.place(k, id(9), 2).await.unwrap();
        assert_eq!(l.admit(k, id(9), 1).await.unwrap(), Admission::Defer(2));
    }
}
