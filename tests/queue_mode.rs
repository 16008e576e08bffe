//! Queue mode (feature `queue`, `kourier::queue`) on a real Kafka 4.4 broker: two members
//! of one share group on one partition, lock renewal, dead letters, idempotency, shutdown.
//!
//! These tests start a broker of their own (one for the whole file, from the Kafka jars
//! `scripts/services up` caches) with the share-group settings they need: a lock as short
//! as 1 s (`group.share.min.record.lock.duration.ms=1000`; the default minimum is 15 s), so
//! a lock that runs out does so in seconds, and a 1 s share-group heartbeat (default 5 s: a
//! member gets its assignment on its second heartbeat, so joining took about 5 s).
//! `scripts/services` starts the shared broker with the same lines. Run with `cargo test --features queue --test queue_mode`.

mod support;

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kourier::dead_letter::headers;
use kourier::queue::{QueueConsumer, QueueError, QueueReport};
use kourier::rdkafka::config::ClientConfig;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::message::{Headers as _, Message as _};
use kourier::rdkafka::producer::{FutureProducer, FutureRecord};
use kourier::rdkafka::{Offset, TopicPartitionList};
use kourier::{
    DedupKey, HandlerError, Idempotency, IdempotencyStore, InMemoryIdempotencyStore, Message,
    RecordOutcome, RetryPolicy, handler_fn,
};
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

// ─────────────────────────── the private broker ───────────────────────────

static BROKER: OnceCell<String> = OnceCell::const_new();

/// The bootstrap address of this file's broker, started on first use. The broker is a
/// child of a small shell watchdog that kills it (and removes its directory) once the test
/// process is gone, since statics are never dropped.
async fn broker() -> &'static str {
    // `RUST_LOG=kourier=debug` shows the engine's lines.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    BROKER.get_or_init(start_broker).await
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_broker() -> String {
    let (port, controller) = (free_port(), free_port());
    let support::own_broker::Prepared {
        dir,
        props,
        classpath,
        log4j,
    } = support::own_broker::prepare(
        "queue",
        port,
        controller,
        &format!("127.0.0.1:{port}"),
        "offsets.topic.num.partitions=1\n\
         share.coordinator.state.topic.num.partitions=1\n\
         group.share.min.record.lock.duration.ms=1000\n\
         group.share.min.heartbeat.interval.ms=1000\n\
         group.share.heartbeat.interval.ms=1000\n\
         group.share.record.lock.duration.ms=30000\n",
    );
    // The watchdog: runs the broker, kills it when this test process has gone.
    let script = format!(
        "java -Xmx384m -Xms128m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 '{log4j}' -cp '{classpath}' \
         kafka.Kafka '{props}' >'{log}' 2>&1 & b=$!; \
         while kill -0 {test} 2>/dev/null && kill -0 $b 2>/dev/null; do sleep 1; done; \
         kill -9 $b 2>/dev/null; wait $b 2>/dev/null; rm -rf '{dir}'",
        props = props.display(),
        log = dir.join("kafka.log").display(),
        test = std::process::id(),
        dir = dir.display(),
    );
    let mut watchdog = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the broker");
    // Reaped when it ends (with the broker, or with this process).
    std::thread::spawn(move || watchdog.wait());
    let bootstrap = format!("127.0.0.1:{port}");
    let log = dir.join("kafka.log");
    let ready = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if support::own_broker::answers(&bootstrap, config).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "the test broker did not answer within 120 s:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    bootstrap
}

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

// ─────────────────────────── helpers ───────────────────────────

/// A fresh topic and its dead-letter topic, one partition each, on the private broker.
async fn topics(prefix: &str) -> (&'static str, String) {
    let bootstrap = broker().await;
    let topic = support::unique_name(prefix);
    support::create_topic_via(&config(bootstrap), &topic, 1, &[]).await;
    support::create_topic_via(&config(bootstrap), &format!("{topic}.dlt"), 1, &[]).await;
    (bootstrap, topic)
}

/// Produces `(key, value)` records (keys double as event ids) and waits for the acks.
async fn produce(bootstrap: &str, topic: &str, records: &[(String, String)]) {
    let producer: FutureProducer = config(bootstrap)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut pending = Vec::new();
    for (key, value) in records {
        let record = FutureRecord::to(topic).key(key).payload(value);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

fn events(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("e-{i}"), format!("\"payload {i}\"")))
        .collect()
}

/// The dead letters in `dlt` after `settle` of quiet: (key, headers as text).
async fn read_letters(
    bootstrap: &str,
    dlt: &str,
    settle: Duration,
) -> Vec<(String, HashMap<String, Vec<u8>>)> {
    let (bootstrap, dlt) = (bootstrap.to_owned(), dlt.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config(&bootstrap)
            .set("group.id", support::unique_name("queue-dlt-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&dlt, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut letters = Vec::new();
        let mut quiet = Duration::ZERO;
        while quiet < settle {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    quiet = Duration::ZERO;
                    let mut h = HashMap::new();
                    if let Some(hs) = m.headers() {
                        for header in hs.iter() {
                            h.insert(
                                header.key.to_owned(),
                                header.value.unwrap_or_default().to_vec(),
                            );
                        }
                    }
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    letters.push((key, h));
                }
                _ => quiet += Duration::from_millis(200),
            }
        }
        letters
    })
    .await
    .unwrap()
}

/// A header of a letter as text (empty when absent).
fn text<'a>(h: &'a HashMap<String, Vec<u8>>, name: &str) -> std::borrow::Cow<'a, str> {
    String::from_utf8_lossy(h.get(name).map_or(&[][..], Vec::as_slice))
}

/// A member running in the background until `stop` is sent.
struct Member {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<Result<QueueReport, kourier::queue::QueueError>>,
}

impl Member {
    /// Sends the shutdown signal.
    fn signal(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Sends the shutdown signal and waits for the report.
    async fn stop(mut self) -> QueueReport {
        self.signal();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("the member stops within 40 s")
            .expect("the member's task")
            .expect("the member ran")
    }
}

fn spawn<H, C>(consumer: QueueConsumer<H, C>) -> Member
where
    H: kourier::Handler,
    C: kourier::Codec<H::Event>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    Member {
        stop: Some(stop),
        task,
    }
}

/// Waits until `check` holds, at most `limit`.
async fn until(limit: Duration, what: &str, check: impl Fn() -> bool) {
    let waited = tokio::time::timeout(limit, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what}: not within {limit:?}");
}

type Seen = Arc<Mutex<Vec<(u8, String)>>>;

/// A handler for member `member` that records each event it handles, taking `delay`.
fn recording(
    member: u8,
    seen: &Seen,
    delay: Duration,
) -> impl kourier::Handler<Event = String> + use<> {
    let seen = Arc::clone(seen);
    handler_fn(move |m: Message<String>| {
        let seen = Arc::clone(&seen);
        async move {
            tokio::time::sleep(delay).await;
            seen.lock()
                .unwrap()
                .push((member, m.key_str().unwrap_or_default().to_owned()));
            Ok::<(), HandlerError>(())
        }
    })
}

