//! [`Destinations`]: per-destination isolation settings (delivery rule 19 in the crate
//! docs), the setting of
//! [`RetryingConsumerBuilder::destinations`](crate::RetryingConsumerBuilder::destinations).

use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use super::policy::{BreakerPolicy, check_open_interval, doubled};
use crate::error::ConfigError;
use crate::message::Message;
use crate::record::RecordBytes;

type DestinationFn<T> = Arc<dyn Fn(&Message<T>) -> Option<String> + Send + Sync>;

enum Source<T> {
    Key,
    Header(String),
    Fn(DestinationFn<T>),
}

impl<T> Clone for Source<T> {
    fn clone(&self) -> Self {
        match self {
            Source::Key => Source::Key,
            Source::Header(name) => Source::Header(name.clone()),
            Source::Fn(f) => Source::Fn(Arc::clone(f)),
        }
    }
}

/// Per-destination isolation: a breaker for each destination a handler delivers to (a
/// webhook endpoint, a tenant's API, a push provider), so that one destination that is down
/// holds only its own records (delivery rule 19 in the crate docs). Pass it to
/// [`RetryingConsumerBuilder::destinations`](crate::RetryingConsumerBuilder::destinations).
///
/// Each record names its destination: by default its key ([`by_key`](Self::by_key)), or a
/// header ([`header`](Self::header)), or a function of the decoded message
/// ([`from_fn`](Self::from_fn)). A record without one (no key, no header, `None`) is not
/// isolated: only the consumer-wide [breaker](crate::RetryingConsumerBuilder::breaker), if
/// any, sees its failures.
///
/// # A destination's breaker
///
/// - **Closed**: records run. A destination's transient or
///   [unavailable](crate::HandlerError::unavailable) failures are counted in a row (a success
///   resets the count); it *opens* after [`consecutive_failures`](Self::with_consecutive_failures)
///   failures of two records at least (default 3), or at once on an unavailable failure
///   (the handler's word that this destination is down). One record failing alone never
///   opens it: its retry policy decides, as without isolation. (So in key order with the
///   destination as the key, where a destination's records run one at a time, its first
///   failing record may use up its attempts before a second one fails: have the handler
///   say [unavailable](crate::HandlerError::unavailable) for the answers that mean the
///   destination is down — a refused connection, an HTTP `503` — and it opens at once.)
/// - **Open**: the destination's records wait (its failing record too): no attempt is used,
///   nothing is dead-lettered, and a waiting record holds no in-flight slot (records of
///   other destinations take them) while its lane stays taken, so order within a key holds.
///   A revoke or a shutdown gives a waiting record up at once (delivered again later).
///   For the open interval (default 5 s; doubling after each failed probe up to 60 s; a
///   [`retry_after`](crate::HandlerError::retry_after) hint keeps it open at least that long,
///   a day at most) nothing of the destination runs.
/// - **Half-open**: the next record of the destination is its one probe. Success closes it
///   (its waiting records run); a transient or unavailable failure opens it again for twice
///   as long. A probe that ends otherwise (a permanent failure, a duplicate, given up) hands
///   the probe to the next record. A record that fails
///   [`probes_per_record`](Self::with_probes_per_record) probes (default 10) takes its normal
///   path: its failures count as attempts again.
///
/// In [`Partition`](crate::ProcessingOrder::Partition) order a waiting record holds its
/// partition (the order is the partition's); isolation works between partitions only. Use
/// [`Key`](crate::ProcessingOrder::Key) order (with the destination in the key, or a function
/// of it) so that one destination's records never hold another's.
///
/// # The consumer-wide breaker
///
/// With destinations, the consumer-wide breaker counts failures by destination: it opens
/// only when the failures in its window span at least
/// [`min_destinations`](BreakerPolicy::with_min_destinations) destinations (default 3), so a
/// few destinations that are down do not hold the others, while a downstream that is down as
/// a whole (every destination failing) still opens it. A record's unavailable failure opens
/// its destination's breaker, not the consumer's. A destination counts there once, with the
/// failure that opened it: its failed probes and the failures of calls that started before
/// it opened are its own, so a destination that stays down never re-opens the consumer's
/// breaker (nor holds its probe).
///
/// Its failure rate then counts only once its window is full (20 calls by default), not from
/// the policy's `min_calls`: at a start, destinations that are down fail at once (a refused
/// connection) while the others' first calls are still running, and three such failures in
/// a nearly empty window must not read as an outage (with `min_calls` of 3, the throughput
/// benchmark's `dest-down` scenario started with 20 of 1,000 destinations down opened the
/// consumer-wide breaker 99 ms in). Set `min_destinations` above the number of destinations
/// you expect to be down at once.
///
/// # The commit point: records are parked in a retry tier
///
/// A record waiting for its destination is not settled: its partition's commit point stays
/// before it, and the records after it that settle count toward
/// [`max_uncommitted_per_partition`](crate::RetryingConsumerBuilder::max_uncommitted_per_partition)
/// (default 10,000). Held past it for half a second (or past twice it) the partition pauses,
/// and with it every destination of that partition (the benchmark's `dest-down` scenario,
/// 5,000 records/s over 6 partitions with 20 of 1,000 destinations down, paused all six
/// partitions: about 830 records/s each reach 10,000 in 12 s).
///
/// So a record that has waited [`park_after`](Self::with_park_after) (default 5 s) for its
/// open destination is **parked**: forwarded to a [retry tier](crate::tiers) as a *deferred*
/// record (no attempt used, no stage counted, never dead-lettered for it), and its source
/// offset settles once the broker acknowledged the forward. When it comes up in the tier
/// (after the tier's delay) it asks its destination again: closed, it runs; still down, it
/// waits and is parked round the same tier again. With
/// [`RetryTiers::with_key_order`](crate::tiers::RetryTiers::with_key_order) its key's later
/// records are deferred into the tier behind it, so order within the key holds (in
/// [`Unordered`](crate::ProcessingOrder::Unordered) mode tiers without key order park too).
/// Once a record of a destination is parked, its later records that find it down are parked
/// at once (until it closes), so none holds its lane for `park_after` in turn. Each park
/// costs one forward per tier delay per waiting record, and after the destination comes back
/// its parked records of one key run one per tier delay or so (each waits in the tier for the
/// one before it to settle): the benchmark's `dest-down --park` (a 1 s tier) delivered them
/// in 15 s, against 1.4 s waiting in place. Parked records count in
/// [`DestinationsStatus::parked`](crate::DestinationsStatus::parked) and as forwarded. A
/// partition then holds about its records per second × `park_after` past a waiting record:
/// keep that under `max_uncommitted_per_partition` (the default 5 s and 10,000 allow up to
/// 2,000 records/s per partition).
///
/// Without retry tiers (or in an ordered mode with tiers that do not keep key order) records
/// wait in place: size `max_uncommitted_per_partition` for the longest outage of one
/// destination you want to ride out, about the partition's records per second × that outage.
/// What finished above a waiting record is not handled again after a rebalance
/// ([`CommitMetadata`](crate::CommitMetadata)), within the metadata's size.
///
/// # Memory
///
/// Only destinations with failures are tracked (a destination whose calls succeed costs
/// nothing), at most [`max_tracked`](Self::with_max_tracked) at once (default 10,000; about
/// 200 bytes each plus the destination's name). A closed destination with no failure for the
/// [idle expiry](Self::with_idle_expiry) (default 5 min) is forgotten, and so is an open
/// one whose interval ended that long ago with no record waiting. When the cap is reached
/// and nothing can be forgotten, a destination failing for the first time is *not tracked*:
/// its failures take the retry policy (and the consumer-wide breaker) as without isolation;
/// `kourier_destinations_untracked_total` counts them and a warning is logged (throttled).
///
/// ```
/// use std::time::Duration;
/// use kourier::{Destinations, Message};
/// # #[derive(serde::Deserialize)] struct Webhook { endpoint: String }
///
/// let by_key = Destinations::<Webhook>::by_key();
/// let by_endpoint = Destinations::from_fn(|m: &Message<Webhook>| Some(m.event().endpoint.clone()))
///     .with_consecutive_failures(5)
///     .with_open_interval(Duration::from_secs(10), Duration::from_secs(300));
/// assert_eq!(by_endpoint.open_interval(), Duration::from_secs(10));
/// # let _ = by_key;
/// ```
pub struct Destinations<T> {
    source: Source<T>,
    max_in_flight: Option<u32>,
    rate: Option<(u32, Duration)>,
    gone: GoneRecords,
    gone_for: Duration,
    consecutive: u32,
    open_interval: Duration,
    max_open_interval: Duration,
    max_tracked: usize,
    idle_expiry: Duration,
    probes_per_record: u32,
    park_after: Option<Duration>,
    /// Destinations are told apart by a hash of their name, seeded per process (a hostile
    /// name cannot pick another's slot).
    hasher: foldhash::fast::RandomState,
}

