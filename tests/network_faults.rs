//! Network faults between the consumer and the broker: a TCP proxy of our own
//! (tests/support/proxy.rs) adds latency, cuts every connection and refuses connections for a
//! few seconds while a [`RetryingConsumer`] works through a topic. Nothing may be lost and the
//! committed offsets must reach the end.
//!
//! Kafka clients reconnect to the address the broker *advertises*, so a proxy on another port
//! would be bypassed after bootstrap. This test therefore starts a broker of its own (the jars
//! `scripts/services up` fetched, Java 17) that listens on a private port and advertises the
//! proxy's address: every connection of every client — the consumer, its dead-letter
//! producer, the test's own clients — goes through the proxy. The shared test broker is not
//! touched.
//!
//! [`RetryingConsumer`]: kourier::RetryingConsumer

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::rdkafka::config::ClientConfig;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::error::KafkaError;
use kourier::rdkafka::message::Message as _;
use kourier::rdkafka::producer::{FutureProducer, FutureRecord};
use kourier::rdkafka::{Offset, TopicPartitionList};
use kourier::{
    Handler, HandlerError, Message, ProcessingOrder, RetryPolicy, RetryingConsumer, async_trait,
};
use serde::{Deserialize, Serialize};
use support::consumer::Running;
use support::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// The proxy itself, without Kafka

#[tokio::test]
async fn proxy_forwards_delays_cuts_and_refuses() {
    // An echo server upstream.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = echo.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream).await;

    let mut c = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0u8; 5];
    c.write_all(b"hello").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");

    proxy.set_latency(Duration::from_millis(100));
    let started = Instant::now();
    c.write_all(b"again").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "100 ms each way: {:?}",
        started.elapsed()
    );
    proxy.set_latency(Duration::ZERO);

    assert_eq!(proxy.cut_all(), 1);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a cut connection ends: {read:?}"
    );

    proxy.set_refusing(true);
    let mut refused = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "refused: {read:?}");
    assert_eq!(proxy.refused(), 1);
    proxy.set_refusing(false);
    let mut c = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"back!").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"back!");
    assert_eq!(proxy.accepted(), 2);
    assert!(proxy.bytes() >= 30);
}

// ---------------------------------------------------------------------------------------------
// A broker behind the proxy

/// A single-node KRaft broker of this test's own, advertising the proxy's address; killed and
/// deleted on drop.
struct Broker {
    child: Child,
    dir: PathBuf,
}

