//! The rdkafka client context: librdkafka calls it on the poll thread for statistics and
//! rebalances; it hands both on (to the lag gauge and to [`super::rebalance`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::ClientContext;
use rdkafka::bindings::rd_kafka_resp_err_t as RDKafkaRespErr;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tracing::{debug, warn};

use super::rebalance;
use super::split::{SplitTarget, librdkafka_description};
use crate::consumer::observe::partition_offsets;
use crate::consumer::schedule::tps_of;
use crate::consumer::schedule::{Hub, Tp};
use crate::log_throttle::{error_throttled, log_throttled};

/// See the module docs.
#[derive(Debug)]
pub(crate) struct KourierContext {
    pub(crate) hub: Arc<Hub>,
    /// Where newly assigned partitions' records go (the poll thread's split queue).
    pub(crate) split: SplitTarget,
    /// Partitions revoked since the poll thread last looked: records it read ahead of them
    /// are dropped.
    revoked: Mutex<Vec<Tp>>,
    /// librdkafka logged a partition's topic as missing since the poll thread last looked
    /// (see [`names_missing_topic`]).
    topic_missing: AtomicBool,
}

impl KourierContext {
    /// The context of a consumer whose rebalances `hub` follows.
    pub(crate) fn new(hub: Arc<Hub>) -> Self {
        KourierContext {
            hub,
            split: SplitTarget::default(),
            revoked: Mutex::new(Vec::new()),
            topic_missing: AtomicBool::new(false),
        }
    }

    /// Whether librdkafka logged a partition's topic as missing since the last call.
    pub(crate) fn take_topic_missing(&self) -> bool {
        self.topic_missing.swap(false, Ordering::Relaxed)
    }

    /// The partitions revoked since the last call.
    pub(crate) fn take_revoked(&self) -> Vec<Tp> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl ClientContext for KourierContext {
    /// librdkafka's log lines (see [`log_throttled`]); one that says a partition's topic is
    /// missing is noted for the poll thread ([`names_missing_topic`]).
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if names_missing_topic(fac, log_message) {
            self.topic_missing.store(true, Ordering::Relaxed);
        }
        log_throttled(&self.hub.throttle, level, fac, log_message);
    }

    /// librdkafka's global errors: all brokers down marks the consumer disconnected; each
    /// distinct error is logged once per interval ([`error_throttled`]).
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.hub.set_connected(false);
        }
        error_throttled(&self.hub.throttle, &error, reason);
    }

    /// librdkafka's statistics (every `statistics.interval.ms`, on the poll thread): the lag
    /// of each assigned partition, for [`crate::metrics::CONSUMER_LAG`].
    fn stats_raw(&self, statistics: &[u8]) {
        let partitions = match partition_offsets(statistics) {
            Ok(partitions) => partitions,
            Err(e) => {
                debug!(error = %e, "cannot read librdkafka statistics");
                return;
            }
        };
        let lags: Vec<_> = {
            let s = self.hub.lock();
            partitions
                .into_iter()
                .filter_map(|p| {
                    let first = s.first_received(&(Arc::from(p.topic.as_str()), p.partition))?;
                    Some((p.lag(first)?, p))
                })
                .collect()
        };
        for (lag, p) in lags {
            self.hub.metrics.consumer_lag(&p.topic, p.partition, lag);
        }
    }
}

/// Whether a librdkafka log line reports a partition's topic missing. A partition's error
/// read in a run from the split queue (see `split`) reaches no record: librdkafka hands it to
/// the error callback, which rdkafka does not set, so librdkafka logs it (facility `ERROR`,
/// ending with the error's description) — the only trace of a deleted topic there.
fn names_missing_topic(fac: &str, log_message: &str) -> bool {
    fac == "ERROR"
        && [
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC,
        ]
        .into_iter()
        .any(|code| log_message.contains(&librdkafka_description(code)))
}

impl ConsumerContext for KourierContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let tps = tps_of(tpl);
                rebalance::on_revoke(&self.hub, consumer, &tps);
                self.revoked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(tps);
            }
            // Before librdkafka fetches them (see `split`).
            Rebalance::Assign(tpl) => self.split.split(consumer, tpl),
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            rebalance::on_assign(&self.hub, consumer, tpl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_partition_error_of_a_missing_topic_is_recognised() {
        // Lines librdkafka logged for a partition's errors read from the split queue, as a
        // run of `tests/fail_loudly.rs` (a topic deleted while consumed) printed them.
        let missing = "[thrd:app]: rdkafka#consumer-11: t-doomed [1]: topic does not exist \
                       (Broker: Unknown topic or partition)";
        let gone = "[thrd:app]: rdkafka#consumer-11: t-doomed [0]: desired partition is no \
                    longer available (Local: Unknown partition)";
        assert!(names_missing_topic("ERROR", missing));
        assert!(!names_missing_topic("ERROR", gone));
        assert!(!names_missing_topic("METADATA", missing));
        assert!(!names_missing_topic(
            "ERROR",
            "[thrd:app]: rdkafka#consumer-1: t [0]: Broker: Not leader for partition"
        ));
    }
}
