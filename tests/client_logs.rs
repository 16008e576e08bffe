//! Issue 23: every librdkafka client kourier creates logs through the throttle (rule 13 in
//! the crate docs: a condition that persists is logged once per interval with a count, never
//! at every reconnect). Each client talks to a dead broker (`127.0.0.1:1`: nothing listens on
//! port 1) for a few seconds while a global `tracing` layer records every WARN/ERROR event
//! that came from librdkafka (its log lines and error callbacks).
//!
//! Needs no services. Run with `--nocapture` to see the lines of each client.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kourier::topics::TopicAdmin;
use kourier::{
    Error, HandlerError, KafkaDeadLetterSink, Message, Publisher, RetryingConsumer, handler_fn,
    tiers::RetryTiers,
};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

const DEAD: &str = "127.0.0.1:1";
/// How long each client talks to the dead broker.
const TALK: Duration = Duration::from_secs(4);

/// A WARN/ERROR event: its target and its message (with its `error` field, if any).
#[derive(Debug, Clone)]
struct Line {
    target: String,
    text: String,
}

/// Everything logged at WARN and above by this test binary.
fn lines() -> &'static Arc<Mutex<Vec<Line>>> {
    static LINES: OnceLock<Arc<Mutex<Vec<Line>>>> = OnceLock::new();
    LINES.get_or_init(|| {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Record(lines.clone()));
        tracing::subscriber::set_global_default(subscriber).expect("install the log capture");
        lines
    })
}

struct Record(Arc<Mutex<Vec<Line>>>);

impl<S: Subscriber> Layer<S> for Record {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() > Level::WARN {
            return;
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        self.0.lock().unwrap().push(Line {
            target: event.metadata().target().to_owned(),
            text: text.0,
        });
    }
}

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if matches!(field.name(), "message" | "error") {
            if !self.0.is_empty() {
                self.0.push_str(" | ");
            }
            self.0.push_str(&format!("{value:?}"));
        }
    }
}

/// A line that came from librdkafka: a log line (target `librdkafka`), or an error callback
/// (rdkafka's default context logs them under `rdkafka::client`, kourier's context as
/// "kafka client error").
fn from_librdkafka(l: &Line) -> bool {
    l.target == "librdkafka"
        || l.target.starts_with("rdkafka")
        || l.text.starts_with("kafka client error")
}

/// The librdkafka lines logged while `talk` ran (and a moment after, while its clients
/// closed).
async fn librdkafka_lines<F: std::future::Future<Output = ()>>(talk: F) -> Vec<Line> {
    let mark = lines().lock().unwrap().len();
    talk.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lines().lock().unwrap()[mark..]
        .iter()
        .filter(|l| from_librdkafka(l))
        .cloned()
        .collect()
}

/// How many times each distinct line was logged (numbers, which vary between repeats, left
/// out).
fn repeats(lines: &[Line]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for l in lines {
        let key: String = l.text.chars().filter(|c| !c.is_ascii_digit()).collect();
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// Prints the lines of `client` and how many times each distinct one was logged; returns
/// the most repeated count and the total.
fn report(client: &str, lines: &[Line]) -> (usize, usize) {
    let counts = repeats(lines);
    eprintln!(
        "{client}: {} librdkafka WARN/ERROR lines, {} distinct:",
        lines.len(),
        counts.len()
    );
    for (line, n) in &counts {
        eprintln!("  {n} × {line}");
    }
    (counts.values().copied().max().unwrap_or(0), lines.len())
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Event1 {
    id: u32,
}

/// One test, the clients one after the other, so that each phase counts only its own lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_kourier_creates_logs_librdkafka_through_the_throttle() {
    lines();

    // The Publisher's producer, sending to a dead broker.
    let publisher = librdkafka_lines(async {
        let publisher = Publisher::<Event1>::builder(DEAD, "nowhere")
            .send_timeout(TALK)
            .build()
            .expect("build does not connect");
        let started = Instant::now();
        let err = publisher
            .send(&Event1 { id: 1 })
            .await
            .expect_err("nothing answers");
        assert!(started.elapsed() < TALK + Duration::from_secs(6), "{err}");
    })
    .await;

    // TopicAdmin's admin clients, asking a dead broker for metadata until the timeout. (With
    // rdkafka 0.39 an admin client's log lines and errors wait in its main queue, which
    // nothing polls: it logs nothing, throttled or not. Kept so that a later rdkafka that
    // delivers them is held to the same bound.)
    let admin = librdkafka_lines(async {
        let err = TopicAdmin::new(DEAD)
            .timeout(TALK)
            .missing(&["nowhere"])
            .await
            .expect_err("nothing answers");
        assert!(err.is_brokers_unreachable(), "{err:?}");
    })
    .await;

    // A dead-letter sink built on its own (its producer connects when built).
    let sink = librdkafka_lines(async {
        let sink = KafkaDeadLetterSink::builder(DEAD).build().expect("build");
        tokio::time::sleep(TALK).await;
        drop(sink);
    })
    .await;

    // A consumer with retry tiers: its own client, its dead-letter and retry-tier producers,
    // until the startup timeout.
    let consumer = librdkafka_lines(async {
        let handler = handler_fn(|_m: Message<Event1>| async { Ok::<(), HandlerError>(()) });
        let consumer = RetryingConsumer::builder(handler)
            .bootstrap_servers(DEAD)
            .group_id("client-logs")
            .topic("nowhere")
            .retry_tiers(RetryTiers::new([Duration::from_secs(1)]))
            .startup_timeout(TALK)
            .build()
            .expect("build");
        let err = tokio::time::timeout(
            TALK + Duration::from_secs(10),
            consumer.run(std::future::pending()),
        )
        .await
        .expect("run() returns after the startup timeout")
        .expect_err("nothing answers");
        assert!(matches!(err, Error::BrokersUnreachable { .. }), "{err:?}");
    })
    .await;

    // Each client has its own throttle and the interval (30 s) is longer than the talk: each
    // distinct line once per client. The consumer phase has three clients (its own, the
    // dead-letter and the retry-tier producers).
    let mut failures = Vec::new();
    for (client, lines, clients) in [
        ("publisher", &publisher, 1),
        ("topic admin", &admin, 1),
        ("dead-letter sink", &sink, 1),
        ("consumer with retry tiers", &consumer, 3),
    ] {
        let (worst, total) = report(client, lines);
        if worst > clients || total > 6 * clients {
            failures.push(format!(
                "{client}: a distinct line logged {worst} times, {total} lines in all"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "librdkafka lines are logged once per interval per client, not at every reconnect: \
         {failures:#?}"
    );
}
