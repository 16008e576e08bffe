//! `kourier-dlt console` (feature `console`) in a real headless Chromium, driven over
//! WebDriver, against the real broker: a consumer dead-letters two records; the page shows the
//! consumer's status from its health routes (`kourier::health`, `GET /status`) and says a
//! second consumer's URL does not answer, lists the letters,
//! filters them by event id, opens one (its headers and its value decoded), redrives the
//! ticked letter after the confirmation step, and the consumer handles the redriven record.
//!
//! Needs Kafka (`scripts/services up`) and Debian's `chromium` and `chromium-driver`
//! (`apt-get install chromium chromium-driver`; `scripts/test` installs them when missing), or
//! `KOURIER_CHROMIUM` / `KOURIER_CHROMEDRIVER` naming other binaries. Without them the test
//! fails saying so; it never skips. `KOURIER_CONSOLE_SCREENSHOT=/tmp/console.png` saves a
//! screenshot of the page.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use kourier::dead_letter::headers::REDRIVEN_FROM;
use kourier::{Handler, HandlerError, Message, RetryPolicy, RetryingConsumer, async_trait};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::support::consumer::{Running, wait_for};

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct Ev {
    id: u32,
}

/// `(event id, kourier-redriven-from)` of each record handled.
type Handled = Arc<Mutex<Vec<(u32, String)>>>;

/// Refuses every record (permanent: dead-lettered at once) except a redriven one.
struct Service {
    handled: Handled,
}

#[async_trait]
impl Handler for Service {
    type Event = Ev;
    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        let Some(from) = m.headers().get_str(REDRIVEN_FROM) else {
            return Err(HandlerError::permanent("downstream refuses it"));
        };
        self.handled
            .lock()
            .unwrap()
            .push((m.event().id, from.to_owned()));
        Ok(())
    }
}

/// A binary from `KOURIER_<var>` or found on the PATH as `name`; the test fails saying how to
/// install it otherwise.
fn browser_binary(var: &str, name: &str) -> PathBuf {
    let missing = || -> ! {
        panic!(
            "tests/console.rs needs `{name}` (Chromium and its WebDriver) and did not find it: \
             install them with `sudo apt-get install chromium chromium-driver` (scripts/test does \
             this when they are missing), or set {var} to the binary"
        )
    };
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        return if path.is_file() { path } else { missing() };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| missing())
}

/// A loopback address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Starts `kourier-dlt console` and returns it with the URL it prints.
async fn start_console(dlt: &str, consumers: &[(&str, String)]) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kourier-dlt"));
    cmd.args(["--bootstrap-servers", &support::bootstrap()])
        .args(["console", "--listen", "127.0.0.1:0", "--dlt", dlt])
        .args(["--max-letters", "20"])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    for (name, url) in consumers {
        cmd.args(["--consumer", &format!("{name}={url}")]);
    }
    let mut child = cmd.spawn().expect("start kourier-dlt console");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the console prints its address within 20 s")
        .unwrap()
        .expect("a line on stdout");
    let url = line
        .split_whitespace()
        .last()
        .expect("an address")
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    (child, url)
}

/// chromedriver and the Chromium it starts, in a process group of their own: dropped (at the
/// end of the test, or when it fails), the whole group is killed and the profile removed, so a
/// failing test leaves no browser behind.
struct Browser {
    driver: Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Starts chromedriver on a free port and connects a headless Chromium session to it.
async fn start_browser(chromium: PathBuf, chromedriver: PathBuf) -> (Browser, Client) {
    let port = closed_port().await.port();
    let driver = Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display()));
    let profile = std::env::temp_dir().join(format!(
        "kourier-console-chromium-{}",
        support::unique_name("profile")
    ));
    let browser = Browser {
        driver,
        profile: profile.clone(),
    };
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            // The network here is closed: without these Chromium waits on connections of its
            // own (updates, sync, QUIC probes).
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    let url = format!("http://127.0.0.1:{port}");
    let mut last = None;
    for _ in 0..100 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(client) => return (browser, client),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no WebDriver session from {url} within 20 s: {last:?}");
}