fn counts(seen: &Seen) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (_, key) in seen.lock().unwrap().iter() {
        *counts.entry(key.clone()).or_insert(0) += 1;
    }
    counts
}

// ─────────────────────────── the tests ───────────────────────────

/// Two members of one share group on a one-partition topic: both handle records (a
/// consumer group would give the partition to one), every record once, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_share_one_partition_without_loss_or_duplicates() {
    let (bootstrap, topic) = topics("queue-two-members").await;
    let group = support::unique_name("queue-two-members");
    let seen: Seen = Arc::default();
    let member = |id: u8| {
        QueueConsumer::builder(recording(id, &seen, Duration::from_millis(20)))
            .bootstrap_servers(bootstrap)
            .group_id(group.clone())
            .topic(topic.clone())
            .max_in_flight(4)
            .build()
            .unwrap()
    };
    let (a, b) = (spawn(member(1)), spawn(member(2)));
    produce(bootstrap, &topic, &events(300)).await;
    until(Duration::from_secs(30), "300 records handled", || {
        seen.lock().unwrap().len() >= 300
    })
    .await;
    let (ra, rb) = (a.stop().await, b.stop().await);
    let counts = counts(&seen);
    assert_eq!(counts.len(), 300, "every record handled");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    let by_a = seen.lock().unwrap().iter().filter(|(m, _)| *m == 1).count();
    assert!(
        by_a > 0 && by_a < 300,
        "both members took part: member 1 handled {by_a} of 300"
    );
    assert_eq!(ra.handled + rb.handled, 300, "reports: {ra:?} {rb:?}");
    assert_eq!(ra.acknowledgement_failures + rb.acknowledgement_failures, 0);
}

/// A handler running longer than the lock (2 s lock, 5 s handler) keeps its record: the
/// lock is renewed, so the other member never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_longer_than_the_lock_is_not_redelivered() {
    let (bootstrap, topic) = topics("queue-renewal").await;
    let group = support::unique_name("queue-renewal");
    let seen: Seen = Arc::default();
    let calls = Arc::new(AtomicU32::new(0));
    let member = |id: u8| {
        let (seen, calls) = (Arc::clone(&seen), Arc::clone(&calls));
        QueueConsumer::builder(handler_fn(move |m: Message<String>| {
            let (seen, calls) = (Arc::clone(&seen), Arc::clone(&calls));
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                seen.lock()
                    .unwrap()
                    .push((id, m.key_str().unwrap_or_default().to_owned()));
                Ok::<(), HandlerError>(())
            }
        }))
        .bootstrap_servers(bootstrap)
        .group_id(group.clone())
        .topic(topic.clone())
        .lock_duration(Duration::from_secs(2))
        .max_in_flight(1)
        .build()
        .unwrap()
    };
    let (a, b) = (spawn(member(1)), spawn(member(2)));
    produce(bootstrap, &topic, &events(1)).await;
    until(Duration::from_secs(20), "the record handled", || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    // Past 1.5 more lock durations: a lost lock would have shown as a second call by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ra, rb) = (a.stop().await, b.stop().await);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler ran once (a second call means the lock ran out and the record went to the other member)"
    );
    assert_eq!(ra.handled + rb.handled, 1);
    assert_eq!(
        ra.acknowledgement_failures + rb.acknowledgement_failures,
        0,
        "the ACCEPT found its lock: {ra:?} {rb:?}"
    );
}

/// Transient failures retried in place (3 attempts), then exactly one dead letter with the
/// consumer-group engine's headers, and the record ACCEPTed (not delivered again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_exhausted_give_exactly_one_dead_letter() {
    let (bootstrap, topic) = topics("queue-exhausted").await;
    let group = support::unique_name("queue-exhausted");
    let calls = Arc::new(AtomicU32::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let (c, o) = (Arc::clone(&calls), Arc::clone(&outcomes));
    let consumer = QueueConsumer::builder(handler_fn(move |_m: Message<String>| {
        let c = Arc::clone(&c);
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(HandlerError::transient("smtp 451"))
        }
    }))
    .bootstrap_servers(bootstrap)
    .group_id(group.clone())
    .topic(topic.clone())
    .retry_policy(RetryPolicy::fixed(Duration::from_millis(100), 2))
    .on_outcome(move |_r, outcome| o.lock().unwrap().push(outcome))
    .build()
    .unwrap();
    let member = spawn(consumer);
    produce(bootstrap, &topic, &events(1)).await;
    until(Duration::from_secs(20), "an outcome", || {
        !outcomes.lock().unwrap().is_empty()
    })
    .await;
    let letters = read_letters(bootstrap, &format!("{topic}.dlt"), Duration::from_secs(3)).await;
    let report = member.stop().await;
    assert_eq!(letters.len(), 1, "exactly one dead letter: {letters:?}");
    let (key, h) = &letters[0];
    assert_eq!(key, "e-0");
    assert_eq!(text(h, headers::FAILURE_KIND), "retries-exhausted");
    assert_eq!(text(h, headers::ATTEMPTS), "3");
    assert_eq!(text(h, headers::ORIGINAL_TOPIC), topic);
    // Spring's format: the offset as 8 big-endian bytes.
    assert_eq!(h[headers::ORIGINAL_OFFSET], 0i64.to_be_bytes());
    assert_eq!(text(h, headers::ORIGINAL_CONSUMER_GROUP), group);
    assert!(
        text(h, headers::EXCEPTION_MESSAGE).contains("smtp 451"),
        "{h:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "3 attempts, and not delivered again"
    );
    assert_eq!(
        *outcomes.lock().unwrap(),
        vec![RecordOutcome::DeadLettered(
            kourier::DeadLetterReason::RetriesExhausted
        )]
    );
    assert_eq!(report.dead_lettered, 1);
}

/// A permanent failure is dead-lettered at once (one call), and a record the codec cannot
/// decode (a poison pill) too, without calling the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_and_poison_pills_are_dead_lettered_at_once() {
    let (bootstrap, topic) = topics("queue-permanent").await;
    let group = support::unique_name("queue-permanent");
    let calls = Arc::new(AtomicU32::new(0));
    let ended = Arc::new(AtomicU32::new(0));
    let (c, e) = (Arc::clone(&calls), Arc::clone(&ended));
    let consumer = QueueConsumer::builder(handler_fn(move |_m: Message<String>| {
        let c = Arc::clone(&c);
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(HandlerError::permanent("no such mailbox"))
        }
    }))
    .bootstrap_servers(bootstrap)
    .group_id(group)
    .topic(topic.clone())
    .retry_policy(RetryPolicy::fixed(Duration::from_millis(100), 5))
    .on_outcome(move |_, _| {
        e.fetch_add(1, Ordering::SeqCst);
    })
    .build()
    .unwrap();
    let member = spawn(consumer);
    produce(
        bootstrap,
        &topic,
        &[
            ("bad".to_owned(), "not json".to_owned()),
            ("e-1".to_owned(), "\"fine json\"".to_owned()),
        ],
    )
    .await;
    until(Duration::from_secs(20), "two outcomes", || {
        ended.load(Ordering::SeqCst) >= 2
    })
    .await;
    let letters = read_letters(bootstrap, &format!("{topic}.dlt"), Duration::from_secs(2)).await;
    let report = member.stop().await;
    let kinds: HashMap<&str, String> = letters
        .iter()
        .map(|(k, h)| (k.as_str(), text(h, headers::FAILURE_KIND).into_owned()))
        .collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(kinds["bad"], "decode");
    assert_eq!(kinds["e-1"], "permanent");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "once for e-1, never for the poison pill"
    );
    assert_eq!(report.dead_lettered, 2);
}