impl<T> Clone for Destinations<T> {
    fn clone(&self) -> Self {
        Destinations {
            source: self.source.clone(),
            hasher: self.hasher.clone(),
            ..*self
        }
    }
}

impl<T> fmt::Debug for Destinations<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            Source::Key => "key".to_owned(),
            Source::Header(name) => format!("header {name:?}"),
            Source::Fn(_) => "fn".to_owned(),
        };
        f.debug_struct("Destinations")
            .field("source", &source)
            .field("consecutive_failures", &self.consecutive)
            .field("open_interval", &self.open_interval)
            .field("max_open_interval", &self.max_open_interval)
            .field("max_tracked", &self.max_tracked)
            .field("idle_expiry", &self.idle_expiry)
            .field("probes_per_record", &self.probes_per_record)
            .field("max_in_flight", &self.max_in_flight)
            .field("rate", &self.rate)
            .field("gone", &self.gone)
            .field("gone_for", &self.gone_for)
            .field("park_after", &self.park_after)
            .finish()
    }
}

/// What happens to the records of a destination the handler said is
/// [gone](crate::HandlerError::destination_gone): the setting of
/// [`Destinations::with_gone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GoneRecords {
    /// Dead-lettered at once (reason `permanent`, the error saying the destination is gone
    /// and what the handler said), without calling the handler: the record that got the
    /// answer, the destination's records waiting for it, and its later ones while it is
    /// gone. The default.
    #[default]
    DeadLetter,
    /// They wait, as for an open destination (no attempts used, nothing dead-lettered),
    /// until it is probed again: for destinations that may come back (a customer who will
    /// re-enable an endpoint).
    Wait,
}

