//! The floors (a1), (c0) and (d0): the raw loop of (a) plus the work kourier adds in (b),
//! (c) and (d), done by hand with the least Redis or Kafka work that keeps the same
//! guarantee. (b) is compared with (a1), (c) with (c0) and (d) with (d0), since (a) does
//! none of that work.
//!
//! **(a1)**: the raw loop, reading of each record what a handler is given: its key, its
//! headers (`BorrowedMessage::headers`: librdkafka parses the record's header block into a
//! list it allocates, on the first call) and its value decoded (`serde_json`, into the
//! benchmark's event). Nothing is copied: the loop reads each record while librdkafka still
//! holds it, where kourier copies it to bound its memory and to hand it to a worker. (b)'s
//! targets stay against (a); (a1) shows how much of the gap any consumer that hands headers
//! on pays.
//!
//! **(c0)**: the raw loop takes the records already fetched, up to [`CLAIM_BATCH`] at a time
//! (kourier's largest store batch), and for each batch
//!
//! 1. claims every record's key in **one pipeline** of `SET <key> inflight:<token> NX PX
//!    <lease>` (one round trip, no script): an `OK` is a claim; only when a key exists
//!    (never in this run: every `event-id` is new) a second pipeline of `GET`s tells a done
//!    key (skip the record), the batch's own token (a retry whose reply was lost: claimed)
//!    and somebody else's live claim (busy: this loop stops with an error, where kourier would
//!    retry later). That is what kourier's claim script answers, key by key: `SET NX` is the
//!    atomic claim, the script only saves the rare `GET`. The `GET` is not atomic with the
//!    `SET`, but it can only err on the safe side: a key gone meanwhile reads as busy (claim
//!    again later), never as done;
//! 2. "handles" the records (nothing, as in (a));
//! 3. completes every claim in **one call of a fenced script**: for each key, if it still
//!    holds this claim's token, `SET <key> done PX <ttl>`. The fencing is what makes a
//!    completion safe after a lost lease (expired, then claimed by another worker): it must
//!    not turn the other worker's claim into `done`. Redis 7.0 has no compare-and-set
//!    command (`SET ... IFEQ` is newer); `SET ... XX GET` writes before it compares.
//!    `WATCH`/`MULTI` would fence too, but it needs a connection of its own, two round trips
//!    (`WATCH` + `MGET`, then `MULTI`, one `SET` per key, `EXEC`) and aborts the whole batch
//!    when one key changes. So the floor runs a script too: the same one kourier's
//!    `complete_many` runs (`src/idempotency/redis.rs`), copied below;
//! 4. only then moves the records' offsets forward (committed every second, as in (a)).
//!
//! Same lease (60 s, kourier's default), TTL and key shape (`<prefix><group>:<event-id>`,
//! value `inflight:<32 hex digits>`) as (c). Not done, because no record here lives long
//! enough to need it: renewing the lease (kourier renews a held claim every third of it) and
//! releasing claims. The connection is a plain blocking one, the least client work.
//!
//! "Least" counts round trips and scripts, not the server's CPU, and the two may differ:
//! 256 pipelined `SET NX` are each read, parsed, dispatched and answered on their own, where
//! kourier's claim script runs the same 256 `SET NX` inside one command. So (c0)'s Redis
//! column need not be a lower bound for the server (the consumer's column is).
//! `--floor-claim-script` makes (c0) claim with kourier's claim script instead (one call per
//! batch, the same commands for the server as (c)), so a run can compare both.
//!
//! **(d0)**: the raw loop, and for every record whose id is a multiple of [`FAIL_EVERY`]
//! (read from the `event-id` header: (d) reads it from the decoded value, which is kourier's
//! cost), one dead letter sent with the producer settings of kourier's dead-letter sink
//! (`enable.idempotence=true`, `acks=all`, `partitioner=murmur2_random`,
//! `message.timeout.ms=30000`, `client.id=kourier-dead-letter`; letters batched),
//! as kourier writes it: to the source partition of `<topic>.dlt`, the record's key, value and
//! headers, then the same provenance headers. A record's offset may be committed only after
//! its letter is acknowledged: before every commit (every second) and at the end the loop
//! waits for every letter sent (`flush`); a failed delivery stops the run.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kourier::ClaimToken;
use kourier::dead_letter::headers;
use kourier::rdkafka::ClientContext;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::error::RDKafkaErrorCode;
use kourier::rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use kourier::rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext,
};
use kourier::redis;

