//! librdkafka's statistics JSON, read for what the engine reports from it (consumer lag).

use serde::Deserialize;

#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    topics: std::collections::HashMap<String, TopicStats>,
}

#[derive(Deserialize)]
struct TopicStats {
    #[serde(default)]
    partitions: std::collections::HashMap<String, PartitionStats>,
}

#[derive(Deserialize)]
struct PartitionStats {
    partition: i32,
    #[serde(default = "invalid")]
    hi_offset: i64,
    #[serde(default = "invalid")]
    ls_offset: i64,
    #[serde(default = "invalid")]
    app_offset: i64,
    #[serde(default = "invalid")]
    committed_offset: i64,
    #[serde(default = "invalid")]
    consumer_lag: i64,
}

fn invalid() -> i64 {
    -1001
}

/// One partition's offsets from a statistics report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionOffsets {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    /// End offset: the last stable offset when known, else the high watermark.
    end: i64,
    committed: i64,
    consumer_lag: i64,
    /// The next offset librdkafka hands the application.
    position: i64,
}

impl PartitionOffsets {
    /// The lag to report: librdkafka's `consumer_lag` (end − committed); before any commit,
    /// end − `first_read` (the first offset this consumer read), else end − position. `None`
    /// when the end offset is not known yet.
    pub(crate) fn lag(&self, first_read: Option<i64>) -> Option<i64> {
        if self.consumer_lag >= 0 {
            return Some(self.consumer_lag);
        }
        if self.end < 0 {
            return None;
        }
        let base = if self.committed >= 0 {
            self.committed
        } else {
            first_read.or((self.position >= 0).then_some(self.position))?
        };
        Some((self.end - base).max(0))
    }
}

/// The partitions of a librdkafka statistics report (JSON, see librdkafka's
/// STATISTICS.md), without the internal `-1` partition.
pub(crate) fn partition_offsets(json: &[u8]) -> Result<Vec<PartitionOffsets>, serde_json::Error> {
    let stats: Stats = serde_json::from_slice(json)?;
    let mut out = Vec::new();
    for (topic, t) in stats.topics {
        for p in t.partitions.into_values().filter(|p| p.partition >= 0) {
            out.push(PartitionOffsets {
                topic: topic.clone(),
                partition: p.partition,
                end: if p.ls_offset >= 0 {
                    p.ls_offset
                } else {
                    p.hi_offset
                },
                committed: p.committed_offset,
                consumer_lag: p.consumer_lag,
                position: p.app_offset,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_give_lag_per_partition() {
        let json = br#"{"name":"c","topics":{"t":{"topic":"t","partitions":{
            "0":{"partition":0,"hi_offset":100,"ls_offset":100,"app_offset":40,"committed_offset":30,"consumer_lag":70},
            "1":{"partition":1,"hi_offset":50,"ls_offset":50,"app_offset":20,"committed_offset":-1001,"consumer_lag":-1},
            "2":{"partition":2,"hi_offset":-1001,"ls_offset":-1001,"app_offset":-1001,"committed_offset":-1001,"consumer_lag":-1},
            "-1":{"partition":-1,"hi_offset":-1001,"consumer_lag":-1}}}},"brokers":{}}"#;
        let mut parts = partition_offsets(json).unwrap();
        parts.sort_by_key(|p| p.partition);
        assert_eq!(parts.len(), 3, "the internal -1 partition is left out");
        assert_eq!(parts[0].lag(None), Some(70));
        assert_eq!(
            parts[1].lag(Some(5)),
            Some(45),
            "no commit yet: from the first offset read"
        );
        assert_eq!(
            parts[1].lag(None),
            Some(30),
            "nothing read: from the position"
        );
        assert_eq!(parts[2].lag(Some(0)), None, "end unknown");
    }
}
