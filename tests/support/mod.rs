//! Shared helpers for the integration tests: where the real Kafka broker and Redis are, unique
//! names, creating topics, producing and reading records, committed offsets, Redis clients.
//!
//! Every test file that needs them declares `mod support;`. The services come from
//! `scripts/services up`, or from `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` when those are set.
//! A service that cannot be reached fails the test with a message naming that command: tests
//! never skip silently.
//!
//! The Kafka helpers run rdkafka's blocking clients inside `spawn_blocking`, so they work from
//! both the current-thread and the multi-thread Tokio test runtimes.
#![allow(dead_code)] // each test file uses a different subset

pub(crate) mod proxy;
pub(crate) mod redis_server;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// How long a helper waits for the broker before failing the test.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `read_all` may take to reach the end of a topic.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Stands in for a header key that is not UTF-8 (rdkafka 0.39 cannot hand those out).
pub(crate) const UNREADABLE_HEADER_KEY: &str = "\u{fffd}";

// ---------------------------------------------------------------------------------------------
// Where the services are

/// The Kafka bootstrap servers: `KAFKA_BOOTSTRAP_SERVERS`, else `127.0.0.1:9092`.
pub(crate) fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// The Redis URL: `REDIS_URL`, else `redis://127.0.0.1:6379/`.
pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A client config for the test broker, for tests that build their own clients.
pub(crate) fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap());
    config
}

/// Fails the test unless the broker answers a metadata request within 10 s.
pub(crate) async fn require_kafka() {
    require_kafka_at(&bootstrap(), KAFKA_TIMEOUT).await;
}

/// Like [`require_kafka`] for a given address and timeout.
pub(crate) async fn require_kafka_at(bootstrap: &str, timeout: Duration) {
    let servers = bootstrap.to_owned();
    let result = tokio::task::spawn_blocking(move || -> Result<usize, KafkaError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .create()?;
        let brokers = consumer.fetch_metadata(None, timeout)?.brokers().len();
        Ok(brokers)
    })
    .await
    .expect("metadata probe panicked");
    match result {
        Ok(brokers) if brokers > 0 => {}
        Ok(_) => panic!("Kafka at {bootstrap} answered with no brokers; {START_HINT}"),
        Err(e) => panic!(
            "Kafka is not reachable at {bootstrap} ({e}); {START_HINT} \
             (or set KAFKA_BOOTSTRAP_SERVERS to a running broker)"
        ),
    }
}

/// Fails the test unless Redis answers PING within 10 s.
pub(crate) async fn require_redis() {
    require_redis_at(&redis_url(), KAFKA_TIMEOUT).await;
}

/// Like [`require_redis`] for a given URL and timeout.
pub(crate) async fn require_redis_at(url: &str, timeout: Duration) {
    let ping = async {
        let client = redis::Client::open(url)?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok(pong)) if pong == "PONG" => {}
        Ok(Ok(other)) => panic!("Redis at {url} answered PING with {other:?}; {START_HINT}"),
        Ok(Err(e)) => panic!(
            "Redis is not reachable at {url} ({e}); {START_HINT} \
             (or set REDIS_URL to a running server)"
        ),
        Err(_) => panic!("Redis at {url} did not answer PING within {timeout:?}; {START_HINT}"),
    }
}

const START_HINT: &str = "start the test services with `scripts/services up`";

/// A Redis client for [`redis_url`] (connects lazily).
pub(crate) fn redis_client() -> redis::Client {
    redis::Client::open(redis_url()).expect("REDIS_URL is not a valid Redis URL")
}

/// A multiplexed connection to the test Redis, failing the test when it is unreachable.
pub(crate) async fn redis_connection() -> redis::aio::MultiplexedConnection {
    require_redis().await;
    redis_client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Runs `scripts/services` with `args` (e.g. `["kafka-restart"]`) and fails the test if it
/// fails. For fault tests; it refuses to touch servers given in the environment.
pub(crate) async fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services");
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let shown = args.join(" ");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(script).args(&args).output()
    })
    .await
    .expect("services task panicked")
    .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        output.status.success(),
        "`scripts/services {shown}` failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Names

/// A name no other test (or test run) uses: `kourier-test-<prefix>-<pid>-<counter>-<nanos>`,
/// with characters outside `[A-Za-z0-9._-]` in `prefix` replaced by `-`. Valid as a topic
/// name, a group id and a Redis key.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_nanos();
    format!(
        "kourier-test-{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// Topics

/// Creates a topic with `partitions` partitions (replication factor 1) and waits until the
/// broker's metadata shows every partition with a leader.
///
/// An existing topic with the same partition count is accepted.
pub(crate) async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        client_config().create().expect("create admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .unwrap_or_else(|e| panic!("create topic {name}: {e}; is Kafka up? {START_HINT}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("create topic {topic}: {code}"),
        }
    }
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || wait_for_topic(&name, partitions))
        .await
        .expect("topic wait panicked");
}