use crate::args::{Args, ChildArgs};
use crate::consumers::{BenchEvent, consumer_config};
use crate::drain::{check_committed, raw_commit, raw_loop};
use crate::measure::{DrainClock, Outcome};
use crate::services::{
    client_config, delete_redis_keys, log_end, redis_cpu_secs, redis_prefix, redis_url,
    require_redis, settle_redis,
};
use crate::{
    BoxResult, DEDUP_LEASE, DEDUP_TTL, EVENT_ID_HEADER, FAIL_EVERY, PARTITIONS, SCENARIO_TIMEOUT,
};

/// The most records (c0) claims and completes in one round trip each: kourier's largest
/// store batch (`MAX_BATCH` in `src/consumer/dedup/store_batch.rs`).
pub(crate) const CLAIM_BATCH: usize = 256;

/// kourier's `complete_many` script (the very file its Redis store runs): for each key, compare-and-set `inflight:<token>` →
/// `done` with the TTL. Returns 1 completed, 2 already done, 0 not held by this token.
const COMPLETE_MANY_LUA: &str = include_str!("../../src/idempotency/lua/complete_many.lua");

/// kourier's `claim_many` script (the very file its Redis store runs; `--floor-claim-script`): for each key, `SET NX PX`, and
/// when the key exists, what it holds. Returns 1 acquired, 2 done, 3 busy.
const CLAIM_MANY_LUA: &str = include_str!("../../src/idempotency/lua/claim_many.lua");

/// kourier's dead-letter send timeout (`message.timeout.ms`).
const DEAD_LETTER_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// A record of (c0)'s batch: where it is, its Redis key and the value of its claim.
struct Claimed {
    partition: i32,
    offset: i64,
    key: String,
    claim: String,
    /// Claimed by this batch (false: already done, skipped).
    held: bool,
}

/// (c0): the raw loop with a pipelined claim and one fenced completion per batch.
pub(crate) fn redis_floor_drain(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let n = child.topic_records;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(require_redis())?;
    rt.block_on(settle_redis())?;
    let store_cpu0 = rt.block_on(redis_cpu_secs())?;
    let clock = DrainClock::start();
    let consumer: BaseConsumer = consumer_config(args, group).create()?;
    consumer.subscribe(&[child.topic.as_str()])?;
    let mut redis = redis::Client::open(redis_url().as_str())?.get_connection()?;
    let complete = redis::Script::new(COMPLETE_MANY_LUA);
    let claim_script = args
        .floor_claim_script
        .then(|| redis::Script::new(CLAIM_MANY_LUA));
    // kourier's key: the store's prefix, then the dedup key namespaced by the group.
    let prefix = format!("{}{group}:", redis_prefix(&child.run_id));
    let lease_ms = DEDUP_LEASE.as_millis().to_string();
    let ttl_ms = DEDUP_TTL.as_millis().to_string();
    let mut next = vec![-1i64; PARTITIONS as usize];
    let mut settled = 0u64;
    let mut first = None;
    let mut last_commit = Instant::now();
    let mut batch: Vec<Claimed> = Vec::with_capacity(CLAIM_BATCH);
    while settled < n {
        if last_commit.elapsed() >= Duration::from_secs(1) {
            raw_commit(&consumer, &child.topic, &next)?;
            last_commit = Instant::now();
        }
        if clock.created.elapsed() > SCENARIO_TIMEOUT {
            return Err(format!(
                "redis floor: {settled} of {n} records after {SCENARIO_TIMEOUT:?}"
            )
            .into());
        }
        // Wait for one record, then take what is already fetched.
        batch.clear();
        while batch.len() < CLAIM_BATCH {
            let wait = if batch.is_empty() {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            };
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    first.get_or_insert_with(Instant::now);
                    let event_id = event_id(&m).ok_or("a record without an event-id header")?;
                    batch.push(Claimed {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: format!("{prefix}{event_id}"),
                        claim: format!("inflight:{}", ClaimToken::random()),
                        held: true,
                    });
                }
                Some(Err(e)) => eprintln!("raw consumer error: {e}"),
                None => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        match &claim_script {
            Some(script) => claim_by_script(&mut redis, script, &mut batch, &lease_ms)?,
            None => claim(&mut redis, &mut batch, &lease_ms)?,
        }
        // The no-op handler would run here.
        let held: Vec<&Claimed> = batch.iter().filter(|c| c.held).collect();
        if !held.is_empty() {
            let mut invocation = complete.prepare_invoke();
            for c in &held {
                invocation.key(c.key.as_str());
            }
            for c in &held {
                invocation.arg(c.claim.as_str());
            }
            invocation.arg(ttl_ms.as_str());
            let answers: Vec<i64> = invocation.invoke(&mut redis)?;
            if let Some((c, _)) = held.iter().zip(&answers).find(|(_, a)| **a != 1) {
                return Err(format!("redis floor: lost the claim of {}", c.key).into());
            }
        }
        for c in &batch {
            if let Some(slot) = next.get_mut(c.partition as usize) {
                *slot = c.offset + 1;
            }
        }
        settled += batch.len() as u64;
    }
    let outcome = clock.stop(n, args.size, first, Instant::now());
    let store_cpu_secs = rt.block_on(redis_cpu_secs())? - store_cpu0;
    raw_commit(&consumer, &child.topic, &next)?;
    consumer.unsubscribe();
    drop(consumer);
    check_committed(group, &child.topic, PARTITIONS, n)?;
    rt.block_on(delete_redis_keys(&redis_prefix(&child.run_id)))?;
    Ok(Outcome {
        store_cpu_secs,
        ..outcome
    })
}