/// A record whose dedup key is done is ACCEPTed without calling the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_skips_a_record_whose_effect_is_done() {
    let (bootstrap, topic) = topics("queue-dedup").await;
    let group = support::unique_name("queue-dedup");
    let store = Arc::new(InMemoryIdempotencyStore::new());
    // e-0's effect is done already (keys are namespaced by the group).
    let kourier::Claim::Acquired(token) = store
        .claim(&format!("{group}:e-0"), Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("a fresh store hands out the claim")
    };
    store
        .complete(&format!("{group}:e-0"), &token, Duration::from_secs(3600))
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let o = Arc::clone(&outcomes);
    let consumer = QueueConsumer::builder(recording(1, &seen, Duration::ZERO))
        .bootstrap_servers(bootstrap)
        .group_id(group.clone())
        .topic(topic.clone())
        .idempotency(Idempotency::new(
            store.clone(),
            DedupKey::from_fn(|m: &Message<String>| m.key_str().map(str::to_owned)),
        ))
        .on_outcome(move |r, outcome| {
            o.lock().unwrap().push((
                String::from_utf8_lossy(r.key.as_ref().unwrap().as_slice()).into_owned(),
                outcome,
            ))
        })
        .build()
        .unwrap();
    let member = spawn(consumer);
    produce(bootstrap, &topic, &events(2)).await;
    until(Duration::from_secs(20), "two outcomes", || {
        outcomes.lock().unwrap().len() >= 2
    })
    .await;
    let report = member.stop().await;
    let handled: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, k)| k.clone())
        .collect();
    assert_eq!(
        handled,
        vec!["e-1".to_owned()],
        "the handler ran for e-1 only"
    );
    let mut outcomes = outcomes.lock().unwrap().clone();
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        outcomes,
        vec![
            ("e-0".to_owned(), RecordOutcome::Duplicate),
            ("e-1".to_owned(), RecordOutcome::Handled)
        ]
    );
    assert_eq!((report.duplicates, report.handled), (1, 1));
    // e-1 is marked done now: a redelivery would be skipped.
    assert_eq!(
        store
            .claim(&format!("{group}:e-1"), Duration::from_secs(1))
            .await
            .unwrap(),
        kourier::Claim::Done
    );
}

/// At shutdown, the records of the batch that did not start are RELEASEd at once: the other
/// member gets them while member 1's running record still runs, well before their lock
/// (10 s) would have run out; the running record finishes and is ACCEPTed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_unstarted_records_to_another_member() {
    let (bootstrap, topic) = topics("queue-shutdown").await;
    let group = support::unique_name("queue-shutdown");
    let seen: Seen = Arc::default();
    let started = Arc::new(AtomicU32::new(0));
    let s = Arc::clone(&started);
    let seen_a = Arc::clone(&seen);
    let a = QueueConsumer::builder(handler_fn(move |m: Message<String>| {
        let (s, seen) = (Arc::clone(&s), Arc::clone(&seen_a));
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(7)).await;
            seen.lock()
                .unwrap()
                .push((1, m.key_str().unwrap_or_default().to_owned()));
            Ok::<(), HandlerError>(())
        }
    }))
    .bootstrap_servers(bootstrap)
    .group_id(group.clone())
    .topic(topic.clone())
    .lock_duration(Duration::from_secs(10))
    .max_in_flight(1)
    .fetch_size(20)
    .build()
    .unwrap();
    produce(bootstrap, &topic, &events(20)).await;
    let mut a = spawn(a);
    until(Duration::from_secs(20), "member 1 started a record", || {
        started.load(Ordering::SeqCst) >= 1
    })
    .await;
    let b = spawn(
        QueueConsumer::builder(recording(2, &seen, Duration::ZERO))
            .bootstrap_servers(bootstrap)
            .group_id(group.clone())
            .topic(topic.clone())
            .build()
            .unwrap(),
    );
    // Let member 2 join while member 1 is on its first record.
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal();
    let by_b = || seen.lock().unwrap().iter().filter(|(m, _)| *m == 2).count();
    // Member 1's running record still has about 5 s to go: member 2 gets the released ones
    // meanwhile (released only when member 1's batch ends, they would come after that; a
    // lock running out would take 10 s).
    let a_started = started.load(Ordering::SeqCst);
    until(
        Duration::from_secs(5),
        "member 2 handled the released records",
        || by_b() + a_started as usize >= 20,
    )
    .await;
    let report_a = a.stop().await;
    let report_b = b.stop().await;
    let counts = counts(&seen);
    assert_eq!(counts.len(), 20, "every record handled: {counts:?}");
    assert!(counts.values().all(|n| *n == 1), "each once: {counts:?}");
    assert_eq!(
        started.load(Ordering::SeqCst),
        a_started,
        "member 1 started nothing after the signal"
    );
    assert_eq!(
        report_a.handled,
        u64::from(a_started),
        "its running record finished: {report_a:?}"
    );
    assert!(
        report_a.released_unstarted >= 1,
        "member 1 held records it had not started: {report_a:?}"
    );
    assert_eq!(
        report_b.handled + report_a.handled,
        20,
        "{report_a:?} {report_b:?}"
    );
}