impl Broker {
    /// Starts a broker listening on `listen_port` (and a controller port) that advertises
    /// `advertised`. Blocks until the process runs; see [`wait_ready`].
    fn start(listen_port: u16, controller_port: u16, advertised: SocketAddr) -> Broker {
        let support::own_broker::Prepared {
            dir,
            props,
            classpath,
            log4j,
        } = support::own_broker::prepare(
            "netfault",
            listen_port,
            controller_port,
            &advertised.to_string(),
            "offsets.topic.num.partitions=3\n",
        );
        let log = std::fs::File::create(dir.join("kafka.log")).expect("broker log");
        let child = Command::new("java")
            .args([
                "-Xmx384m",
                "-Xms128m",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
            ])
            .arg(&log4j)
            .args(["-cp", &classpath, "kafka.Kafka"])
            .arg(&props)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the broker");
        Broker { child, dir }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("kafka.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        // Come back quickly after a cut.
        .set("reconnect.backoff.max.ms", "1000");
    c
}

async fn wait_ready(bootstrap: &str, broker: &mut Broker) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if support::own_broker::answers(bootstrap, config).await {
            return;
        }
        if let Ok(Some(status)) = broker.child.try_wait() {
            panic!("the test broker exited ({status}):\n{}", broker.log_tail());
        }
        assert!(
            Instant::now() < deadline,
            "the test broker did not answer within 90 s:\n{}",
            broker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn produce(bootstrap: &str, topic: &str, events: &[Ev]) {
    let producer: FutureProducer = config(bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .create()
        .unwrap();
    let mut pending = Vec::new();
    for ev in events {
        let value = serde_json::to_vec(ev).unwrap();
        let record = FutureRecord::to(topic).key(&ev.key).payload(&value);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for (i, d) in pending.into_iter().enumerate() {
        d.await
            .unwrap()
            .unwrap_or_else(|(e, _)| panic!("event {i} not delivered: {e}"));
    }
}

/// High watermarks of partitions `0..partitions`.
async fn log_end(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let (servers, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config(&servers).create().unwrap();
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .collect()
    })
    .await
    .unwrap()
}

/// The group's committed offsets (0 where none), or `None` when the broker does not answer.
async fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Option<Vec<i64>> {
    let (servers, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config(&servers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let offsets = {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_range(&topic, 0, partitions - 1);
            let c = consumer
                .committed_offsets(tpl, Duration::from_secs(5))
                .ok()?;
            let mut out = vec![0; partitions as usize];
            for e in c.elements_for_topic(&topic) {
                if let Offset::Offset(o) = e.offset() {
                    out[e.partition() as usize] = o;
                }
            }
            out
        };
        drop(consumer);
        Some(offsets)
    })
    .await
    .unwrap()
}

/// The ids in the dead-letter topic, one entry per letter.
async fn dead_lettered(bootstrap: &str, topic: &str, partitions: i32) -> Vec<u64> {
    let (servers, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config(&servers)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut pending = BTreeMap::new();
        {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .unwrap();
                if low < high {
                    tpl.add_partition_offset(&topic, p, Offset::Offset(low))
                        .unwrap();
                    pending.insert(p, high);
                }
            }
            if pending.is_empty() {
                return Vec::new();
            }
            consumer.assign(&tpl).unwrap();
        }
        let mut ids = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "reading {topic}: {pending:?} left"
            );
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let end = pending.get(&m.partition()).copied();
                    if let Some(ev) = m
                        .payload()
                        .and_then(|v| serde_json::from_slice::<Ev>(v).ok())
                    {
                        ids.push(ev.id);
                    }
                    if end.is_some_and(|end| m.offset() + 1 >= end) {
                        pending.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        ids
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The consumer under network faults

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ev {
    id: u64,
    key: String,
}

fn is_permanent(id: u64) -> bool {
    id % 97 == 5
}

fn fails_once(id: u64) -> bool {
    id % 31 == 3
}

#[derive(Clone, Default)]
struct Recorder {
    handled: Arc<Mutex<Vec<u64>>>,
}

#[async_trait]
impl Handler for Recorder {
    type Event = Ev;
    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        let id = m.event().id;
        if is_permanent(id) {
            return Err(HandlerError::permanent(format!("event {id} is bad")));
        }
        if fails_once(id) && m.attempt() == 1 {
            return Err(HandlerError::transient(format!("event {id} fails once")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.handled.lock().unwrap().push(id);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_cuts_and_refused_connections_lose_nothing() {
    const EVENTS: u64 = 12_000;
    const PARTITIONS: i32 = 6;
    let listen_port = free_port();
    let controller_port = free_port();
    let proxy = Arc::new(
        Proxy::start(
            "127.0.0.1:0".parse().unwrap(),
            SocketAddr::from(([127, 0, 0, 1], listen_port)),
        )
        .await,
    );
    let advertised = proxy.addr();
    let bootstrap = advertised.to_string();
    let mut broker = tokio::task::spawn_blocking(move || {
        Broker::start(listen_port, controller_port, advertised)
    })
    .await
    .unwrap();
    wait_ready(&bootstrap, &mut broker).await;

    let topic = support::unique_name("netfault");
    let dlt_topic = format!("{topic}.dlt");
    let group = support::unique_name("netfault-g");
    for name in [&topic, &dlt_topic] {
        support::create_topic_via(&config(&bootstrap), name, PARTITIONS, &[]).await;
    }
    let events: Vec<Ev> = (0..EVENTS)
        .map(|id| Ev {
            id,
            key: format!("k{}", id % 50),
        })
        .collect();
    produce(&bootstrap, &topic, &events).await;
    let end = log_end(&bootstrap, &topic, PARTITIONS).await;
    assert_eq!(end.iter().sum::<i64>(), EVENTS as i64);
    let accepted_before = proxy.accepted();

    let recorder = Recorder::default();
    let consumer = Running::start(
        RetryingConsumer::builder(recorder.clone())
            .bootstrap_servers(&bootstrap)
            .group_id(&group)
            .topic(&topic)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(16)
            .retry_policy(RetryPolicy::fixed(Duration::from_millis(50), 2))
            .commit_interval(Duration::from_millis(200))
            .kafka_config("session.timeout.ms", "6000")
            .kafka_config("heartbeat.interval.ms", "500")
            .kafka_config("reconnect.backoff.max.ms", "1000"),
    );
    let handled = || recorder.handled.lock().unwrap().len() as u64;

    // The faults, while records flow.
    let deadline = Instant::now() + Duration::from_secs(60);
    while handled() < EVENTS / 20 {
        assert!(Instant::now() < deadline, "the consumer did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cut = 0;
    let mut log = Vec::new();
    let mut note = |what: &str| log.push(format!("{what} at {} handled", handled()));
    proxy.set_latency(Duration::from_millis(100));
    note("latency 100 ms");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cut += proxy.cut_all();
    note("cut");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_latency(Duration::ZERO);
    cut += proxy.cut_all();
    note("cut, latency off");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Down for 4 s: shorter than the session timeout (6 s), so the group may survive it.
    proxy.set_refusing(true);
    cut += proxy.cut_all();
    note("down");
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set_refusing(false);
    note("up");
    proxy.set_latency(Duration::from_millis(30));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cut += proxy.cut_all();
        note("cut under 30 ms latency");
    }
    proxy.set_latency(Duration::ZERO);
    note("faults over");
    assert!(
        handled() < EVENTS,
        "the faults should meet a busy consumer: {log:?}"
    );

    // Then everything settles: handled or dead-lettered, and committed to the end.
    let permanent: BTreeSet<u64> = (0..EVENTS).filter(|&id| is_permanent(id)).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        consumer.assert_alive();
        let ids: BTreeSet<u64> = recorder.handled.lock().unwrap().iter().copied().collect();
        let commits = committed(&bootstrap, &group, &topic, PARTITIONS).await;
        if ids.len() as u64 + permanent.len() as u64 == EVENTS && commits.as_ref() == Some(&end) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled within 120 s after the faults: {} handled, commits {commits:?} of {end:?}; {log:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.stop().await;

    let handled_ids = recorder.handled.lock().unwrap().clone();
    let distinct: BTreeSet<u64> = handled_ids.iter().copied().collect();
    let letters = dead_lettered(&bootstrap, &dlt_topic, PARTITIONS).await;
    let lettered: BTreeSet<u64> = letters.iter().copied().collect();
    let lost: Vec<u64> = (0..EVENTS)
        .filter(|id| !distinct.contains(id) && !lettered.contains(id))
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(
        lettered, permanent,
        "exactly the permanent failures are dead-lettered"
    );
    assert!(
        distinct.is_disjoint(&permanent),
        "a permanent failure never succeeds"
    );
    assert_eq!(
        committed(&bootstrap, &group, &topic, PARTITIONS).await,
        Some(end.clone()),
        "committed offsets at the log end after shutdown"
    );
    assert!(cut > 0, "the cuts met open connections");
    assert!(
        proxy.refused() > 0,
        "clients tried to connect while it was down"
    );
    assert!(
        proxy.accepted() > accepted_before + 2,
        "clients reconnected through the proxy after the cuts"
    );
    eprintln!(
        "network faults: {log:?}; {cut} connections cut, {} refused, {} accepted; \
         {} handled ({} repeats), {} dead letters ({} repeats)",
        proxy.refused(),
        proxy.accepted(),
        distinct.len(),
        handled_ids.len() - distinct.len(),
        lettered.len(),
        letters.len() - lettered.len()
    );

    // An outage longer than `max_broker_outage` ends `run()` with a typed error (delivery rule
    // 13): the same broker, now refused by the proxy for good.
    let outage_group = support::unique_name("netfault-outage");
    let consumer = RetryingConsumer::builder(Recorder::default())
        .bootstrap_servers(&bootstrap)
        .group_id(&outage_group)
        .topic(&topic)
        .max_broker_outage(Duration::from_secs(3))
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500")
        .kafka_config("reconnect.backoff.max.ms", "1000")
        .build()
        .expect("build");
    let monitor = consumer.monitor();
    let run = tokio::spawn(consumer.run(std::future::pending::<()>()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while monitor.snapshot().assigned.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the outage consumer got no partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        monitor.snapshot().connection,
        kourier::ConnectionState::Connected
    );
    // Its health probes over HTTP: ready while connected; once the broker is gone, not
    // ready with the reason, and not alive once `run()` gave up (delivery rule 13).
    let probes = kourier::health::serve("127.0.0.1:0", monitor.clone())
        .await
        .expect("health server");
    let readyz = format!("http://{}/readyz", probes.local_addr());
    let livez = format!("http://{}/livez", probes.local_addr());
    let probe = |url: String| async move {
        let answer = reqwest::get(&url).await.expect("probe answered");
        (
            answer.status().as_u16(),
            answer.text().await.expect("probe body"),
        )
    };
    let healthy = probe(readyz.clone()).await;
    assert_eq!(healthy.0, 200, "ready while connected: {healthy:?}");
    proxy.set_refusing(true);
    proxy.cut_all();
    let cut_at = Instant::now();
    let broker_down = loop {
        let answer = probe(readyz.clone()).await;
        if answer.0 == 503 {
            break answer;
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(3),
            "/readyz still {answer:?} 3 s after the broker went away"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        broker_down.1.contains("unreachable"),
        "/readyz names the lost broker: {broker_down:?}"
    );
    eprintln!("health, broker down mid-run: /readyz {broker_down:?}");
    // Until run() gives up, the consumer never counts as connected again: records that
    // librdkafka fetched before the cut are handed over meanwhile, and they are no sign of a
    // connection (they made `/readyz` flap back to ready, and once failed CI here).
    let mut run = run;
    let (ended, connected_again) = tokio::time::timeout(Duration::from_secs(60), async {
        let mut connected_again = 0u32;
        loop {
            tokio::select! {
                ended = &mut run => return (ended, connected_again),
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if monitor.snapshot().connection == kourier::ConnectionState::Connected {
                        connected_again += 1;
                    }
                }
            }
        }
    })
    .await
    .expect("run() did not return within 60 s of the outage");
    let ended = ended.expect("consumer task panicked");
    assert_eq!(
        connected_again, 0,
        "samples (every 20 ms) that saw the consumer connected again while the broker was refused"
    );
    let took = cut_at.elapsed();
    let err = ended.expect_err("an outage past max_broker_outage is an error");
    assert!(err.is_brokers_unreachable(), "{err}");
    assert_eq!(
        monitor.snapshot().connection,
        kourier::ConnectionState::Disconnected
    );
    let dead = probe(livez).await;
    assert_eq!(dead.0, 503, "not alive once run() gave up: {dead:?}");
    eprintln!("health, after max_broker_outage: /livez {dead:?}");
    probes.shutdown().await;
    proxy.set_refusing(false);
    eprintln!("max_broker_outage(3s): run() returned {took:?} after the cut: {err}");
}