/// One pipeline of `SET NX PX`; for the keys that exist, one pipeline of `GET`s.
fn claim(redis: &mut redis::Connection, batch: &mut [Claimed], lease_ms: &str) -> BoxResult<()> {
    let mut pipe = redis::pipe();
    for c in batch.iter() {
        pipe.cmd("SET")
            .arg(c.key.as_str())
            .arg(c.claim.as_str())
            .arg("NX")
            .arg("PX")
            .arg(lease_ms);
    }
    let answers: Vec<redis::Value> = pipe.query(redis)?;
    let exist: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, redis::Value::Nil))
        .map(|(i, _)| i)
        .collect();
    if exist.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for &i in &exist {
        pipe.cmd("GET").arg(batch[i].key.as_str());
    }
    let values: Vec<Option<String>> = pipe.query(redis)?;
    for (&i, value) in exist.iter().zip(values) {
        match value.as_deref() {
            Some("done") => batch[i].held = false,
            Some(v) if v == batch[i].claim => {}
            _ => return Err(format!("redis floor: {} is busy", batch[i].key).into()),
        }
    }
    Ok(())
}

/// `--floor-claim-script`: kourier's claim script over the batch, one call.
fn claim_by_script(
    redis: &mut redis::Connection,
    script: &redis::Script,
    batch: &mut [Claimed],
    lease_ms: &str,
) -> BoxResult<()> {
    let mut invocation = script.prepare_invoke();
    for c in batch.iter() {
        invocation.key(c.key.as_str());
    }
    for c in batch.iter() {
        invocation.arg(c.claim.as_str());
    }
    invocation.arg(lease_ms);
    let answers: Vec<i64> = invocation.invoke(redis)?;
    for (c, answer) in batch.iter_mut().zip(answers) {
        match answer {
            1 => {}
            2 => c.held = false,
            _ => return Err(format!("redis floor: {} is busy", c.key).into()),
        }
    }
    Ok(())
}

fn event_id(m: &impl kourier::rdkafka::message::Message) -> Option<&str> {
    m.headers()?
        .iter()
        .find(|h| h.key == EVENT_ID_HEADER)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

/// Counts the dead-letter producer's delivery reports (served by `poll` and `flush`).
#[derive(Default)]
struct LetterContext {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for LetterContext {}

impl ProducerContext for LetterContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = match result {
            Ok(_) => &self.delivered,
            Err((e, _)) => {
                eprintln!("dead letter not delivered: {e}");
                &self.failed
            }
        };
        counter.fetch_add(1, AtomicOrdering::Relaxed);
    }
}

/// Waits for every letter sent; an error if one was not delivered.
fn flush_letters(producer: &BaseProducer<LetterContext>) -> BoxResult<()> {
    producer.flush(DEAD_LETTER_SEND_TIMEOUT)?;
    let failed = producer.context().failed.load(AtomicOrdering::Relaxed);
    if failed > 0 {
        return Err(format!("dead-letter floor: {failed} letters not delivered").into());
    }
    Ok(())
}

/// (a1): the raw loop, reading each record's key, headers and decoded value.
pub(crate) fn read_floor_drain(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let clock = DrainClock::start();
    raw_loop(
        args,
        child,
        group,
        ("read floor", clock),
        |m| {
            std::hint::black_box(m.key());
            if let Some(headers) = m.headers() {
                for header in headers.iter() {
                    std::hint::black_box(header);
                }
            }
            let event: BenchEvent =
                serde_json::from_slice(m.payload().ok_or("a record without a value")?)?;
            std::hint::black_box(event);
            Ok(())
        },
        || Ok(()),
    )
}