/// The startup checks answer with a typed error naming what is wrong: a lock duration the
/// broker refuses (below its 1 s minimum here), missing topics; and
/// `create_missing_topics(true)` creates the topic and its dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_checks_name_what_is_wrong() {
    let bootstrap = broker().await;
    let handler = || handler_fn(|_m: Message<String>| async { Ok::<(), HandlerError>(()) });
    let (_, topic) = topics("queue-startup").await;
    let refused = QueueConsumer::builder(handler())
        .bootstrap_servers(bootstrap)
        .group_id(support::unique_name("queue-startup"))
        .topic(topic)
        .lock_duration(Duration::from_millis(500))
        .build()
        .unwrap()
        .run(std::future::pending())
        .await;
    match refused {
        Err(QueueError::LockDuration { requested, reason }) => {
            assert_eq!(requested, Duration::from_millis(500));
            assert!(reason.contains("share.record.lock.duration.ms"), "{reason}");
        }
        other => panic!("expected QueueError::LockDuration, got {other:?}"),
    }

    let missing = support::unique_name("queue-missing");
    let err = QueueConsumer::builder(handler())
        .bootstrap_servers(bootstrap)
        .group_id(support::unique_name("queue-missing"))
        .topic(missing.clone())
        .build()
        .unwrap()
        .run(std::future::pending())
        .await
        .unwrap_err();
    match &err {
        QueueError::MissingTopics { topics } => {
            assert_eq!(topics, &vec![missing.clone(), format!("{missing}.dlt")]);
        }
        other => panic!("expected QueueError::MissingTopics, got {other:?}"),
    }

    let seen: Seen = Arc::default();
    let member = spawn(
        QueueConsumer::builder(recording(1, &seen, Duration::ZERO))
            .bootstrap_servers(bootstrap)
            .group_id(support::unique_name("queue-missing"))
            .topic(missing.clone())
            .create_missing_topics(true)
            .build()
            .unwrap(),
    );
    until(Duration::from_secs(20), "the topics created", || {
        let Ok(consumer) = config(bootstrap).create::<BaseConsumer>() else {
            return false;
        };
        let Ok(m) = consumer.fetch_metadata(None, Duration::from_secs(2)) else {
            return false;
        };
        let names: Vec<&str> = m.topics().iter().map(|t| t.name()).collect();
        names.contains(&missing.as_str()) && names.contains(&format!("{missing}.dlt").as_str())
    })
    .await;
    produce(bootstrap, &missing, &events(1)).await;
    until(Duration::from_secs(20), "the record handled", || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(member.stop().await.handled, 1);
}

/// The member process `kill_9_of_a_member_loses_nothing` starts and kills: this test binary
/// again, running only this test, with `QUEUE_CHILD_BOOTSTRAP` set (without it this test does
/// nothing). It handles records (20 ms each) and appends each handled key to
/// `QUEUE_CHILD_OUT`, until it is killed. With `QUEUE_CHILD_HANG` (for
/// `a_member_killed_at_each_delivery_sends_the_record_to_the_broker_dlq`) its handler appends
/// the key when it starts and never finishes, and `QUEUE_CHILD_LIMIT` / `QUEUE_CHILD_DLQ` set
/// the delivery limit and the broker's dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a member process for kill_9_of_a_member_loses_nothing, started by it"]
async fn queue_member_child() {
    let (Ok(bootstrap), Ok(topic), Ok(group), Ok(out)) = (
        std::env::var("QUEUE_CHILD_BOOTSTRAP"),
        std::env::var("QUEUE_CHILD_TOPIC"),
        std::env::var("QUEUE_CHILD_GROUP"),
        std::env::var("QUEUE_CHILD_OUT"),
    ) else {
        return;
    };
    let out = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .unwrap(),
    ));
    let hang = std::env::var("QUEUE_CHILD_HANG").is_ok();
    let handler = handler_fn(move |m: Message<String>| {
        let out = Arc::clone(&out);
        async move {
            use std::io::Write as _;
            if hang {
                writeln!(out.lock().unwrap(), "{}", m.key_str().unwrap_or_default()).unwrap();
                tokio::time::sleep(Duration::from_secs(120)).await;
                return Ok::<(), HandlerError>(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            writeln!(out.lock().unwrap(), "{}", m.key_str().unwrap_or_default()).unwrap();
            Ok::<(), HandlerError>(())
        }
    });
    let mut builder = QueueConsumer::builder(handler)
        .bootstrap_servers(bootstrap)
        .group_id(group)
        .topic(topic)
        .max_in_flight(4)
        .fetch_size(16);
    if let Some(ms) = std::env::var("QUEUE_CHILD_LOCK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.lock_duration(Duration::from_millis(ms));
    }
    if let Some(limit) = std::env::var("QUEUE_CHILD_LIMIT")
        .ok()
        .and_then(|l| l.parse().ok())
    {
        builder = builder.delivery_limit(limit);
    }
    if let Ok(dlq) = std::env::var("QUEUE_CHILD_DLQ") {
        builder = builder
            .broker_dead_letter_queue(dlq)
            .create_missing_topics(true);
    }
    builder
        .build()
        .unwrap()
        .run(std::future::pending())
        .await
        .unwrap();
}

/// Starts `queue_member_child` on `topic` and `group`, appending what it handles to `out`,
/// with `settings` (its `QUEUE_CHILD_*` variables) on top.
fn member_process(
    bootstrap: &str,
    topic: &str,
    group: &str,
    out: &std::path::Path,
    settings: &[(&str, &str)],
) -> std::process::Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "queue_member_child", "--ignored", "--nocapture"])
        .env("QUEUE_CHILD_BOOTSTRAP", bootstrap)
        .env("QUEUE_CHILD_TOPIC", topic)
        .env("QUEUE_CHILD_GROUP", group)
        .env("QUEUE_CHILD_OUT", out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command.envs(settings.iter().copied());
    command.spawn().unwrap()
}

/// The keys a member process handled so far (one line each in `out`).
fn handled_by(out: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {}", child.id());
}

/// The member that takes over in the kill and stop tests: it notes each key it handled
/// (as member 2) and counts the records it got with a delivery count above 1.
fn taking_member(bootstrap: &str, group: String, topic: String) -> (Member, Seen, Arc<AtomicU32>) {
    let seen: Seen = Arc::default();
    let redelivered = Arc::new(AtomicU32::new(0));
    let (s, r) = (Arc::clone(&seen), Arc::clone(&redelivered));
    let member = spawn(
        QueueConsumer::builder(handler_fn(move |m: Message<String>| {
            let (s, r) = (Arc::clone(&s), Arc::clone(&r));
            async move {
                if m.delivery_count().is_some_and(|c| c > 1) {
                    r.fetch_add(1, Ordering::SeqCst);
                }
                s.lock()
                    .unwrap()
                    .push((2, m.key_str().unwrap_or_default().to_owned()));
                Ok::<(), HandlerError>(())
            }
        }))
        .bootstrap_servers(bootstrap)
        .group_id(group)
        .topic(topic)
        .max_in_flight(8)
        .build()
        .unwrap(),
    );
    (member, seen, redelivered)
}

/// A member process that handled at least 40 of 200 records and was then signalled, and a
/// member in the test that takes the records it held over.
struct Takeover {
    child: std::process::Child,
    out: std::path::PathBuf,
    /// What the member process had handled when it was signalled.
    first: Vec<String>,
    member: Member,
    seen: Seen,
    redelivered: Arc<AtomicU32>,
}

