//! The `mail_notifier` example's ops endpoint (`--metrics-addr`): `/metrics`, `/livez`,
//! `/readyz` and `/status` (kourier's health routes) and the example's index at `/` on one
//! HTTP server, checked over real TCP while the notifier runs against the
//! real broker, Redis and the example's SMTP server. The example's modules are compiled in here
//! (`tests/mail_notifier_example/modules.rs`), as in `tests/mail_notifier.rs`; this file has
//! its own test binary because it installs the process-wide metrics recorder.
//!
//! Needs Kafka and Redis (`scripts/services up`) for the first test; the second needs nothing.

mod support;

include!("mail_notifier_example/modules.rs");

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::mailer::{Journal, Mailer};
use crate::notifier::Settings;
use crate::ops_server::{OpsServer, Probes};
use crate::smtp_server::SmtpServer;
use crate::support::{bootstrap, redis_url, require_kafka, require_redis, unique_name};

const PARTITIONS: i32 = 3;

/// An answer: status code, headers (lowercase names) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Sends `raw` on a new connection and reads the answer until the server closes it.
async fn request(addr: SocketAddr, raw: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    stream.write_all(raw.as_bytes()).await.expect("sends");
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut bytes))
        .await
        .unwrap_or_else(|_| panic!("no answer within 3 s to {raw:?}"))
        .expect("reads the answer");
    let text = String::from_utf8(bytes).expect("the answer is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {head}"));
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    request(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: kube-probe/1.30\r\nConnection: close\r\n\r\n"
        ),
    )
    .await
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `within` with `what`.
async fn eventually<T, F: Future<Output = Result<T, String>>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The value of the series `name{...}` whose labels include each of `labels`, if rendered.
fn series_value(metrics: &str, name: &str, labels: &[String]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|l| line.contains(l.as_str())))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_follow_the_notifier_on_one_address() {
    require_kafka().await;
    require_redis().await;
    let settings = Settings {
        bootstrap: bootstrap(),
        redis_url: redis_url(),
        topic: unique_name("mail-notifier-health"),
        group: unique_name("mail-notifier-health"),
        partitions: PARTITIONS,
        retry_tiers: Vec::new(),
    };
    let (topic_label, group_label) = (
        format!("topic=\"{}\"", settings.topic),
        format!("group=\"{}\"", settings.group),
    );

    // As `mail_notifier --metrics-addr 127.0.0.1:0 run` starts: the server first.
    let metrics = ops_server::install_prometheus().expect("installs the recorder");
    let probes = Probes::default();
    let server = OpsServer::start(([127, 0, 0, 1], 0).into(), metrics, probes.clone())
        .await
        .expect("listens");
    let addr = server.addr();

    // Starting: alive, not ready.
    let live = get(addr, "/livez").await;
    assert_eq!(
        (live.status, live.body.as_str()),
        (200, "{\"live\":true,\"reasons\":[]}\n")
    );
    let ready = get(addr, "/readyz").await;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (
            503,
            "{\"ready\":false,\"reasons\":[\"consumer starting: not built yet\"]}\n"
        )
    );
    assert!(
        ready.head.contains("content-type: application/json"),
        "{ready:?}"
    );
    let index = get(addr, "/").await;
    assert_eq!(index.status, 200, "{index:?}");
    assert!(index.body.contains("/status"), "{index:?}");

    notifier::ensure_topics(&settings)
        .await
        .expect("creates the topics");
    let outbox = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name("outbox"));
    let smtp = SmtpServer::start("127.0.0.1:0", &outbox).expect("starts the SMTP server");
    let mailer = Mailer::plaintext("127.0.0.1", smtp.addr().port(), Journal::default());
    let consumer = notifier::consumer(&settings, mailer)
        .await
        .expect("builds the consumer");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(probes.clone().run(consumer, async {
        let _ = stop_rx.await;
    }));

    // Ready once it reaches the cluster and has its partitions.
    let ready = eventually(Duration::from_secs(60), "/readyz answers 200", || async {
        let a = get(addr, "/readyz").await;
        if a.status == 200 {
            Ok(a)
        } else {
            Err(format!("{} {}", a.status, a.body))
        }
    })
    .await;
    assert_eq!(ready.body, "{\"ready\":true,\"reasons\":[]}\n");
    let status: serde_json::Value =
        serde_json::from_str(&get(addr, "/status").await.body).expect("JSON");
    assert_eq!(status["consumer"]["connection"], "connected", "{status}");
    assert_eq!(
        status["consumer"]["assigned"].as_array().map(Vec::len),
        Some(PARTITIONS as usize),
        "{status}"
    );
    let live = get(addr, "/livez").await;
    assert_eq!(live.status, 200, "{live:?}");

    // A client that opens a connection and never finishes its request line does not hold the
    // server: the next request is answered at once.
    let mut silent = TcpStream::connect(addr).await.expect("connects");
    silent.write_all(b"GET /rea").await.expect("sends a part");
    let asked = Instant::now();
    let live = get(addr, "/livez").await;
    assert_eq!(live.status, 200, "{live:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "answered after {:?} with a silent client connected",
        asked.elapsed()
    );

    // Records in: kourier's metrics on /metrics, with this consumer's labels.
    let publisher =
        samples::publisher(&settings.bootstrap, &settings.topic).expect("builds the publisher");
    // Fresh event ids, short enough for the greylisted sample's mail address.
    let run_id = format!(
        "h{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let published = samples::publish(&publisher, samples::samples(&run_id))
        .await
        .expect("publishes the samples");
    let consumed = eventually(
        Duration::from_secs(60),
        "/metrics counts every published record",
        || async {
            let a = get(addr, "/metrics").await;
            let consumed = series_value(
                &a.body,
                "kourier_records_consumed_total",
                &[topic_label.clone(), group_label.clone()],
            );
            match consumed {
                Some(n) if n >= published.len() as f64 => Ok(a),
                _ => Err(format!("{} {consumed:?}", a.status)),
            }
        },
    )
    .await;
    assert_eq!(consumed.status, 200);
    assert!(
        consumed
            .head
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        consumed.head
    );
    assert_eq!(
        series_value(
            &consumed.body,
            "kourier_connection_state",
            std::slice::from_ref(&group_label)
        ),
        Some(1.0),
        "{}",
        consumed.body
    );
    assert!(
        consumed
            .body
            .contains("kourier_handler_duration_seconds_bucket{"),
        "the duration histograms keep their buckets"
    );

    // Every record settled: the status says so.
    eventually(
        Duration::from_secs(60),
        "/status reports caught_up=true",
        || async {
            let a = get(addr, "/status").await;
            let j: serde_json::Value = serde_json::from_str(&a.body).map_err(|e| e.to_string())?;
            if j["ready"] == true
                && j["consumer"]["in_flight"] == 0
                && j["consumer"]["caught_up"] == true
            {
                Ok(())
            } else {
                Err(format!("{} {}", a.status, a.body))
            }
        },
    )
    .await;

    // Anything else is 404.
    let unknown = get(addr, "/healthz").await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    drop(silent);

    // Stopped: neither alive nor ready.
    stop_tx.send(()).expect("the consumer is running");
    let report = running
        .await
        .expect("the consumer task ends")
        .expect("the consumer stops");
    assert!(report.is_clean(), "{report:?}");
    let live = get(addr, "/livez").await;
    assert_eq!(
        (live.status, live.body.as_str()),
        (503, "{\"live\":false,\"reasons\":[\"consumer stopped\"]}\n")
    );
    let ready = get(addr, "/readyz").await;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (
            503,
            "{\"ready\":false,\"reasons\":[\"consumer stopped\"]}\n"
        )
    );
}

