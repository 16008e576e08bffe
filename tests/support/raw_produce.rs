//! Producing a record whose header key is not UTF-8, which rdkafka's producer API cannot do:
//! one Produce request written by hand (record batch v2, CRC-32C) to the partition's leader.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::BaseConsumer;

use super::services::client_config;
use super::topics::metadata_of;

/// Produces one record (null key) to partition 0 of `topic` carrying a header whose key is
/// the raw bytes `header_key`, which need not be UTF-8 — something rdkafka's producer API
/// cannot send (its header keys are `&str`). Speaks the Kafka protocol directly (Produce v3,
/// acks=all) to the partition's leader. Returns the record's offset.
pub(crate) async fn produce_with_raw_header_key(
    topic: &str,
    header_key: &[u8],
    header_value: &[u8],
    payload: &[u8],
) -> i64 {
    let topic = topic.to_owned();
    let header_key = header_key.to_vec();
    let header_value = header_value.to_vec();
    let payload = payload.to_vec();
    tokio::task::spawn_blocking(move || {
        raw_produce(
            &topic,
            0,
            None,
            Some(&payload),
            &[(header_key, Some(header_value))],
        )
    })
    .await
    .expect("raw produce panicked")
}

/// A header as [`produce_raw`] writes it: name bytes (anything, even empty or with NUL
/// bytes) and a value (`None` for a null value).
pub(crate) type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// Produces one record to partition 0 of `topic` with exactly these key, value and headers
/// (in order, duplicates kept), byte for byte, through the Kafka protocol directly (see
/// [`produce_with_raw_header_key`]); rdkafka's producer cannot write a header name that is
/// not UTF-8. Returns the record's offset.
pub(crate) async fn produce_raw(
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[RawHeader],
) -> i64 {
    let topic = topic.to_owned();
    let key = key.map(<[u8]>::to_vec);
    let value = value.map(<[u8]>::to_vec);
    let headers = headers.to_vec();
    tokio::task::spawn_blocking(move || {
        raw_produce(&topic, 0, key.as_deref(), value.as_deref(), &headers)
    })
    .await
    .expect("raw produce panicked")
}

fn raw_produce(
    topic: &str,
    partition: i32,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[RawHeader],
) -> i64 {
    let leader = {
        let consumer: BaseConsumer = client_config().create().expect("create consumer");
        let metadata = metadata_of(&consumer, topic);
        let leader_id = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
            .map(|p| p.leader())
            .unwrap_or_else(|| panic!("{topic}/{partition} missing from metadata"));
        let broker = metadata
            .brokers()
            .iter()
            .find(|b| b.id() == leader_id)
            .unwrap_or_else(|| panic!("leader {leader_id} of {topic}/{partition} unknown"));
        format!("{}:{}", broker.host(), broker.port())
    };

    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_millis() as i64;

    // One record of a v2 record batch.
    let mut record = Vec::new();
    record.push(0); // attributes
    put_varint(&mut record, 0); // timestamp delta
    put_varint(&mut record, 0); // offset delta
    put_bytes(&mut record, key);
    put_bytes(&mut record, value);
    put_varint(&mut record, headers.len() as i64);
    for (name, value) in headers {
        put_bytes(&mut record, Some(name));
        put_bytes(&mut record, value.as_deref());
    }

    // The batch from `attributes` on, which the CRC covers.
    let mut body = Vec::new();
    body.extend_from_slice(&0i16.to_be_bytes()); // attributes: no compression, create time
    body.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    body.extend_from_slice(&now_ms.to_be_bytes()); // base timestamp
    body.extend_from_slice(&now_ms.to_be_bytes()); // max timestamp
    body.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    body.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    body.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    body.extend_from_slice(&1i32.to_be_bytes()); // record count
    put_varint(&mut body, record.len() as i64);
    body.extend_from_slice(&record);

    let mut batch = Vec::new();
    batch.extend_from_slice(&0i64.to_be_bytes()); // base offset
    batch.extend_from_slice(&((4 + 1 + 4 + body.len()) as i32).to_be_bytes()); // batch length
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c(&body).to_be_bytes());
    batch.extend_from_slice(&body);

    // Request header v1 + Produce v3 body.
    let correlation_id = 7i32;
    let mut request = Vec::new();
    request.extend_from_slice(&0i16.to_be_bytes()); // api key: Produce
    request.extend_from_slice(&3i16.to_be_bytes()); // api version
    request.extend_from_slice(&correlation_id.to_be_bytes());
    put_string(&mut request, b"kourier-test-raw");
    request.extend_from_slice(&(-1i16).to_be_bytes()); // no transactional id
    request.extend_from_slice(&(-1i16).to_be_bytes()); // acks=all
    request.extend_from_slice(&10_000i32.to_be_bytes()); // timeout ms
    request.extend_from_slice(&1i32.to_be_bytes()); // one topic
    put_string(&mut request, topic.as_bytes());
    request.extend_from_slice(&1i32.to_be_bytes()); // one partition
    request.extend_from_slice(&partition.to_be_bytes());
    request.extend_from_slice(&(batch.len() as i32).to_be_bytes());
    request.extend_from_slice(&batch);

    let mut stream =
        TcpStream::connect(&leader).unwrap_or_else(|e| panic!("connect {leader}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set timeout");
    stream
        .write_all(&(request.len() as i32).to_be_bytes())
        .and_then(|()| stream.write_all(&request))
        .unwrap_or_else(|e| panic!("send produce request to {leader}: {e}"));
    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .unwrap_or_else(|e| panic!("read produce response: {e}"));
    let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
    stream
        .read_exact(&mut response)
        .unwrap_or_else(|e| panic!("read produce response: {e}"));

    // correlation id, [topic: name, [partition: index, error, base offset, append time]], throttle
    let mut r = Cursor(&response);
    assert_eq!(r.i32(), correlation_id, "produce response correlation id");
    assert_eq!(r.i32(), 1, "produce response topic count");
    let name_len = r.i16() as usize;
    r.skip(name_len);
    assert_eq!(r.i32(), 1, "produce response partition count");
    assert_eq!(r.i32(), partition, "produce response partition");
    let error = r.i16();
    let offset = r.i64();
    assert_eq!(
        error, 0,
        "raw produce to {topic}/{partition} failed with Kafka error code {error}"
    );
    offset
}

fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64; // zigzag
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint length and the bytes, or -1 for null.
fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => {
            put_varint(out, bytes.len() as i64);
            out.extend_from_slice(bytes);
        }
        None => put_varint(out, -1),
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CRC-32C (Castagnoli), as record batches use.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split_at returned N bytes")
    }
    fn skip(&mut self, n: usize) {
        self.0 = &self.0[n..];
    }
    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take())
    }
    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.take())
    }
}