impl Takeover {
    /// Starts a member process on 200 records (with `settings`), sends it `sig` once it has
    /// handled 40, and starts the taking member.
    async fn start(name: &str, settings: &[(&str, &str)], sig: &str) -> Takeover {
        let (bootstrap, topic) = topics(name).await;
        let group = support::unique_name(name);
        produce(bootstrap, &topic, &events(200)).await;
        let out = std::env::temp_dir().join(support::unique_name(&format!("{name}-out")));
        let child = member_process(bootstrap, &topic, &group, &out, settings);
        until(
            Duration::from_secs(30),
            "the member process handled 40 records",
            || handled_by(&out).len() >= 40,
        )
        .await;
        signal(&child, sig);
        let first = handled_by(&out);
        assert!(
            first.len() < 200,
            "signalled while records were left: {}",
            first.len()
        );
        let (member, seen, redelivered) = taking_member(bootstrap, group, topic);
        Takeover {
            child,
            out,
            first,
            member,
            seen,
            redelivered,
        }
    }

    /// Distinct records handled by one member or the other.
    fn handled(&self) -> usize {
        let mut all: std::collections::HashSet<&str> =
            self.first.iter().map(String::as_str).collect();
        let seen = self.seen.lock().unwrap();
        all.extend(seen.iter().map(|(_, k)| k.as_str()));
        all.len()
    }

    /// Records the taking member handled that the member process had handled already.
    fn handled_by_both(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|(_, k)| self.first.contains(k)).count()
    }

    /// Waits (at most `limit`) until all 200 records are handled by one member or the other.
    async fn until_all_handled(&self, limit: Duration, what: &str) {
        until(limit, what, || self.handled() >= 200).await;
    }

    /// Stops the taking member; checks nothing was lost, that records came back with a
    /// delivery count above 1, that at most one fetch of the member process (16: a batch's
    /// ACCEPTs go with the next fetch) was handled by both, and that no acknowledgement failed.
    async fn finish(self) {
        let _ = std::fs::remove_file(&self.out);
        assert_eq!(self.handled(), 200, "nothing lost");
        let both = self.handled_by_both();
        assert!(
            self.redelivered.load(Ordering::SeqCst) >= 1,
            "records the signalled member held came back with a delivery count above 1"
        );
        assert!(
            both <= 16,
            "records handled by both: at most the signalled member's fetch (16), got {both}"
        );
        let report = self.member.stop().await;
        assert_eq!(report.acknowledgement_failures, 0);
    }
}

/// SIGSTOP of a member process holding records: its connection stays open, so the broker
/// gives its records back only when their locks run out (2 s here); the other member
/// handles them, with a delivery count above 1, while the first is frozen. Nothing is lost,
/// and resuming the frozen member (SIGCONT) does not break anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_a_member_loses_nothing() {
    let mut run = Takeover::start("queue-stop", &[("QUEUE_CHILD_LOCK_MS", "2000")], "-STOP").await;
    run.until_all_handled(
        Duration::from_secs(30),
        "all 200 records handled while the first member is frozen",
    )
    .await;
    let frozen_handled = handled_by(&run.out).len();
    signal(&run.child, "-CONT");
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    assert_eq!(
        frozen_handled,
        run.first.len(),
        "the first member handled nothing while frozen"
    );
    run.finish().await;
}

/// kill -9 of a member process holding records: nothing is lost. The broker gives the
/// killed member's records back when its connection closes; the other member handles them,
/// and sees their delivery count above 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_member_loses_nothing() {
    let mut run = Takeover::start("queue-kill", &[], "-KILL").await;
    run.child.wait().unwrap();
    // Within the default 30 s lock: the records come back when the connection closes.
    run.until_all_handled(
        Duration::from_secs(25),
        "all 200 records handled by one member or the other",
    )
    .await;
    run.finish().await;
}

/// Two records of one event (the same dedup key) on two members: the first holds the claim
/// while its handler outlives the lease (3 s handler, 1 s lease: the claim is renewed), the
/// second waits for it (busy), then finds the key done and is ACCEPTed without the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_outliving_its_lease_is_renewed_and_the_copy_waits() {
    let (bootstrap, topic) = topics("queue-claim").await;
    let group = support::unique_name("queue-claim");
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let calls = Arc::new(AtomicU32::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let member = || {
        let (c, o) = (Arc::clone(&calls), Arc::clone(&outcomes));
        QueueConsumer::builder(handler_fn(move |_m: Message<String>| {
            let c = Arc::clone(&c);
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok::<(), HandlerError>(())
            }
        }))
        .bootstrap_servers(bootstrap)
        .group_id(group.clone())
        .topic(topic.clone())
        .max_in_flight(1)
        .idempotency(
            Idempotency::new(
                store.clone(),
                DedupKey::from_fn(|m: &Message<String>| m.key_str().map(str::to_owned)),
            )
            .with_lease(Duration::from_secs(1)),
        )
        .on_outcome(move |_, outcome| o.lock().unwrap().push(outcome))
        .build()
        .unwrap()
    };
    let (a, b) = (spawn(member()), spawn(member()));
    tokio::time::sleep(Duration::from_secs(2)).await; // both join
    let twice = vec![("e-0".to_owned(), "\"one\"".to_owned()); 2];
    produce(bootstrap, &topic, &twice).await;
    until(Duration::from_secs(20), "two outcomes", || {
        outcomes.lock().unwrap().len() >= 2
    })
    .await;
    let (ra, rb) = (a.stop().await, b.stop().await);
    let mut outcomes = outcomes.lock().unwrap().clone();
    outcomes.sort_by_key(|o| o.as_str());
    assert_eq!(
        outcomes,
        vec![RecordOutcome::Duplicate, RecordOutcome::Handled],
        "{ra:?} {rb:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler ran once for the event"
    );
}