/// The longest name of a destination kept for the snapshot and the logs (longer ones are
/// cut, at a character boundary).
pub(crate) const MAX_NAME_CHARS: usize = 96;

/// A record's destination: its identity and its name's bytes.
#[derive(Clone)]
pub(crate) struct Destination {
    pub(crate) id: u64,
    pub(crate) name: RecordBytes,
}

impl Destination {
    /// The name for the snapshot and the logs: escaped when not UTF-8, cut at
    /// [`MAX_NAME_CHARS`].
    pub(crate) fn display_name(&self) -> Box<str> {
        let bytes = self.name.as_ref();
        let text = String::from_utf8_lossy(bytes);
        match text.char_indices().nth(MAX_NAME_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]).into_boxed_str(),
            None => text.into_owned().into_boxed_str(),
        }
    }
}

impl<T> Destinations<T> {
    /// How long a record waits for its open destination before it is parked in a retry
    /// tier, by default (see [`with_park_after`](Self::with_park_after)).
    pub const DEFAULT_PARK_AFTER: Duration = Duration::from_secs(5);

    fn with_source(source: Source<T>) -> Self {
        Destinations {
            source,
            max_in_flight: None,
            rate: None,
            gone: GoneRecords::DeadLetter,
            gone_for: Duration::from_secs(3600),
            consecutive: 3,
            open_interval: Duration::from_secs(5),
            max_open_interval: Duration::from_secs(60),
            max_tracked: 10_000,
            idle_expiry: Duration::from_secs(300),
            probes_per_record: 10,
            park_after: Some(Self::DEFAULT_PARK_AFTER),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// A record's destination is its key (a record without a key has none).
    pub fn by_key() -> Self {
        Destinations::with_source(Source::Key)
    }

    /// A record's destination is the value of header `name` (a record without it has none).
    pub fn header(name: impl Into<String>) -> Self {
        Destinations::with_source(Source::Header(name.into()))
    }

    /// A record's destination is computed from the decoded message (`None`: it has none). A
    /// panic in `f` dead-letters the record (reason `panic`), like one in a dedup-key
    /// function. Name the closure's parameter type (`|m: &Message<Ev>|`), as for
    /// [`DedupKey::from_fn`](crate::DedupKey::from_fn).
    pub fn from_fn(f: impl Fn(&Message<T>) -> Option<String> + Send + Sync + 'static) -> Self {
        Destinations::with_source(Source::Fn(Arc::new(f)))
    }

    /// A destination opens after `n` (at least 2) transient failures in a row, of two records
    /// at least (default 3).
    #[must_use]
    pub fn with_consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive = n;
        self
    }

    /// How long a destination stays open before its first probe (`initial`, default 5 s),
    /// and the most it stays open after failed probes (each doubles it; default 60 s). Either
    /// above [`BreakerPolicy::MAX_OPEN_INTERVAL`] (a day) is taken as a day. `build()` refuses
    /// a zero `initial` and a `max` below `initial`.
    #[must_use]
    pub fn with_open_interval(mut self, initial: Duration, max: Duration) -> Self {
        self.open_interval = initial.min(BreakerPolicy::MAX_OPEN_INTERVAL);
        self.max_open_interval = max.min(BreakerPolicy::MAX_OPEN_INTERVAL);
        self
    }

    /// At most `n` destinations tracked at once (1 to 1,000,000; default 10,000): see
    /// *Memory* above for what happens past it.
    #[must_use]
    pub fn with_max_tracked(mut self, n: usize) -> Self {
        self.max_tracked = n;
        self
    }

    /// A destination with no failure for this long is forgotten (default 5 min; at most a
    /// day, longer is taken as a day; `build()` refuses zero).
    #[must_use]
    pub fn with_idle_expiry(mut self, idle: Duration) -> Self {
        self.idle_expiry = idle.min(BreakerPolicy::MAX_OPEN_INTERVAL);
        self
    }

    /// How many probes of its destination one record may fail transiently before its
    /// failures count as attempts again (at least 1; default 10).
    #[must_use]
    pub fn with_probes_per_record(mut self, n: u32) -> Self {
        self.probes_per_record = n;
        self
    }

    /// At most `n` attempts (at least 1) to one destination run at once: a destination's
    /// further records wait (without an in-flight slot) until one ends, first come, first
    /// served (a freed place goes to the record that has waited longest, and wakes it
    /// alone). So no destination
    /// takes more than `n` of the consumer's
    /// [`max_in_flight`](crate::RetryingConsumerBuilder::max_in_flight) slots, however hot it
    /// is. Default: no cap. (In key order with the destination as the key, a destination
    /// runs one record at a time anyway.)
    #[must_use]
    pub fn with_max_in_flight(mut self, n: u32) -> Self {
        self.max_in_flight = Some(n);
        self
    }

    /// At most `calls` attempts (at least 1) to one destination per `per` (longer than zero;
    /// a day at most), with bursts of up to `calls`: a token bucket per destination. A record
    /// whose destination has no token left waits for the next one (without an in-flight
    /// slot, its attempts not counted). Default: no limit. A destination's own
    /// `429 Too Many Requests` is better answered with
    /// [`HandlerError::unavailable`](crate::HandlerError::unavailable) and its
    /// [`retry_after`](crate::HandlerError::retry_after): the destination pauses for that long.
    #[must_use]
    pub fn with_rate_limit(mut self, calls: u32, per: Duration) -> Self {
        self.rate = Some((calls, per.min(BreakerPolicy::MAX_OPEN_INTERVAL)));
        self
    }

    /// What happens to a destination's records once the handler said it is
    /// [gone](crate::HandlerError::destination_gone), and for how long (default: they are
    /// dead-lettered, for an hour; at most a day, longer is taken as a day; a
    /// [`retry_after`](crate::HandlerError::retry_after) hint on the error makes it longer).
    /// After that, the destination's next record probes it like an open one's.
    #[must_use]
    pub fn with_gone(mut self, records: GoneRecords, gone_for: Duration) -> Self {
        self.gone = records;
        self.gone_for = gone_for.min(BreakerPolicy::MAX_OPEN_INTERVAL);
        self
    }

    /// A record that has waited `after` for its open destination is **parked**: forwarded to
    /// a retry tier (its first, or the tier it came from) as a deferred record — no attempt
    /// used, no stage counted — so that its partition's commit point moves on (see *The
    /// commit point* above). Default [`DEFAULT_PARK_AFTER`](Self::DEFAULT_PARK_AFTER)
    /// (5 s); at most a day, longer is taken as a day; `build()` refuses zero. It needs
    /// [retry tiers](crate::RetryingConsumerBuilder::retry_tiers), and in
    /// [`Key`](crate::ProcessingOrder::Key) or [`Partition`](crate::ProcessingOrder::Partition)
    /// order tiers that keep key order ([`RetryTiers::with_key_order`](crate::tiers::RetryTiers::with_key_order)),
    /// so that the key's later records follow it into the tier; otherwise records wait in
    /// place, whatever this says.
    #[must_use]
    pub fn with_park_after(mut self, after: Duration) -> Self {
        self.park_after = Some(after.min(BreakerPolicy::MAX_OPEN_INTERVAL));
        self
    }

    /// Records wait for their open destination in place, however long: nothing is parked
    /// in a retry tier (see [`with_park_after`](Self::with_park_after)).
    #[must_use]
    pub fn without_parking(mut self) -> Self {
        self.park_after = None;
        self
    }

    /// How long a record waits for its open destination before it is parked in a retry
    /// tier (`None`: never parked).
    pub fn park_after(&self) -> Option<Duration> {
        self.park_after
    }

    /// How long a destination stays open before its first probe.
    pub fn open_interval(&self) -> Duration {
        self.open_interval
    }

    /// The longest a destination stays open between probes.
    pub fn max_open_interval(&self) -> Duration {
        self.max_open_interval
    }

    /// How many failures in a row open a destination.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// At most this many destinations are tracked at once.
    pub fn max_tracked(&self) -> usize {
        self.max_tracked
    }

    /// Checks the settings (called by `build()`).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| Err(ConfigError::invalid("destinations", reason));
        if self.consecutive < 2 {
            return invalid(
                "consecutive_failures must be at least 2 (failures of two records)".into(),
            );
        }
        check_open_interval(self.open_interval, self.max_open_interval).or_else(invalid)?;
        if !(1..=1_000_000).contains(&self.max_tracked) {
            return invalid(format!(
                "max_tracked ({}) must be in 1..=1000000",
                self.max_tracked
            ));
        }
        if self.idle_expiry.is_zero() {
            return invalid("the idle expiry must be longer than zero".into());
        }
        if self.probes_per_record == 0 {
            return invalid("probes_per_record must be at least 1".into());
        }
        if self.max_in_flight == Some(0) {
            return invalid("max_in_flight must be at least 1".into());
        }
        if let Some((calls, per)) = self.rate
            && (calls == 0 || per.is_zero())
        {
            return invalid(format!(
                "the rate limit ({calls} per {per:?}) needs at least 1 call per period longer than zero"
            ));
        }
        if self.gone_for.is_zero() {
            return invalid("gone_for must be longer than zero".into());
        }
        if self.park_after.is_some_and(|d| d.is_zero()) {
            return invalid("park_after must be longer than zero (or use without_parking)".into());
        }
        Ok(())
    }

