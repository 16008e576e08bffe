//! The key-order ledger: which records of a key are in retry tiers.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::StoreError;

/// A record's identity in the ledger: its *source* partition and offset (the same in
/// every tier).
///
/// Not `#[non_exhaustive]`, on purpose: partition and offset are the whole coordinate of a
/// record within its [`LedgerKey`]'s topic, its `Ord` is the order the admission rule keeps
/// and [`field`](Self::field) is what a ledger stores. A ledger of your own builds one from
/// what it stored (`SourceId { partition, offset }`); a field added here would change that
/// order and that format, a breaking change whatever the attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceId {
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
}

impl SourceId {
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
/// [tiers module docs](crate::tiers#per-key-order-across-tiers-keep_key_order)).
///
/// Every method is one atomic step. Errors are retried by the consumer with back-off; the
/// record waits meanwhile (it never runs or settles past an unanswered ledger).
#[async_trait]
pub trait KeyOrderLedger: Send + Sync + fmt::Debug + 'static {
    /// Decides whether `record`, now at `tier` (0 for the source topic), may run:
    /// if an earlier record of the key is held, records `record` at
    /// `max(tier, its own recorded tier, the highest tier of the earlier records)` and
    /// answers [`Admission::Defer`] with that tier. Otherwise, if `record` is held at a
    /// higher tier than `tier` (a stale copy), answers `Defer` with that tier. Otherwise
    /// records it at `tier` when `tier > 0` or it was held, and answers `Run`.
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

/// The admission rule on one key's entries (shared by the in-memory ledger and the tests of
/// the Redis script).
pub(crate) fn admit_entries(
    entries: &mut BTreeMap<SourceId, u32>,
    record: SourceId,
    tier: u32,
) -> Admission {
    let earlier = entries.range(..record).map(|(_, t)| *t).max();
    let mine = entries.get(&record).copied();
    if let Some(earlier) = earlier {
        let target = earlier.max(tier).max(mine.unwrap_or(0));
        entries.insert(record, target);
        return Admission::Defer(target);
    }
    match mine {
        Some(t) if t > tier => Admission::Defer(t),
        Some(_) => {
            entries.insert(record, tier);
            Admission::Run { tracked: true }
        }
        None if tier == 0 => Admission::Run { tracked: false },
        None => {
            entries.insert(record, tier);
            Admission::Run { tracked: true }
        }
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
        let Some(entries) = keys.get_mut(&scope) else {
            if tier == 0 {
                return Ok(Admission::Run { tracked: false });
            }
            keys.entry(scope).or_default().insert(record, tier);
            return Ok(Admission::Run { tracked: true });
        };
        Ok(admit_entries(entries, record, tier))
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