/// A member frozen longer than the lock (its handler blocks its runtime's only thread, so
/// nothing renews the lock: as with SIGSTOP or a VM pause) loses the record to the other
/// member, which sees delivery count 2: the duplicate the docs admit. The frozen member's
/// late ACCEPT, sent after the other member's, is answered with success by Kafka 4.4 (the
/// record is archived already), so nothing reports the duplicate: the docs say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_loses_its_record_to_another_member() {
    let (bootstrap, topic) = topics("queue-frozen").await;
    let group = support::unique_name("queue-frozen");
    let frozen_calls = Arc::new(AtomicU32::new(0));
    let a_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (fc, done) = (Arc::clone(&frozen_calls), Arc::clone(&a_done));
    let a = QueueConsumer::builder(handler_fn(move |_m: Message<String>| {
        let (fc, done) = (Arc::clone(&fc), Arc::clone(&done));
        async move {
            if fc.fetch_add(1, Ordering::SeqCst) == 0 {
                // Frozen for 4 locks: member 2 joins meanwhile (its assignment comes with its
                // second heartbeat, 1 s apart here) and takes the record once the lock ran out.
                std::thread::sleep(Duration::from_secs(8));
                done.store(true, Ordering::SeqCst);
            }
            Ok::<(), HandlerError>(())
        }
    }))
    .bootstrap_servers(bootstrap)
    .group_id(group.clone())
    .topic(topic.clone())
    .lock_duration(Duration::from_secs(2))
    .max_in_flight(1)
    .build()
    .unwrap();
    // Member A on a runtime of one thread of its own: its handler freezes it whole.
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let a = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(a.run(async {
                let _ = stopped_a.await;
            }))
    });
    produce(bootstrap, &topic, &events(1)).await;
    until(Duration::from_secs(20), "member 1 took the record", || {
        frozen_calls.load(Ordering::SeqCst) >= 1
    })
    .await;
    let counts_seen = Arc::new(Mutex::new(Vec::new()));
    let cs = Arc::clone(&counts_seen);
    let b = spawn(
        QueueConsumer::builder(handler_fn(move |m: Message<String>| {
            let cs = Arc::clone(&cs);
            async move {
                cs.lock().unwrap().push(m.delivery_count());
                Ok::<(), HandlerError>(())
            }
        }))
        .bootstrap_servers(bootstrap)
        .group_id(group)
        .topic(topic)
        .build()
        .unwrap(),
    );
    until(Duration::from_secs(15), "member 2 got the record", || {
        !counts_seen.lock().unwrap().is_empty()
    })
    .await;
    // Let member 1 wake up and send its late ACCEPT.
    until(Duration::from_secs(15), "member 1 woke up", || {
        frozen_calls.load(Ordering::SeqCst) >= 1 && a_done.load(Ordering::SeqCst)
    })
    .await;
    let _ = stop_a.send(());
    let report_a = tokio::task::spawn_blocking(move || a.join().unwrap())
        .await
        .unwrap()
        .unwrap();
    let report_b = b.stop().await;
    assert_eq!(
        *counts_seen.lock().unwrap(),
        vec![Some(2)],
        "delivered again, count 2"
    );
    assert_eq!(report_b.handled, 1);
    assert_eq!(
        report_a.handled, 1,
        "the frozen handler finished too: {report_a:?}"
    );
    assert_eq!(
        frozen_calls.load(Ordering::SeqCst),
        1,
        "member 1 did not get it again"
    );
}

/// The outage breaker in queue mode: while the downstream is down the breaker opens and the
/// records wait (locked, using no attempt) instead of being dead-lettered after their three
/// attempts; once it is back, a probe closes the breaker and every record is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_holds_records_instead_of_dead_lettering_them() {
    let (bootstrap, topic) = topics("queue-breaker").await;
    let group = support::unique_name("queue-breaker");
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let (d, c, o) = (Arc::clone(&down), Arc::clone(&calls), Arc::clone(&outcomes));
    let member = spawn(
        QueueConsumer::builder(handler_fn(move |_m: Message<String>| {
            let (d, c) = (Arc::clone(&d), Arc::clone(&c));
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    return Err(HandlerError::transient("connection refused"));
                }
                Ok::<(), HandlerError>(())
            }
        }))
        .bootstrap_servers(bootstrap)
        .group_id(group)
        .topic(topic.clone())
        .max_in_flight(4)
        .fetch_size(10)
        .retry_policy(RetryPolicy::fixed(Duration::from_millis(50), 2))
        .breaker(
            kourier::BreakerPolicy::default()
                .with_open_interval(Duration::from_millis(500), Duration::from_secs(1)),
        )
        .on_outcome(move |_, outcome| o.lock().unwrap().push(outcome))
        .build()
        .unwrap(),
    );
    produce(bootstrap, &topic, &events(10)).await;
    until(Duration::from_secs(20), "the downstream called", || {
        calls.load(Ordering::SeqCst) >= 3
    })
    .await;
    // Down for 3 s: without the breaker every record would be dead-lettered by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during_outage = calls.load(Ordering::SeqCst);
    assert!(
        outcomes.lock().unwrap().is_empty(),
        "nothing settled while the downstream was down: {:?}",
        outcomes.lock().unwrap()
    );
    down.store(false, Ordering::SeqCst);
    until(Duration::from_secs(15), "every record handled", || {
        outcomes.lock().unwrap().len() >= 10
    })
    .await;
    let report = member.stop().await;
    assert!(
        outcomes
            .lock()
            .unwrap()
            .iter()
            .all(|o| *o == RecordOutcome::Handled),
        "{:?}",
        outcomes.lock().unwrap()
    );
    assert_eq!((report.handled, report.dead_lettered), (10, 0));
    // A few failed calls opened it, then one probe per open interval (0.5 s, 1 s, ...).
    assert!(during_outage <= 12, "calls while down: {during_outage}");
}

// ─────────────────────────── metrics ───────────────────────────

/// The process-wide test recorder (`metrics-util`'s `DebuggingRecorder`), installed once:
/// the members' records run on the runtime's threads. Other tests of this file record into
/// it too; the metrics test reads only its own group's series.
fn snapshotter() -> &'static metrics_util::debugging::Snapshotter {
    static SNAPSHOTTER: std::sync::OnceLock<metrics_util::debugging::Snapshotter> =
        std::sync::OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("install the test recorder");
        snapshotter
    })
}

/// A metric series of one group: its name and its labels but `group`, sorted.
type Series = (String, Vec<(String, String)>);

/// One snapshot of a group's series: counters, gauges, histogram values.
type GroupMetrics = (
    HashMap<Series, u64>,
    HashMap<Series, f64>,
    HashMap<Series, Vec<f64>>,
);

/// The counters, gauges and histogram values of `group`'s series in one snapshot.
fn group_metrics(group: &str) -> GroupMetrics {
    use metrics_util::debugging::DebugValue;
    let (mut counters, mut gauges, mut histograms) =
        (HashMap::new(), HashMap::new(), HashMap::new());
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let key = key.key();
        if !key
            .labels()
            .any(|l| l.key() == "group" && l.value() == group)
        {
            continue;
        }
        let mut labels: Vec<(String, String)> = key
            .labels()
            .filter(|l| l.key() != "group")
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        labels.sort();
        let series = (key.name().to_owned(), labels);
        match value {
            DebugValue::Counter(n) => {
                counters.insert(series, n);
            }
            DebugValue::Gauge(g) => {
                gauges.insert(series, g.into_inner());
            }
            DebugValue::Histogram(values) => {
                histograms.insert(series, values.into_iter().map(|v| v.into_inner()).collect());
            }
        }
    }
    (counters, gauges, histograms)
}

fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    (name.to_owned(), labels)
}