fn wait_for_topic(name: &str, partitions: i32) {
    let consumer: BaseConsumer = client_config().create().expect("create consumer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = match consumer.fetch_metadata(Some(name), KAFKA_TIMEOUT) {
            Ok(metadata) => metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| {
                    let ready = t.partitions().iter().filter(|p| p.leader() >= 0).count();
                    (t.partitions().len(), ready)
                }),
            Err(_) => None,
        };
        if let Some((count, ready)) = seen {
            assert_eq!(
                count, partitions as usize,
                "topic {name} exists with {count} partitions, wanted {partitions}"
            );
            if ready == count {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "topic {name} not visible in metadata after 30 s (seen: {seen:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The partition ids of a topic, from the broker's metadata.
pub(crate) async fn partitions_of(topic: &str) -> Vec<i32> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config().create().expect("create consumer");
        topic_partitions(&consumer, &topic)
    })
    .await
    .expect("metadata task panicked")
}

fn topic_partitions(consumer: &BaseConsumer, topic: &str) -> Vec<i32> {
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .unwrap_or_else(|e| panic!("metadata for {topic}: {e}; {START_HINT}"));
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .unwrap_or_else(|| panic!("topic {topic} missing from metadata"));
    if let Some(err) = t.error() {
        panic!("topic {topic}: {err:?}");
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    ids
}

// ---------------------------------------------------------------------------------------------
// Producing

/// A record to produce. `None` key or value means null; `partition: None` lets the producer
/// choose (by key hash, or sticky for null keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TestRecord {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    pub(crate) partition: Option<i32>,
}

impl TestRecord {
    /// A record with null key, null value, no headers, any partition.
    pub(crate) fn new() -> TestRecord {
        TestRecord::default()
    }

    pub(crate) fn key(mut self, key: impl AsRef<[u8]>) -> TestRecord {
        self.key = Some(key.as_ref().to_vec());
        self
    }

    pub(crate) fn value(mut self, value: impl AsRef<[u8]>) -> TestRecord {
        self.value = Some(value.as_ref().to_vec());
        self
    }

    /// Appends a header; `None` is a null-valued header. Names may repeat.
    pub(crate) fn header(mut self, name: impl Into<String>, value: Option<Vec<u8>>) -> TestRecord {
        self.headers.push((name.into(), value));
        self
    }

    pub(crate) fn partition(mut self, partition: i32) -> TestRecord {
        self.partition = Some(partition);
        self
    }
}

/// Produces `records` in order (acks=all, idempotent) and waits for every delivery.
/// Returns the `(partition, offset)` of each record, in input order.
pub(crate) async fn produce(topic: &str, records: Vec<TestRecord>) -> Vec<(i32, i64)> {
    let producer: FutureProducer = client_config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("create producer");
    let mut deliveries = Vec::with_capacity(records.len());
    for record in &records {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let mut future = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(key) = &record.key {
            future = future.key(key);
        }
        if let Some(value) = &record.value {
            future = future.payload(value);
        }
        if let Some(partition) = record.partition {
            future = future.partition(partition);
        }
        // Enqueue everything before awaiting, so the batch is pipelined in order.
        loop {
            match producer.send_result(future) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    future = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((e, _)) => panic!("produce to {topic}: {e}"),
            }
        }
    }
    let mut coordinates = Vec::with_capacity(deliveries.len());
    for (i, delivery) in deliveries.into_iter().enumerate() {
        match delivery.await.expect("producer dropped a delivery") {
            Ok(d) => coordinates.push((d.partition, d.offset)),
            Err((e, _)) => panic!("record #{i} to {topic} not delivered: {e}; {START_HINT}"),
        }
    }
    coordinates
}

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
        raw_produce(&topic, 0, &header_key, &header_value, &payload)
    })
    .await
    .expect("raw produce panicked")
}

fn raw_produce(
    topic: &str,
    partition: i32,
    header_key: &[u8],
    header_value: &[u8],
    payload: &[u8],
) -> i64 {
    let leader = {
        let consumer: BaseConsumer = client_config().create().expect("create consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
            .unwrap_or_else(|e| panic!("metadata for {topic}: {e}; {START_HINT}"));
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
    put_varint(&mut record, -1); // null key
    put_varint(&mut record, payload.len() as i64);
    record.extend_from_slice(payload);
    put_varint(&mut record, 1); // header count
    put_varint(&mut record, header_key.len() as i64);
    record.extend_from_slice(header_key);
    put_varint(&mut record, header_value.len() as i64);
    record.extend_from_slice(header_value);

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

// ---------------------------------------------------------------------------------------------
// Reading

/// A record read back from a topic, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadRecord {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    /// In record order. A key that is not UTF-8 reads as [`UNREADABLE_HEADER_KEY`] with a
    /// `None` value: rdkafka 0.39 panics on such keys, and this helper catches that.
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    /// Milliseconds since the epoch, when the record has a timestamp.
    pub(crate) timestamp: Option<i64>,
}

impl ReadRecord {
    /// The value of the last header named `name` (`Some(None)` for a null-valued header).
    pub(crate) fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref())
    }
}