/// (d0): the raw loop, and 1 % of the records sent to `<topic>.dlt` as kourier's sink would.
pub(crate) fn dead_letter_floor_drain(
    args: &Args,
    child: &ChildArgs,
    group: &str,
) -> BoxResult<Outcome> {
    let dlt = format!("{}.dlt", child.topic);
    let dlt_before = log_end(&dlt, PARTITIONS)?;
    let clock = DrainClock::start();
    // kourier's dead-letter sink defaults (src/producer.rs, src/dead_letter/kafka.rs).
    let producer: BaseProducer<LetterContext> = client_config()
        .set("client.id", "kourier-dead-letter")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set(
            "message.timeout.ms",
            DEAD_LETTER_SEND_TIMEOUT.as_millis().to_string(),
        )
        .create_with_context(LetterContext::default())?;
    let mut letters = 0u64;
    let outcome = raw_loop(
        args,
        child,
        group,
        ("dead-letter floor", clock),
        |m| {
            let id = event_id(m)
                .and_then(|e| e.rsplit('-').next())
                .and_then(|i| i.parse::<u64>().ok())
                .ok_or("a record without a numbered event-id header")?;
            if id.is_multiple_of(FAIL_EVERY) {
                send_letter(&producer, m, &dlt, group)?;
                letters += 1;
            }
            Ok(())
        },
        // Offsets past a letter are committed only once it is acknowledged.
        || flush_letters(&producer),
    )?;
    let delivered = producer.context().delivered.load(AtomicOrdering::Relaxed);
    let dead_letters = log_end(&dlt, PARTITIONS)? - dlt_before;
    if delivered != letters || dead_letters != letters {
        return Err(format!(
            "dead-letter floor: {letters} letters sent, {delivered} acknowledged, \
             {dead_letters} in the dead-letter topic"
        )
        .into());
    }
    Ok(Outcome {
        dead_letters,
        ..outcome
    })
}

/// One dead letter: the record's key, value and headers, then kourier's provenance headers
/// (as `letter_headers` in `src/dead_letter/headers.rs` writes them for a permanent failure on
/// the first attempt), to the source partition.
fn send_letter(
    producer: &BaseProducer<LetterContext>,
    m: &impl kourier::rdkafka::message::Message,
    dlt: &str,
    group: &str,
) -> BoxResult<()> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
        .to_string();
    let (timestamp, timestamp_type) = match m.timestamp() {
        kourier::rdkafka::Timestamp::CreateTime(t) => (t, "CreateTime"),
        kourier::rdkafka::Timestamp::LogAppendTime(t) => (t, "LogAppendTime"),
        kourier::rdkafka::Timestamp::NotAvailable => (-1, "NoTimestampType"),
    };
    let source = m.headers().map_or(0, |h| h.count());
    let mut out = OwnedHeaders::new_with_capacity(source + 12);
    if let Some(hs) = m.headers() {
        // Provenance a redriven record carries is replaced, not repeated.
        for h in hs.iter().filter(|h| !headers::ALL.contains(&h.key)) {
            out = out.insert(h);
        }
    }
    let partition = m.partition().to_be_bytes();
    let offset = m.offset().to_be_bytes();
    let timestamp = timestamp.to_be_bytes();
    let provenance: [(&str, &[u8]); 12] = [
        (headers::ORIGINAL_TOPIC, m.topic().as_bytes()),
        (headers::ORIGINAL_PARTITION, &partition),
        (headers::ORIGINAL_OFFSET, &offset),
        (headers::ORIGINAL_TIMESTAMP, &timestamp),
        (headers::ORIGINAL_TIMESTAMP_TYPE, timestamp_type.as_bytes()),
        (headers::ORIGINAL_CONSUMER_GROUP, group.as_bytes()),
        (headers::EXCEPTION_MESSAGE, b"benchmark: permanent failure"),
        (headers::EXCEPTION_FQCN, b"kourier.PermanentFailure"),
        (headers::FAILURE_KIND, b"permanent"),
        (headers::ATTEMPTS, b"1"),
        (headers::FIRST_FAILURE_MS, now_ms.as_bytes()),
        (headers::LAST_FAILURE_MS, now_ms.as_bytes()),
    ];
    for (key, value) in provenance {
        out = out.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut record = BaseRecord::to(dlt).partition(m.partition()).headers(out);
    if let Some(key) = m.key() {
        record = record.key(key);
    }
    if let Some(value) = m.payload() {
        record = record.payload(value);
    }
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                producer.poll(Duration::from_millis(10));
                record = back;
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
    producer.poll(Duration::ZERO);
    Ok(())
}