/// Queue mode records kourier's metrics under the consumer-group engine's names and
/// labels: after a drain of 7 records — 5 handled (one of them after 2 transient
/// failures), 1 permanent failure, 1 poison pill — the counters say exactly that, the
/// handler duration has one value per handler call (8: the poison pill never reaches the
/// handler), and nothing is left in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_drain_did() {
    use kourier::metrics::{self as m, labels};
    snapshotter();
    let (bootstrap, topic) = topics("queue-metrics").await;
    let group = support::unique_name("queue-metrics");
    let ended = Arc::new(AtomicU32::new(0));
    let e = Arc::clone(&ended);
    let consumer = QueueConsumer::builder(handler_fn(|m: Message<String>| async move {
        match m.key_str() {
            Some("e-1") if m.attempt() <= 2 => Err(HandlerError::transient("smtp 451")),
            Some("e-5") => Err(HandlerError::permanent("no such mailbox")),
            _ => Ok(()),
        }
    }))
    .bootstrap_servers(bootstrap)
    .group_id(group.clone())
    .topic(topic.clone())
    .retry_policy(RetryPolicy::fixed(Duration::from_millis(50), 3))
    .on_outcome(move |_, _| {
        e.fetch_add(1, Ordering::SeqCst);
    })
    .build()
    .unwrap();
    let member = spawn(consumer);
    let mut records = events(6);
    records.push(("bad".to_owned(), "not json".to_owned()));
    produce(bootstrap, &topic, &records).await;
    until(Duration::from_secs(30), "seven outcomes", || {
        ended.load(Ordering::SeqCst) >= 7
    })
    .await;
    let report = member.stop().await;
    let (counters, gauges, histograms) = group_metrics(&group);
    let t = topic.as_str();
    let counter = |name: &str, extra: &[(&str, &str)]| {
        let mut l = vec![(labels::TOPIC, t)];
        l.extend_from_slice(extra);
        counters.get(&series(name, &l)).copied().unwrap_or(0)
    };
    let all = format!("{counters:?}");
    assert_eq!(counter(m::RECORDS_CONSUMED, &[]), 7, "{all}");
    assert_eq!(counter(m::RECORDS_HANDLED, &[]), 5, "{all}");
    assert_eq!(
        counter(m::RECORDS_RETRIED, &[(labels::ATTEMPT, "1")]),
        1,
        "{all}"
    );
    assert_eq!(
        counter(m::RECORDS_RETRIED, &[(labels::ATTEMPT, "2")]),
        1,
        "{all}"
    );
    assert_eq!(
        counter(m::RECORDS_DEAD_LETTERED, &[(labels::KIND, "permanent")]),
        1,
        "{all}"
    );
    assert_eq!(
        counter(m::RECORDS_DEAD_LETTERED, &[(labels::KIND, "decode")]),
        1,
        "{all}"
    );
    assert_eq!(counter(m::DUPLICATES_SKIPPED, &[]), 0, "{all}");
    assert_eq!(counter(m::RECORDS_ABANDONED, &[]), 0, "{all}");
    assert_eq!(counter(m::DEAD_LETTER_WRITE_FAILURES, &[]), 0, "{all}");
    let durations = histograms
        .get(&series(m::HANDLER_DURATION, &[(labels::TOPIC, t)]))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        durations.len(),
        8,
        "one value per handler call: {durations:?}"
    );
    assert_eq!(
        gauges.get(&series(m::RECORDS_IN_FLIGHT, &[])).copied(),
        Some(0.0),
        "nothing in flight after the drain: {gauges:?}"
    );
    // Metrics of the consumer-group engine that do not apply are not registered.
    for absent in [
        m::CONSUMER_LAG,
        m::PARTITION_PAUSED,
        m::COMMIT_DURATION,
        m::COMMIT_FAILURES,
        m::CONNECTION_STATE,
        m::RECORDS_STALLED,
        m::FORWARD_FAILURES,
    ] {
        assert!(
            !counters
                .keys()
                .chain(gauges.keys())
                .chain(histograms.keys())
                .any(|(n, _)| n == absent),
            "{absent} is not a queue-mode metric"
        );
    }
    assert_eq!((report.handled, report.dead_lettered), (5, 2));
}

// ─────────────────────────── delivery limit ───────────────────────────

/// A handler that never finishes (it counts the records it started).
struct NeverDone(Arc<AtomicU32>);

#[kourier::async_trait]
impl kourier::Handler for NeverDone {
    type Event = String;

    async fn handle(&self, _m: &Message<String>) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(120)).await;
        Ok(())
    }
}

/// A member whose handler never finishes: the record it gets is abandoned at its stop
/// (after a 200 ms shutdown timeout) and RELEASEd, one delivery used. Returns its report
/// once its handler saw a record and it stopped.
async fn deliver_and_abandon(
    bootstrap: &str,
    topic: &str,
    group: &str,
    configure: impl FnOnce(
        kourier::queue::QueueConsumerBuilder<NeverDone>,
    ) -> kourier::queue::QueueConsumerBuilder<NeverDone>,
) -> QueueReport {
    let started = Arc::new(AtomicU32::new(0));
    let builder = QueueConsumer::builder(NeverDone(Arc::clone(&started)))
        .bootstrap_servers(bootstrap)
        .group_id(group)
        .topic(topic)
        .shutdown_timeout(Duration::from_millis(200));
    let member = spawn(configure(builder).build().unwrap());
    until(Duration::from_secs(20), "the record delivered", || {
        started.load(Ordering::SeqCst) >= 1
    })
    .await;
    member.stop().await
}

