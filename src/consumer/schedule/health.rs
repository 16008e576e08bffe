//! Running health (delivery rule 13 in the crate docs): whether the consumer reaches the cluster and since
//! when, how far each partition is from its end, and log lines that a persisting condition
//! writes once per interval instead of once per poll.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// Whether the consumer reaches the Kafka cluster, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Not known yet: the consumer has not run its startup checks.
    Starting,
    /// The cluster answers.
    Connected,
    /// No broker answers (librdkafka reported all brokers down, or the startup check is
    /// still waiting for them).
    Disconnected,
}

/// One assigned partition's progress, in a [`ConsumerSnapshot`](crate::ConsumerSnapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStatus {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset this consumer last committed for it in this assignment (the next offset
    /// to read), if it committed any.
    pub committed: Option<i64>,
    /// The partition's end (high watermark) as of the last fetch, if known.
    pub end_offset: Option<i64>,
    /// `end_offset` minus how far the group has got (the committed offset, else the
    /// position), if both are known.
    pub lag: Option<i64>,
    /// Whether flow control has paused it.
    pub paused: bool,
}

/// Connection state and partition progress, refreshed by the poll thread.
#[derive(Debug)]
pub(crate) struct Health {
    inner: Mutex<HealthState>,
}

#[derive(Debug, Clone)]
pub(crate) struct HealthState {
    pub(crate) connection: ConnectionState,
    pub(crate) since: SystemTime,
    /// When the consumer was last seen disconnected (monotonic), for the outage bound.
    pub(crate) down_since: Option<Instant>,
    /// Per-partition end offsets and positions, as of the last refresh.
    pub(crate) ends: HashMap<(String, i32), PartitionEnd>,
}

/// What the poll thread knows of a partition's end, refreshed a few times a second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PartitionEnd {
    pub(crate) low: Option<i64>,
    pub(crate) high: Option<i64>,
    pub(crate) position: Option<i64>,
    /// The group's committed offset when the partition was assigned, for a partition this
    /// consumer has not read a record from (its position is unknown until it does): a
    /// partition assigned at its end is caught up without ever being read.
    pub(crate) group_committed: Option<i64>,
}

impl Health {
    pub(crate) fn new() -> Self {
        Health {
            inner: Mutex::new(HealthState {
                connection: ConnectionState::Starting,
                since: SystemTime::now(),
                down_since: None,
                ends: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the connection state; returns whether it changed.
    pub(crate) fn set_connection(&self, connected: bool) -> bool {
        let mut s = self.lock();
        let state = if connected {
            ConnectionState::Connected
        } else {
            ConnectionState::Disconnected
        };
        if s.connection == state {
            return false;
        }
        s.connection = state;
        s.since = SystemTime::now();
        s.down_since = (!connected).then(Instant::now);
        true
    }

    pub(crate) fn state(&self) -> HealthState {
        self.lock().clone()
    }

    /// How long the cluster has been unreachable, if it is.
    pub(crate) fn outage(&self) -> Option<Duration> {
        self.lock().down_since.map(|t| t.elapsed())
    }

    pub(crate) fn set_ends(&self, ends: HashMap<(String, i32), PartitionEnd>) {
        self.lock().ends = ends;
    }
}

/// The partition's low and high watermarks as librdkafka last saw them in a fetch
/// response: no request is sent (`rd_kafka_get_watermark_offsets`, which rdkafka does not
/// wrap). `None` when librdkafka does not know them yet.
#[allow(unsafe_code)]
pub(crate) fn cached_watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    use rdkafka::bindings as rd;
    let topic = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives (borrowed here); `topic` is
    // a NUL-terminated string that outlives the call; `low` and `high` are valid for writes.
    // The call only reads librdkafka's cached partition state under its own lock.
    let err = unsafe {
        rd::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_changes_are_reported_once() {
        let h = Health::new();
        assert_eq!(h.state().connection, ConnectionState::Starting);
        assert!(h.set_connection(false));
        assert!(!h.set_connection(false));
        assert!(h.outage().is_some());
        assert!(h.set_connection(true));
        assert_eq!(h.state().connection, ConnectionState::Connected);
        assert!(h.outage().is_none());
    }
}
