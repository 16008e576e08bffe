//! The tiers as the running consumer sees them: which topic is which tier, and the
//! forwarding producer.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureRecord;

use super::RetryTiers;
use super::headers::{self, History, Origin, Stamp, forward_headers};
use crate::clock;
use crate::dead_letter::Provenance;
use crate::error::{ConfigError, Error, Result};
use crate::producer::{Delivery, ManagedProducer};
use crate::record::{RawRecord, owned_headers};

const SEND_OPERATION: &str = "forward record to retry tier";

/// Where a record stands in the tier chain.
#[derive(Debug, Clone)]
pub(crate) struct Located {
    /// 0 for a source record, else its tier (1-based).
    pub(crate) tier: u32,
    /// The source record's coordinates.
    pub(crate) origin: Origin,
    /// When it may run (tier records).
    pub(crate) due: Option<SystemTime>,
    /// Failures before this tier.
    pub(crate) history: Option<History>,
}

/// The tiers of a running consumer.
pub(crate) struct Tiers {
    pub(crate) config: RetryTiers,
    pub(crate) group: String,
    /// Tier topic → (source topic, tier).
    by_topic: HashMap<String, (String, u32)>,
    producer: ManagedProducer,
    /// Tier topics without the source's partition: forwarded by key.
    by_key: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiers")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Tiers {
    /// Checks the configuration against the subscribed topics.
    pub(crate) fn check(config: &RetryTiers, sources: &[String]) -> Result<()> {
        let invalid = |reason: String| Error::from(ConfigError::invalid("retry_tiers", reason));
        if config.delays.is_empty() {
            return Err(invalid("at least one tier delay is needed".into()));
        }
        if config.delays.len() > 100 {
            return Err(invalid("at most 100 tiers".into()));
        }
        if config.delays.iter().any(Duration::is_zero) {
            return Err(invalid("a tier delay must be longer than zero".into()));
        }
        // Delivery rule 17: durations are bounded where they enter.
        if let Some(d) = config.delays.iter().find(|d| **d > RetryTiers::MAX_DELAY) {
            return Err(invalid(format!(
                "a tier delay must be at most {:?} (30 days), got {d:?}: a record that waits \
                 longer than its tier topic's retention is deleted before it is due",
                RetryTiers::MAX_DELAY
            )));
        }
        let mut seen: HashSet<String> = sources.iter().cloned().collect();
        for source in sources {
            for tier in 1..=config.delays.len() as u32 {
                let name = config.tier_topic(source, tier);
                crate::topic_name::check(&name)
                    .map_err(|reason| invalid(format!("tier topic name: {reason}")))?;
                if !seen.insert(name.clone()) {
                    return Err(invalid(format!(
                        "tier topic `{name}` is used twice (or is a subscribed topic)"
                    )));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn new(
        config: RetryTiers,
        sources: &[String],
        group: String,
        producer: ManagedProducer,
    ) -> Self {
        let mut by_topic = HashMap::new();
        for source in sources {
            for tier in 1..=config.delays.len() as u32 {
                by_topic.insert(config.tier_topic(source, tier), (source.clone(), tier));
            }
        }
        Tiers {
            config,
            group,
            by_topic,
            producer,
            by_key: Mutex::new(HashSet::new()),
        }
    }

    /// (source topic, tier topic) pairs, in tier order per source.
    pub(crate) fn topics(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String, u32)> = self
            .by_topic
            .iter()
            .map(|(t, (s, n))| (s.clone(), t.clone(), *n))
            .collect();
        v.sort_by(|a, b| (&a.0, a.2).cmp(&(&b.0, b.2)));
        v.into_iter().map(|(s, t, _)| (s, t)).collect()
    }

    /// Whether the tiers keep per-key order (a key-order ledger is set).
    pub(crate) fn keeps_key_order(&self) -> bool {
        self.config.ledger.is_some()
    }

    /// How many tiers there are.
    pub(crate) fn count(&self) -> u32 {
        self.config.delays.len() as u32
    }

    /// Where `record` stands.
    pub(crate) fn locate(&self, record: &RawRecord) -> Located {
        let Some((source, tier)) = self.by_topic.get(&*record.topic) else {
            return Located {
                tier: 0,
                origin: Origin {
                    topic: record.topic.to_string(),
                    partition: record.partition,
                    offset: record.offset,
                    timestamp: record.timestamp,
                    log_append_time: record.log_append_time,
                },
                due: None,
                history: None,
            };
        };
        let p = Provenance::from_headers(&record.headers);
        let due = record
            .headers
            .get_str(headers::DUE_MS)
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        let stages = record
            .headers
            .get_str(headers::FAILED_STAGES)
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(*tier);
        let history = p.attempts.map(|attempts| History {
            stages,
            kind: p.failure_kind.map_or("retries-exhausted", |k| k.as_str()),
            error: p.error.clone().unwrap_or_default(),
            attempts,
            first: p.first_failure.unwrap_or_else(SystemTime::now),
            last: p.last_failure.unwrap_or_else(SystemTime::now),
        });
        // A record written to a tier topic by hand: it stands for itself.
        let origin = Origin {
            topic: p.original_topic.unwrap_or_else(|| source.clone()),
            partition: p.original_partition.unwrap_or(record.partition),
            offset: p.original_offset.unwrap_or(record.offset),
            timestamp: p.original_timestamp,
            log_append_time: p.original_timestamp_type.as_deref() == Some("LogAppendTime"),
        };
        Located {
            tier: *tier,
            origin,
            due,
            history,
        }
    }

    /// The record a tier record stands for: the source's coordinates, no tier headers
    /// (for dead-lettering).
    pub(crate) fn original_view(record: &RawRecord, at: &Located) -> RawRecord {
        let mut own = record.headers.clone();
        own.remove_where(|name| headers::ALL.iter().any(|n| n.as_bytes() == name));
        RawRecord {
            topic: std::sync::Arc::from(at.origin.topic.as_str()),
            partition: at.origin.partition,
            offset: at.origin.offset,
            key: record.key.clone(),
            value: record.value.clone(),
            headers: own,
            timestamp: at.origin.timestamp,
            log_append_time: at.origin.log_append_time,
        }
    }

    /// The delay of tier `tier` (1-based).
    pub(crate) fn delay(&self, tier: u32) -> Duration {
        self.config.delays[(tier as usize)
            .saturating_sub(1)
            .min(self.config.delays.len() - 1)]
    }

    /// Writes `record` to tier `target` of its source, due after that tier's delay, and
    /// waits for the acknowledgement.
    pub(crate) async fn send(
        &self,
        record: &RawRecord,
        at: &Located,
        target: u32,
        history: Option<&History>,
        deferred: bool,
    ) -> Result<(String, Delivery)> {
        let topic = self.config.tier_topic(&at.origin.topic, target);
        let due = clock::after(SystemTime::now(), self.delay(target));
        let hop = crate::dead_letter::headers::position_of(&record.headers)
            .hop
            .saturating_add(1);
        let stamp = Stamp {
            tier: target,
            due,
            deferred,
            hop,
        };
        let headers = forward_headers(&record.headers, &at.origin, &self.group, history, stamp);
        loop {
            let by_key = self
                .by_key
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&topic);
            let mut out =
                FutureRecord::<[u8], [u8]>::to(&topic).headers(owned_headers(headers.iter()));
            if !by_key {
                out = out.partition(at.origin.partition);
            }
            if let Some(key) = &record.key {
                out = out.key(key);
            }
            if let Some(value) = &record.value {
                out = out.payload(value);
            }
            match self.producer.send(out, SEND_OPERATION).await {
                Ok(delivery) => return Ok((topic, delivery)),
                Err(Error::Kafka { source, .. })
                    if !by_key
                        && source.rdkafka_error_code()
                            == Some(RDKafkaErrorCode::UnknownPartition) =>
                {
                    // The tier topic has fewer partitions than the source: by key from now on.
                    self.by_key
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(topic.clone());
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::ProducerSettings;
    use crate::record::Headers;

    #[test]
    fn a_forwarded_record_reads_back_as_its_source_record() {
        let producer = ProducerSettings::new("127.0.0.1:1".into())
            .build("tiers-test")
            .unwrap();
        let config = RetryTiers::new([Duration::from_secs(1), Duration::from_secs(2)]);
        let tiers = Tiers::new(config, &["src".to_owned()], "g".into(), producer);
        assert_eq!(
            tiers.topics(),
            vec![
                ("src".to_owned(), "src.retry.1".to_owned()),
                ("src".to_owned(), "src.retry.2".to_owned())
            ]
        );
        // An earlier tier's headers are replaced, not repeated.
        let own = Headers::new()
            .with("event-id", "e-1")
            .with(headers::TIER, "1")
            .with(crate::dead_letter::headers::ATTEMPTS, "1");
        let origin = Origin {
            topic: "src".into(),
            partition: 2,
            offset: 7,
            timestamp: Some(1_000),
            log_append_time: false,
        };
        let history = History {
            kind: "retries-exhausted",
            error: "boom".into(),
            attempts: 3,
            first: UNIX_EPOCH + Duration::from_secs(1),
            last: UNIX_EPOCH + Duration::from_secs(2),
            stages: 2,
        };
        let due = UNIX_EPOCH + Duration::from_secs(5);
        let stamp = Stamp {
            tier: 2,
            due,
            deferred: false,
            hop: 3,
        };
        let written = forward_headers(&own, &origin, "g", Some(&history), stamp);
        let record = RawRecord {
            topic: "src.retry.2".into(),
            partition: 0,
            offset: 3,
            key: Some(b"k".into()),
            value: Some(b"v".into()),
            headers: Headers::from(written),
            timestamp: Some(9_999),
            log_append_time: false,
        };
        assert_eq!(record.headers.get_all(headers::TIER).count(), 1);
        let at = tiers.locate(&record);
        assert_eq!((at.tier, &at.origin, at.due), (2, &origin, Some(due)));
        let h = at.history.as_ref().unwrap();
        assert_eq!(
            (h.attempts, h.error.as_str(), h.first, h.stages),
            (3, "boom", history.first, 2)
        );
        let view = Tiers::original_view(&record, &at);
        assert_eq!((&*view.topic, view.partition, view.offset), ("src", 2, 7));
        assert_eq!(view.timestamp, Some(1_000));
        assert!(view.headers.get(headers::TIER).is_none());
        assert_eq!(view.headers.get_str("event-id"), Some("e-1"));
        // A source record stands for itself.
        let source = RawRecord {
            topic: "src".into(),
            ..record
        };
        let at = tiers.locate(&source);
        assert_eq!((at.tier, at.origin.offset, at.due.is_none()), (0, 3, true));
    }
}