/// `delivery_limit(n)` sets the group's `share.delivery.count.limit`: a record abandoned
/// (RELEASEd at a stop) twice under a limit of 2 is archived by the broker and never
/// delivered again (under the default 5 it would be); a limit outside the broker's
/// `group.share.min/max.delivery.count.limit` (2..=10) is a `QueueError::DeliveryLimit`
/// naming the value and the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_limit_is_set_on_the_group_and_checked_against_the_broker() {
    let (bootstrap, topic) = topics("queue-limit").await;
    let group = support::unique_name("queue-limit");
    for limit in [1, 11] {
        let refused = QueueConsumer::builder(handler_fn(|_m: Message<String>| async {
            Ok::<(), HandlerError>(())
        }))
        .bootstrap_servers(bootstrap)
        .group_id(group.clone())
        .topic(topic.clone())
        .delivery_limit(limit)
        .build()
        .unwrap()
        .run(std::future::pending())
        .await;
        match refused {
            Err(e @ QueueError::DeliveryLimit { .. }) => {
                let QueueError::DeliveryLimit {
                    requested,
                    min,
                    max,
                } = e
                else {
                    unreachable!()
                };
                assert_eq!((requested, min, max), (limit, 2, 10));
                assert!(
                    e.to_string().contains(&format!("{limit}")) && e.to_string().contains("2..=10"),
                    "{e}"
                );
            }
            other => panic!("expected QueueError::DeliveryLimit for {limit}, got {other:?}"),
        }
    }

    produce(bootstrap, &topic, &events(1)).await;
    for _ in 0..2 {
        let report = deliver_and_abandon(bootstrap, &topic, &group, |b| b.delivery_limit(2)).await;
        assert_eq!(report.abandoned, 1, "{report:?}");
    }
    // A third member: it gets a record produced now, and never the archived one.
    let seen: Seen = Arc::default();
    let member = spawn(
        QueueConsumer::builder(recording(3, &seen, Duration::ZERO))
            .bootstrap_servers(bootstrap)
            .group_id(group.clone())
            .topic(topic.clone())
            .build()
            .unwrap(),
    );
    produce(
        bootstrap,
        &topic,
        &[("probe".to_owned(), "\"probe\"".to_owned())],
    )
    .await;
    until(Duration::from_secs(20), "the probe handled", || {
        counts(&seen).contains_key("probe")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    member.stop().await;
    assert_eq!(
        counts(&seen).get("e-0"),
        None,
        "the record delivered twice was archived at the limit of 2: {:?}",
        seen.lock().unwrap()
    );
}

// ─────────────────────────── the broker's dead-letter queue ───────────────────────────

/// `broker_dead_letter_queue(topic)` (KIP-1191): the startup checks refuse a name without
/// the broker's `dlq.` prefix, a topic that has not opted in
/// (`errors.deadletterqueue.group.enable`) and a missing one, each naming the topic; with
/// `create_missing_topics(true)` the topic is created opted in, and a record abandoned
/// (RELEASEd at a stop) as many times as the delivery limit (2) is written there by the
/// broker, with its `__dlq.errors.*` headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_dead_letter_queue_takes_a_record_past_the_delivery_limit() {
    let (bootstrap, topic) = topics("queue-bdlq").await;
    let group = support::unique_name("queue-bdlq");
    let startup = |dlq: String, create: bool| {
        let (topic, group) = (topic.clone(), group.clone());
        async move {
            let run = QueueConsumer::builder(handler_fn(|_m: Message<String>| async {
                Ok::<(), HandlerError>(())
            }))
            .bootstrap_servers(bootstrap)
            .group_id(group)
            .topic(topic)
            .broker_dead_letter_queue(dlq)
            .create_missing_topics(create)
            .build()
            .unwrap()
            .run(std::future::pending());
            tokio::time::timeout(Duration::from_secs(30), run)
                .await
                .expect("the startup checks answer within 30 s")
        }
    };

    let unprefixed = format!("{topic}.broker-dlq");
    match startup(unprefixed.clone(), true).await {
        Err(QueueError::BrokerDeadLetterQueue { topic, setting, .. }) => {
            assert_eq!(
                (topic.as_str(), setting),
                (
                    unprefixed.as_str(),
                    "errors.deadletterqueue.topic.name.prefix"
                )
            );
        }
        other => panic!("expected QueueError::BrokerDeadLetterQueue, got {other:?}"),
    }

    let not_opted_in = format!("dlq.{topic}.a");
    support::create_topic_via(&config(bootstrap), &not_opted_in, 1, &[]).await;
    match startup(not_opted_in.clone(), false).await {
        Err(e @ QueueError::BrokerDeadLetterQueue { .. }) => {
            let message = e.to_string();
            let QueueError::BrokerDeadLetterQueue { topic, setting, .. } = e else {
                unreachable!()
            };
            assert_eq!(
                (topic.as_str(), setting),
                (not_opted_in.as_str(), "errors.deadletterqueue.group.enable")
            );
            assert!(message.contains(&not_opted_in), "{message}");
        }
        other => panic!("expected QueueError::BrokerDeadLetterQueue, got {other:?}"),
    }

    // `create_missing_topics(true)` opts the existing topic in: the member starts.
    let member = spawn(
        QueueConsumer::builder(recording(1, &Seen::default(), Duration::ZERO))
            .bootstrap_servers(bootstrap)
            .group_id(support::unique_name("queue-bdlq-opt-in"))
            .topic(topic.clone())
            .broker_dead_letter_queue(not_opted_in.clone())
            .create_missing_topics(true)
            .build()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    member.stop().await;
    assert_eq!(
        dlq_opt_in(bootstrap, &not_opted_in).await.as_deref(),
        Some("true"),
        "create_missing_topics(true) set {not_opted_in}'s errors.deadletterqueue.group.enable"
    );

    let dlq = format!("dlq.{topic}.b");
    match startup(dlq.clone(), false).await {
        Err(QueueError::MissingTopics { topics }) => assert_eq!(topics, vec![dlq.clone()]),
        other => panic!("expected QueueError::MissingTopics, got {other:?}"),
    }

    produce(bootstrap, &topic, &events(1)).await;
    for _ in 0..2 {
        let report = deliver_and_abandon(bootstrap, &topic, &group, |b| {
            b.delivery_limit(2)
                .broker_dead_letter_queue(dlq.clone())
                .create_missing_topics(true)
        })
        .await;
        assert_eq!(report.abandoned, 1, "{report:?}");
        // Created opted in by the first member (the second would opt it in anyway).
        assert_eq!(
            dlq_opt_in(bootstrap, &dlq).await.as_deref(),
            Some("true"),
            "created opted in"
        );
    }
    let letters = read_letters(bootstrap, &dlq, Duration::from_secs(5)).await;
    assert_eq!(letters.len(), 1, "one letter from the broker: {letters:?}");
    let (key, h) = &letters[0];
    assert_eq!(key, "e-0", "a copy of the record: {h:?}");
    assert_eq!(text(h, "__dlq.errors.topic"), topic, "{h:?}");
    assert_eq!(text(h, "__dlq.errors.group"), group, "{h:?}");
    assert_eq!(text(h, "__dlq.errors.delivery.count"), "2", "{h:?}");
    assert_eq!(text(h, "__dlq.errors.offset"), "0", "{h:?}");
}

/// The topic's `errors.deadletterqueue.group.enable`, as the broker describes it.
async fn dlq_opt_in(bootstrap: &str, topic: &str) -> Option<String> {
    support::topic_config_via(
        &config(bootstrap),
        topic,
        "errors.deadletterqueue.group.enable",
    )
    .await
}

/// kill -9 of the member holding a record, as many times as the delivery limit (2): the
/// broker gives the record back at each kill (the connection closed), then, at the limit,
/// writes it to the broker's dead-letter queue topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_at_each_delivery_sends_the_record_to_the_broker_dlq() {
    let (bootstrap, topic) = topics("queue-bdlq-kill").await;
    let group = support::unique_name("queue-bdlq-kill");
    let dlq = format!("dlq.{topic}");
    produce(bootstrap, &topic, &events(1)).await;
    for delivery in 1..=2 {
        let out = std::env::temp_dir().join(support::unique_name("queue-bdlq-kill-out"));
        let mut child = member_process(
            bootstrap,
            &topic,
            &group,
            &out,
            &[
                ("QUEUE_CHILD_HANG", "1"),
                ("QUEUE_CHILD_LIMIT", "2"),
                ("QUEUE_CHILD_DLQ", &dlq),
            ],
        );
        until(
            Duration::from_secs(30),
            &format!("delivery {delivery} started in the member process"),
            || handled_by(&out).iter().any(|l| l == "e-0"),
        )
        .await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let _ = std::fs::remove_file(&out);
    }
    let letters = read_letters(bootstrap, &dlq, Duration::from_secs(5)).await;
    assert_eq!(letters.len(), 1, "one letter from the broker: {letters:?}");
    let (key, h) = &letters[0];
    assert_eq!(key, "e-0", "{h:?}");
    assert_eq!(text(h, "__dlq.errors.delivery.count"), "2", "{h:?}");
    assert_eq!(text(h, "__dlq.errors.topic"), topic, "{h:?}");
}