/// Clicks `css` and waits (up to 30 s) until the page it leads to has loaded: its URL and
/// title satisfy `arrived`. A click returns before a form's answer has come (a redrive takes a
/// moment), so reading the page right away could read the page before.
async fn click_to(client: &Client, css: &str, arrived: impl Fn(&str, &str) -> bool) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
    for _ in 0..300 {
        let url = client.current_url().await.unwrap().to_string();
        let title = client.title().await.unwrap_or_default();
        let ready = client
            .execute("return document.readyState", vec![])
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        if arrived(&url, &title) && ready.as_deref() == Some("complete") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "clicking {css} did not lead to the page expected within 30 s; now at {:?} ({:?})",
        client.current_url().await,
        client.title().await
    );
}

/// With `KOURIER_CONSOLE_SCREENSHOT=/tmp/console.png`, saves the page as that file, with
/// `suffix` added to its name (`/tmp/console-letter.png`).
async fn screenshot(client: &Client, suffix: &str) {
    let Some(path) = std::env::var_os("KOURIER_CONSOLE_SCREENSHOT") else {
        return;
    };
    let path = PathBuf::from(path);
    let path = path.with_file_name(format!(
        "{}{suffix}.png",
        path.file_stem().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&path, client.screenshot().await.unwrap()).unwrap();
}

async fn wait_for_title(client: &Client, want: &str) {
    for _ in 0..300 {
        if client.title().await.unwrap_or_default() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no page titled {want:?} within 30 s");
}

async fn text_of(client: &Client, css: &str) -> String {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap(),
        Err(e) => panic!(
            "{css} not found on {:?}: {e}\n{}",
            client.current_url().await,
            client.source().await.unwrap_or_default()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_letter_and_redrives_it_after_confirmation() {
    // First: a missing browser fails the test at once.
    let chromium = browser_binary("KOURIER_CHROMIUM", "chromium");
    let chromedriver = browser_binary("KOURIER_CHROMEDRIVER", "chromedriver");
    let (topic, _group, dlt) = support::consumer::setup("console", 1).await;
    let handled: Handled = Arc::new(Mutex::new(Vec::new()));
    let consumer = Running::start(
        RetryingConsumer::builder(Service {
            handled: handled.clone(),
        })
        .bootstrap_servers(support::bootstrap())
        .group_id(support::unique_name("console-svc"))
        .topic(&topic)
        .retry_policy(RetryPolicy::no_retries())
        .commit_interval(Duration::from_millis(200)),
    );
    // Two events fail and are dead-lettered by the consumer itself.
    let records = (1..=2)
        .map(|id| {
            support::TestRecord::new()
                .key(format!("u{id}"))
                .value(serde_json::to_vec(&Ev { id }).unwrap())
                .header("event-id", Some(format!("e-{id}").into_bytes()))
                // Letters are untrusted: markup in them is shown, never run.
                .header("note", Some(b"<img id=injected src=x>".to_vec()))
        })
        .collect();
    support::produce(&topic, records).await;
    wait_for("2 dead letters", WAIT, || {
        consumer.monitor.snapshot().dead_lettered.permanent == 2
    })
    .await;

    // kourier's own health routes (feature `health`), as a service on kourier serves them.
    let health = kourier::health::serve("127.0.0.1:0", consumer.monitor.clone())
        .await
        .expect("serve the health routes");
    let status = health.local_addr();
    let gone = closed_port().await;
    let (mut console, base) = start_console(
        &dlt,
        &[
            ("svc", format!("http://{status}/status")),
            ("gone", format!("http://{gone}/status")),
        ],
    )
    .await;
    let (browser, client) = start_browser(chromium, chromedriver).await;

    // Tall enough for a screenshot of the whole page.
    client.set_window_size(1400, 1800).await.unwrap();
    // The page: the consumer's status, the unreachable one, both letters.
    client.goto(&base).await.unwrap();
    let svc = text_of(&client, ".consumer[data-name='svc'] .health").await;
    assert!(svc.contains("state: running"), "{svc}");
    let partitions = text_of(&client, ".consumer[data-name='svc'] table.partitions").await;
    assert!(partitions.contains(&topic), "{partitions}");
    let outcomes = text_of(&client, ".consumer[data-name='svc'] .outcomes").await;
    assert!(outcomes.contains("dead_lettered.permanent 2"), "{outcomes}");
    let gone_text = text_of(&client, ".consumer[data-name='gone'] .unreachable").await;
    assert!(gone_text.contains("unreachable"), "{gone_text}");
    let rows = client.find_all(Locator::Css("tr.letter")).await.unwrap();
    assert_eq!(rows.len(), 2, "{}", text_of(&client, "#letters").await);
    let list = text_of(&client, "#letters").await;
    assert!(list.contains("downstream refuses it"), "{list}");
    screenshot(&client, "").await;

    // Filtered by event id: only e-2's letter.
    client
        .find(Locator::Css("input[name='header']"))
        .await
        .unwrap()
        .send_keys("event-id=e-2")
        .await
        .unwrap();
    click_to(&client, "#apply", |url, _| url.contains("header=event-id")).await;
    let rows = client.find_all(Locator::Css("tr.letter")).await.unwrap();
    assert_eq!(rows.len(), 1, "{}", text_of(&client, "#letters").await);
    let key = text_of(&client, "tr.letter td.key").await;
    assert_eq!(key, "u2");

    // Its page: the headers and the value decoded.
    click_to(&client, "tr.letter a.place", |_, title| {
        title.starts_with("letter ")
    })
    .await;
    let headers = text_of(&client, "#headers").await;
    assert!(headers.contains("event-id e-2"), "{headers}");
    assert!(
        headers.contains("kourier-dlt-failure-kind permanent"),
        "{headers}"
    );
    assert!(
        headers.contains("note <img id=injected src=x>"),
        "{headers}"
    );
    assert!(
        client
            .find_all(Locator::Css("#injected"))
            .await
            .unwrap()
            .is_empty(),
        "markup from a letter became part of the page"
    );
    assert_eq!(text_of(&client, "#value").await, "{\n  \"id\": 2\n}");
    screenshot(&client, "-letter").await;
    client.back().await.unwrap();
    wait_for_title(&client, "kourier console").await;

    // Tick it, redrive: the confirmation shows it and publishes nothing yet.
    client
        .find(Locator::Css("tr.letter input[name='letter']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    click_to(&client, "#redrive-selected", |_, title| {
        title == "Confirm the redrive"
    })
    .await;
    let summary = text_of(&client, "#report-summary").await;
    assert!(summary.contains("1 will be redriven"), "{summary}");
    assert!(summary.contains("dry run"), "{summary}");
    screenshot(&client, "-confirm").await;
    let planned = text_of(&client, "#redriven").await;
    assert!(planned.contains(&topic), "{planned}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        handled.lock().unwrap().is_empty(),
        "redriven before confirmation"
    );

    // Confirmed: redriven, and the consumer handles it.
    click_to(&client, "#confirm-redrive", |_, title| {
        title == "Redrive report"
    })
    .await;
    let summary = text_of(&client, "#report-summary").await;
    assert!(summary.contains("1 redriven"), "{summary}");
    screenshot(&client, "-report").await;
    wait_for("the redriven record handled", WAIT, || {
        !handled.lock().unwrap().is_empty()
    })
    .await;
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled.len(), 1, "{handled:?}");
    assert_eq!(handled[0].0, 2, "{handled:?}");
    assert!(
        handled[0].1.starts_with(&format!("{dlt}/0@")),
        "{handled:?}"
    );

    client.close().await.unwrap();
    drop(browser);
    let _ = console.kill().await;
    health.shutdown().await;
    consumer.stop().await;
}
