//! Producing the load: pre-filling a topic before any consumer starts (the producer is never
//! the bottleneck), and what the latency scenarios' paced producer shares with it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::rdkafka::ClientContext;
use kourier::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use kourier::rdkafka::message::{DeliveryResult, Header, Headers as _, Message as _, OwnedHeaders};
use kourier::rdkafka::producer::{BaseProducer, BaseRecord, Producer as _, ProducerContext};

use crate::measure::{LatencyRecorder, epoch_micros};
use crate::services::client_config;
use crate::{BoxResult, EVENT_ID_HEADER, SENT_AT_HEADER};

/// Counts deliveries of the load producers.
#[derive(Default)]
pub(crate) struct DeliveryCounter {
    pub(crate) delivered: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) first_error: Mutex<Option<String>>,
    /// Latency producers: send → broker acknowledgement, from the `sent-at` header.
    pub(crate) acks: Option<Arc<LatencyRecorder>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                self.delivered.fetch_add(1, AtomicOrdering::Relaxed);
                if let Some(acks) = &self.acks {
                    let sent = m.headers().and_then(|hs| {
                        hs.iter()
                            .find(|h| h.key == SENT_AT_HEADER)
                            .and_then(|h| h.value)
                    });
                    acks.record(sent, epoch_micros());
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, AtomicOrdering::Relaxed);
                let mut first = self.first_error.lock().expect("not poisoned");
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// A JSON value of exactly `size` bytes where possible: `{"id":N,"pad":"xxx…"}`.
pub(crate) fn fill_payload(buf: &mut Vec<u8>, id: u64, size: usize) {
    buf.clear();
    let _ = std::io::Write::write_fmt(buf, format_args!("{{\"id\":{id},\"pad\":\""));
    let pad = size.saturating_sub(buf.len() + 2);
    buf.resize(buf.len() + pad, b'x');
    buf.extend_from_slice(b"\"}");
}

/// Sends `record`, waiting while librdkafka's queue is full.
pub(crate) fn send_blocking<'a>(
    producer: &BaseProducer<DeliveryCounter>,
    mut record: BaseRecord<'a, [u8], [u8]>,
) -> BoxResult<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

pub(crate) struct Produced {
    pub(crate) secs: f64,
}

/// Pre-produces `n` records (id = 0..n) round-robin over `partitions`, with keys cycling over
/// `keys` values and a unique `event-id` header, then waits for every acknowledgement.
/// Throughput settings: `linger.ms=50`, big batches, `acks=1`.
pub(crate) fn pre_produce(
    topic: &str,
    n: u64,
    size: usize,
    partitions: i32,
    keys: u64,
    compression: &str,
    run_id: &str,
) -> BoxResult<Produced> {
    let producer: BaseProducer<DeliveryCounter> = client_config()
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "10000")
        .set("compression.codec", compression)
        .set("acks", "1")
        .set("enable.idempotence", "false")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "300000")
        .create_with_context(DeliveryCounter::default())?;
    let started = Instant::now();
    let mut payload = Vec::with_capacity(size + 32);
    let mut key = String::new();
    let mut event_id = String::new();
    for id in 0..n {
        fill_payload(&mut payload, id, size);
        key.clear();
        let _ = write!(key, "key-{}", id % keys);
        event_id.clear();
        let _ = write!(event_id, "{run_id}-{id}");
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: EVENT_ID_HEADER,
            value: Some(event_id.as_bytes()),
        });
        let record = BaseRecord::to(topic)
            .partition((id % partitions as u64) as i32)
            .key(key.as_bytes())
            .payload(payload.as_slice())
            .headers(headers);
        send_blocking(&producer, record)?;
        if id % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(300))?;
    let secs = started.elapsed().as_secs_f64();
    let ctx = producer.context();
    let failed = ctx.failed.load(AtomicOrdering::Relaxed);
    if failed > 0 {
        let first = ctx.first_error.lock().expect("not poisoned").clone();
        return Err(format!("{failed} records failed to produce: {first:?}").into());
    }
    let delivered = ctx.delivered.load(AtomicOrdering::Relaxed);
    if delivered != n {
        return Err(format!("{delivered} of {n} records acknowledged").into());
    }
    Ok(Produced { secs })
}
