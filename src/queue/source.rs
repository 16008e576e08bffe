//! The seam between the queue engine and a share-group client.
//!
//! The engine ([`super::engine`]) does not know where its records come from: it asks a
//! [`ShareSource`] for a batch of locked records, settles each one (accept, release,
//! reject), renews the locks of those it still holds, and flushes the settlements. krafka is
//! the first implementation ([`super::krafka_source`]). A librdkafka-backed source (once
//! rdkafka exposes librdkafka's share consumer, a Preview in librdkafka 2.15) slots in by
//! implementing this trait over it: nothing in the engine changes.
//!
//! What an implementation must do:
//! - `poll` returns records each locked for this member (the broker's acquisition lock),
//!   with the broker's delivery count; the engine settles every record of a batch before it
//!   polls again (share consumers in explicit mode refuse the next poll until then).
//! - `settle` and `renew` only record the acknowledgement; the next `poll` carries it to the
//!   broker (no round trip of its own), or `flush` sends it now (renewals, the stop).
//! - `refused` counts the acknowledgement requests the broker refused, however they were
//!   sent (a lock that expired before its acknowledgement arrived, for one).
//! - `close` sends what is pending, gives back every record still held and leaves the group.
//!
//! There is no REJECT: kourier writes its own dead letter (with the original headers and the
//! reason, which the broker's dead-letter queue of KIP-1191 does not keep) and then ACCEPTs.
//! The broker-side backstop (a configured dead-letter queue topic) needs none: the broker
//! writes there the records that reach the group's delivery limit unsettled.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::record::RawRecord;

/// One record a share group handed to this member, locked until it is settled.
pub(crate) struct Delivery<T> {
    /// The record as kourier's other parts read it (codec, dedup key, dead letter).
    pub(crate) record: Arc<RawRecord>,
    /// How many times the broker has delivered the record, this time included.
    pub(crate) delivery_count: Option<u16>,
    /// What the source needs to settle or renew this record.
    pub(crate) token: T,
}

/// How a record is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Done with (handled, a duplicate, or dead-lettered by kourier): never delivered again.
    Accept,
    /// Not done: delivered again at once, to this member or another.
    Release,
}

/// A source of share-group records with per-record acknowledgement and lock renewal.
#[async_trait]
pub(crate) trait ShareSource: Send + Sync + 'static {
    /// What identifies a delivered record to the source.
    type Token: Send + Sync + 'static;

    /// The next batch of records, waiting at most `wait`; empty when none came.
    async fn poll(&self, wait: Duration) -> Result<Vec<Delivery<Self::Token>>, BoxError>;

    /// Records the settlement of a delivered record (sent by the next `flush` or `poll`).
    fn settle(&self, token: &Self::Token, ack: Ack) -> Result<(), BoxError>;

    /// Records a renewal of a delivered record's lock (sent by the next `flush`).
    fn renew(&self, token: &Self::Token) -> Result<(), BoxError>;

    /// Sends the recorded settlements and renewals now.
    async fn flush(&self);

    /// How many acknowledgement requests (per partition) the broker refused so far.
    fn refused(&self) -> u64;

    /// How long a lock lasts, as the broker last said; `None` before it said.
    fn lock_duration(&self) -> Option<Duration>;

    /// Sends what is pending, gives back the records still held and leaves the group.
    async fn close(&self);
}