#[tokio::test]
async fn malformed_and_non_get_requests_get_an_error_not_a_hang() {
    let metrics = PrometheusBuilder::new().build_recorder().handle();
    let server = OpsServer::start(([127, 0, 0, 1], 0).into(), metrics, Probes::default())
        .await
        .expect("listens");
    let addr = server.addr();

    // Query strings are ignored; HEAD gets the head alone.
    assert_eq!(get(addr, "/livez?verbose=1").await.status, 200);
    let head = request(
        addr,
        "HEAD /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert!(head.head.contains("content-length: 27"), "{head:?}");
    // HTTP/1.0 clients are answered too.
    assert_eq!(
        request(addr, "GET /livez HTTP/1.0\r\n\r\n").await.status,
        200
    );

    let post = request(
        addr,
        "POST /livez HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(post.status, 405);
    assert!(post.head.contains("allow: get,head"), "{post:?}");
    assert_eq!(request(addr, "hello\r\n\r\n").await.status, 400);
    // A head above hyper's bound (about 400 KiB) is answered 431.
    let huge = format!(
        "GET /livez HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    assert_eq!(request(addr, &huge).await.status, 431);

    // Many silent connections at once still leave room for a probe.
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(TcpStream::connect(addr).await.expect("connects"));
    }
    let asked = Instant::now();
    assert_eq!(get(addr, "/readyz").await.status, 503);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
}