    /// The record's destination (`None`: it has none). May panic (a function's panic): the
    /// caller guards it.
    pub(crate) fn of(&self, message: &Message<T>) -> Option<Destination> {
        let name = match &self.source {
            Source::Key => message.raw().key.clone()?,
            Source::Header(name) => RecordBytes::from(message.headers().get(name)?.to_vec()),
            Source::Fn(f) => RecordBytes::from(f(message)?.into_bytes()),
        };
        Some(Destination {
            id: self.hasher.hash_one(name.as_ref()),
            name,
        })
    }

    /// The settings the breakers of destinations run with.
    pub(crate) fn rules(&self) -> DestinationRules {
        DestinationRules {
            consecutive: self.consecutive,
            open_interval: self.open_interval,
            max_open_interval: self.max_open_interval,
            max_tracked: self.max_tracked,
            idle_expiry: self.idle_expiry,
            probes_per_record: self.probes_per_record,
            max_in_flight: self.max_in_flight,
            rate: self.rate,
            gone: self.gone,
            gone_for: self.gone_for,
        }
    }
}

/// [`Destinations`]' settings without the source (what the state machine needs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DestinationRules {
    pub(crate) consecutive: u32,
    pub(crate) open_interval: Duration,
    pub(crate) max_open_interval: Duration,
    pub(crate) max_tracked: usize,
    pub(crate) idle_expiry: Duration,
    pub(crate) probes_per_record: u32,
    pub(crate) max_in_flight: Option<u32>,
    /// `calls` per period.
    pub(crate) rate: Option<(u32, Duration)>,
    pub(crate) gone: GoneRecords,
    pub(crate) gone_for: Duration,
}

impl DestinationRules {
    /// The open interval after `failed_probes` failed probes.
    pub(crate) fn interval(&self, failed_probes: u32) -> Duration {
        doubled(self.open_interval, self.max_open_interval, failed_probes)
    }
}
