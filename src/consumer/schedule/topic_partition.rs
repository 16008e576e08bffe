//! Topic-partitions: the engine's key type and its conversions to and from librdkafka lists.

use std::sync::Arc;

use rdkafka::TopicPartitionList;

/// A topic-partition. Topic names are shared (`Arc<str>`): a consumer reads few topics.
pub(crate) type Tp = (Arc<str>, i32);

/// The topic-partitions of a librdkafka list.
pub(crate) fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (Arc::from(e.topic()), e.partition()))
        .collect()
}

/// A librdkafka list of `tps` (no offsets).
pub(crate) fn tpl_of(tps: &[Tp]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(tps.len());
    for (t, p) in tps {
        tpl.add_partition(t, *p);
    }
    tpl
}

/// `topic/partition` of each, for logs.
pub(crate) fn tps_display(tps: &[Tp]) -> Vec<String> {
    tps.iter().map(|(t, p)| format!("{t}/{p}")).collect()
}