impl From<&BorrowedMessage<'_>> for ReadRecord {
    fn from(m: &BorrowedMessage<'_>) -> ReadRecord {
        let mut headers = Vec::new();
        if let Some(h) = m.headers() {
            for i in 0..h.count() {
                let header = catch_unwind(AssertUnwindSafe(|| {
                    h.try_get(i)
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                }));
                match header {
                    Ok(Some(kv)) => headers.push(kv),
                    Ok(None) => {}
                    Err(_) => headers.push((UNREADABLE_HEADER_KEY.to_owned(), None)),
                }
            }
        }
        ReadRecord {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
            timestamp: m.timestamp().to_millis(),
        }
    }
}

/// Reads `topic` from the beginning of every partition up to its high watermark as of the
/// call, sorted by (partition, offset). An empty topic gives an empty vector. Assigns the
/// partitions (no group membership) and commits nothing.
pub(crate) async fn read_all(topic: &str) -> Vec<ReadRecord> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_to_end(&topic))
        .await
        .expect("read_all panicked")
}

/// Waits until `topic` holds at least `count` records (at most `timeout`), then returns all
/// of them as [`read_all`] does. Fails the test on timeout, showing how many there were.
pub(crate) async fn read_at_least(topic: &str, count: usize, timeout: Duration) -> Vec<ReadRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = read_all(topic).await;
        if records.len() >= count {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} holds {} records after {timeout:?}, expected at least {count}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read_to_end(topic: &str) -> Vec<ReadRecord> {
    // rdkafka needs a group id even to assign; this one never joins or commits.
    let consumer: BaseConsumer = client_config()
        .set("group.id", unique_name("read-all"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("create consumer");
    // Partition -> offset to read up to (exclusive).
    let mut pending: BTreeMap<i32, i64> = BTreeMap::new();
    {
        let mut assignment = TopicPartitionList::new();
        for partition in topic_partitions(&consumer, topic) {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
                .unwrap_or_else(|e| panic!("watermarks of {topic}/{partition}: {e}"));
            if low < high {
                assignment
                    .add_partition_offset(topic, partition, Offset::Offset(low))
                    .expect("valid offset");
                pending.insert(partition, high);
            }
        }
        if pending.is_empty() {
            return Vec::new();
        }
        consumer.assign(&assignment).expect("assign partitions");
    }
    let mut records = Vec::new();
    let deadline = Instant::now() + READ_TIMEOUT;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach the high watermarks within {READ_TIMEOUT:?}; \
             still waiting for (partition, end offset) {pending:?}, read {} records",
            records.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let done = pending
                    .get(&m.partition())
                    .is_some_and(|&end| m.offset() + 1 >= end);
                if pending.contains_key(&m.partition()) {
                    records.push(ReadRecord::from(&m));
                }
                if done {
                    pending.remove(&m.partition());
                }
            }
            // The end of the log (past transaction markers, say) also ends a partition.
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                pending.remove(&partition);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

// ---------------------------------------------------------------------------------------------
// Consumer groups

/// The committed offset of `group` for partitions `0..partitions` of `topic`: `None` where
/// the group has committed nothing.
pub(crate) async fn committed_offsets(
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, Option<i64>> {
    let group = group.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("create consumer");
        // The lists live and die inside this block, before the consumer is dropped
        // (rust-rdkafka #453: dropping a consumer while its lists live can hang).
        let offsets = {
            let mut wanted = TopicPartitionList::new();
            wanted.add_partition_range(&topic, 0, partitions - 1);
            let committed = consumer
                .committed_offsets(wanted, KAFKA_TIMEOUT)
                .unwrap_or_else(|e| panic!("committed offsets of {group} on {topic}: {e}"));
            committed
                .elements_for_topic(&topic)
                .iter()
                .map(|e| {
                    let offset = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    (e.partition(), offset)
                })
                .collect()
        };
        drop(consumer);
        offsets
    })
    .await
    .expect("committed_offsets panicked")
}

/// Commits `offsets` (partition, next offset to read) of `topic` for `group`, synchronously,
/// from a consumer that is not a member of the group (the group must have no live members).
pub(crate) async fn commit_offsets(group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let group = group.to_owned();
    let topic = topic.to_owned();
    let offsets = offsets.to_vec();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("create consumer");
        {
            let mut tpl = TopicPartitionList::new();
            for &(partition, offset) in &offsets {
                tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))
                    .expect("valid offset");
            }
            consumer
                .commit(&tpl, CommitMode::Sync)
                .unwrap_or_else(|e| panic!("commit {offsets:?} of {topic} for {group}: {e}"));
        }
        drop(consumer);
    })
    .await
    .expect("commit_offsets panicked");
}
