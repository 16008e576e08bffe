//! `kourier::health` over real HTTP (reqwest) against the real broker: the probes and the
//! status in three states — starting (no consumer yet, then built and not run), healthy
//! (assigned, records handled) and a cluster that does not answer (a bootstrap address where
//! nothing listens) — then stopped or failed; and the routes nested under a prefix in an
//! application's own router, with `require_caught_up` and a metrics renderer.
//!
//! Needs Kafka (`scripts/services up`).

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kourier::health::{ConsumerSlot, Health};
use kourier::{HandlerError, Message, handler_fn};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::support::consumer::{Running, builder, setup};
use crate::support::{TestRecord, produce, require_kafka};

/// One answer: status code, content type and body (parsed as JSON when it is JSON).
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    fn reasons(&self) -> Vec<String> {
        self.json()["reasons"]
            .as_array()
            .unwrap_or_else(|| panic!("no reasons: {}", self.text))
            .iter()
            .map(|r| r.as_str().expect("a reason is a string").to_owned())
            .collect()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("builds the client")
}

async fn get(url: &str) -> Answer {
    let response = client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.expect("reads the body");
    println!("GET {url} -> {status} {}", text.trim_end());
    Answer {
        status,
        content_type,
        text,
    }
}

/// Asks `check` every 200 ms until it returns `Ok`, failing after `within` with its last
/// answer.
async fn eventually<T, F: Future<Output = Result<T, String>>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let mut last = String::new();
    let found = tokio::time::timeout(within, async {
        loop {
            match check().await {
                Ok(value) => return value,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{what}: not within {within:?}; last: {last}"))
}

async fn eventually_status(url: &str, status: u16, within: Duration) -> Answer {
    eventually(within, &format!("GET {url} answers {status}"), || async {
        let a = get(url).await;
        if a.status == status {
            Ok(a)
        } else {
            Err(format!("{} {}", a.status, a.text))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_a_consumer_from_starting_to_healthy_to_stopped() {
    require_kafka().await;
    let (topic, group, _dlt) = setup("health-states", 2).await;

    // Served before the consumer exists, as an application's probes must be.
    let slot = ConsumerSlot::new();
    let server = Health::new(slot.clone())
        .serve("127.0.0.1:0")
        .await
        .expect("listens");
    let base = format!("http://{}", server.local_addr());

    // Starting, not built yet: alive, not ready, no snapshot.
    let live = get(&format!("{base}/livez")).await;
    assert_eq!(
        (live.status, live.json()),
        (200, serde_json::json!({"live": true, "reasons": []}))
    );
    assert_eq!(live.content_type, "application/json");
    let ready = get(&format!("{base}/readyz")).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.reasons(), ["consumer starting: not built yet"]);
    let status = get(&format!("{base}/status")).await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["consumer"], Value::Null);
    assert_eq!(status.json()["ready"], false);
    // No metrics renderer given.
    assert_eq!(get(&format!("{base}/metrics")).await.status, 404);

    // Built, not run: still alive and not ready.
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = handled.clone();
    let consumer = builder(
        handler_fn(move |_: Message<Value>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        }),
        &topic,
        &group,
    )
    .build()
    .expect("builds");
    slot.set(consumer.monitor());
    let ready = get(&format!("{base}/readyz")).await;
    assert_eq!(
        (ready.status, ready.reasons()),
        (503, vec!["consumer not started".to_owned()])
    );
    assert_eq!(get(&format!("{base}/livez")).await.status, 200);

    // Healthy: running, connected, both partitions assigned.
    let running = Running::spawn(consumer);
    let ready = eventually_status(&format!("{base}/readyz"), 200, Duration::from_secs(60)).await;
    assert_eq!(
        ready.json(),
        serde_json::json!({"ready": true, "reasons": []})
    );
    produce(
        &topic,
        (0..4)
            .map(|i| {
                TestRecord::new()
                    .key(format!("k{i}"))
                    .value(format!("{{\"n\":{i}}}"))
            })
            .collect(),
    )
    .await;
    let status = eventually(
        Duration::from_secs(60),
        "/status counts 4 handled",
        || async {
            let a = get(&format!("{base}/status")).await;
            let j = a.json();
            if j["consumer"]["outcomes"]["handled"] == 4 && j["consumer"]["caught_up"] == true {
                Ok(j)
            } else {
                Err(a.text)
            }
        },
    )
    .await;
    let consumer = &status["consumer"];
    assert_eq!(status["live"], true);
    assert_eq!(status["ready"], true);
    assert_eq!(consumer["state"], "running");
    assert_eq!(consumer["connection"], "connected");
    let partitions: Vec<(String, i64)> = consumer["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            (
                p["topic"].as_str().expect("topic").to_owned(),
                p["partition"].as_i64().expect("partition"),
            )
        })
        .collect();
    assert_eq!(partitions, [(topic.clone(), 0), (topic.clone(), 1)]);
    assert!(
        consumer["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["lag"] == 0),
        "{consumer}"
    );
    assert_eq!(consumer["in_flight"], 0);
    assert!(
        consumer["since_last_poll_ms"]
            .as_u64()
            .is_some_and(|ms| ms < 5_000),
        "{consumer}"
    );
    assert_eq!(handled.load(std::sync::atomic::Ordering::SeqCst), 4);

    // HEAD is answered without a body; other methods are refused.
    let head = client()
        .head(format!("{base}/livez"))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(head.text().await.expect("body"), "");
    let post = client()
        .post(format!("{base}/livez"))
        .send()
        .await
        .expect("POST");
    assert_eq!(post.status().as_u16(), 405);

    // Stopped: neither alive nor ready.
    running.stop().await;
    let live = get(&format!("{base}/livez")).await;
    assert_eq!(
        (live.status, live.reasons()),
        (503, vec!["consumer stopped".to_owned()])
    );
    let ready = get(&format!("{base}/readyz")).await;
    assert_eq!(
        (ready.status, ready.reasons()),
        (503, vec!["consumer stopped".to_owned()])
    );
    assert_eq!(
        get(&format!("{base}/status")).await.json()["consumer"]["state"],
        "stopped"
    );

    server.shutdown().await;
    assert!(
        client().get(format!("{base}/livez")).send().await.is_err(),
        "the server still answers after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_not_ready_with_the_reason_then_a_failed_start_is_not_alive() {
    // An address where nothing listens: a port bound, then released.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binds")
        .local_addr()
        .expect("an address");
    let consumer = kourier::RetryingConsumer::builder(handler_fn(|_: Message<Value>| async {
        Ok::<(), HandlerError>(())
    }))
    .bootstrap_servers(nowhere.to_string())
    .group_id("health-nowhere")
    .topic("health-nowhere")
    .startup_timeout(Duration::from_secs(10))
    .build()
    .expect("builds");
    let server = kourier::health::serve("127.0.0.1:0", consumer.monitor())
        .await
        .expect("listens");
    let base = format!("http://{}", server.local_addr());
    let running = Running::spawn(consumer);

    // Starting against a cluster that does not answer: alive, not ready, and why (once the
    // startup check's first metadata request, up to 5 s, has gone unanswered).
    let ready = eventually(
        Duration::from_secs(9),
        "/readyz names the unreachable cluster",
        || async {
            let a = get(&format!("{base}/readyz")).await;
            if a.status == 503
                && a.reasons()
                    .iter()
                    .any(|r| r.starts_with("kafka unreachable since "))
            {
                Ok(a)
            } else {
                Err(format!("{} {}", a.status, a.text))
            }
        },
    )
    .await;
    assert_eq!(
        ready.reasons()[0],
        "consumer starting: startup checks running"
    );
    assert_eq!(ready.reasons().len(), 2, "{}", ready.text);
    assert_eq!(get(&format!("{base}/livez")).await.status, 200);
    let status = get(&format!("{base}/status")).await.json();
    assert_eq!(status["consumer"]["connection"], "disconnected");
    assert_eq!(status["consumer"]["state"], "starting");

    // The startup timeout passes: the run fails, and the probes say so.
    let live = eventually_status(&format!("{base}/livez"), 503, Duration::from_secs(20)).await;
    let reasons = live.reasons();
    assert_eq!(reasons.len(), 1, "{}", live.text);
    assert!(
        reasons[0].starts_with("consumer failed: ") && reasons[0].contains(&nowhere.to_string()),
        "{reasons:?}"
    );
    let ready = get(&format!("{base}/readyz")).await;
    assert_eq!((ready.status, ready.reasons()), (503, reasons.clone()));
    let result = running.task.await.expect("the consumer task ends");
    assert!(
        matches!(result, Err(kourier::Error::BrokersUnreachable { .. })),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_nested_in_an_applications_router_with_caught_up_required_and_metrics() {
    require_kafka().await;
    let (topic, group, _dlt) = setup("health-mounted", 1).await;
    // The handler waits for a permit: records stay in flight until the test lets them go.
    let gate = Arc::new(Semaphore::new(0));
    let permits = gate.clone();
    let consumer = builder(
        handler_fn(move |_: Message<Value>| {
            let permits = permits.clone();
            async move {
                let _permit = permits.acquire().await.map_err(HandlerError::transient)?;
                Ok(())
            }
        }),
        &topic,
        &group,
    )
    .build()
    .expect("builds");
    let health = Health::new(consumer.monitor())
        .require_caught_up(true)
        .metrics(|| "app_requests_total 7\n".to_owned());
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "the application" }))
        .nest("/ops", health.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let base = format!("http://{}", listener.local_addr().expect("an address"));
    let app_server = tokio::spawn(async move { axum::serve(listener, app).await });

    assert_eq!(get(&format!("{base}/")).await.text, "the application");
    assert_eq!(
        get(&format!("{base}/livez")).await.status,
        404,
        "only under the prefix"
    );
    let metrics = get(&format!("{base}/ops/metrics")).await;
    assert_eq!(
        (metrics.status, metrics.text.as_str()),
        (200, "app_requests_total 7\n")
    );
    assert!(
        metrics
            .content_type
            .starts_with("text/plain; version=0.0.4"),
        "{metrics:?}"
    );

    let running = Running::spawn(consumer);
    produce(
        &topic,
        vec![
            TestRecord::new().key("a").value("{}"),
            TestRecord::new().key("b").value("{}"),
        ],
    )
    .await;
    // Connected and assigned, but records wait in the handler: not caught up, not ready.
    let waiting = eventually(
        Duration::from_secs(60),
        "/ops/readyz waits for the backlog",
        || async {
            let a = get(&format!("{base}/ops/readyz")).await;
            let reasons = if a.status == 503 {
                a.reasons()
            } else {
                Vec::new()
            };
            match reasons.as_slice() {
                [only] if only.starts_with("not caught up: ") && only.contains(" 1 in flight") => {
                    Ok(a)
                }
                _ => Err(format!("{} {}", a.status, a.text)),
            }
        },
    )
    .await;
    assert_eq!(waiting.status, 503);
    assert_eq!(get(&format!("{base}/ops/livez")).await.status, 200);
    // Let them go: caught up, ready.
    gate.add_permits(2);
    eventually_status(&format!("{base}/ops/readyz"), 200, Duration::from_secs(60)).await;

    running.stop().await;
    app_server.abort();
}

/// A client that opens a connection and never finishes its request does not hold the
/// standalone server: probes are answered meanwhile, the silent connection is closed once
/// its lifetime is over, and connections above the cap are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_excess_connections_do_not_hold_the_standalone_server() {
    use kourier::health::{CONNECTION_LIFETIME, MAX_CONNECTIONS};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    let server = kourier::health::serve("127.0.0.1:0", ConsumerSlot::new())
        .await
        .expect("listens");
    let addr = server.local_addr();
    let base = format!("http://{addr}");

    let mut silent = TcpStream::connect(addr).await.expect("connects");
    silent.write_all(b"GET /rea").await.expect("sends a part");
    let asked = std::time::Instant::now();
    assert_eq!(get(&format!("{base}/livez")).await.status, 200);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );

    // The silent one is closed once its lifetime is over.
    let mut byte = [0u8; 1];
    let cut = tokio::time::timeout(
        CONNECTION_LIFETIME + Duration::from_secs(3),
        silent.read(&mut byte),
    )
    .await
    .expect("the server closes a silent connection after its lifetime");
    assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
    let lived = asked.elapsed();
    assert!(
        lived >= CONNECTION_LIFETIME - Duration::from_secs(1),
        "closed after {lived:?}"
    );

    // At the cap, one more connection is closed at once.
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(TcpStream::connect(addr).await.expect("connects"));
    }
    // Let the server accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = TcpStream::connect(addr).await.expect("connects");
    let closed = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut byte))
        .await
        .expect("a connection over the cap is closed at once");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    // Once the server has seen them closed, probes get through again (until then a new
    // connection may still find the slots taken and be closed).
    drop(held);
    let url = format!("{base}/readyz");
    let body = eventually(Duration::from_secs(5), "a probe after the cap", || async {
        match client().get(&url).send().await {
            Ok(r) if r.status().as_u16() == 503 => r.text().await.map_err(|e| e.to_string()),
            Ok(r) => Err(format!("status {}", r.status())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert_eq!(
        body,
        "{\"ready\":false,\"reasons\":[\"consumer starting: not built yet\"]}\n"
    );
    server.shutdown().await;
}
