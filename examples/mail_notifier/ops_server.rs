//! The notifier's ops endpoint: one small HTTP/1.1 server on `--metrics-addr` for Prometheus
//! and for liveness and readiness probes.
//!
//! | request | `200` | otherwise |
//! |---|---|---|
//! | `GET /metrics` | kourier's metrics in the Prometheus text format | |
//! | `GET /livez` | the consumer is starting or running (also while it drains at shutdown) | `503` once it has stopped, failed or its task ended |
//! | `GET /readyz` | the consumer reaches the cluster and has at least one partition assigned | `503` with the reason |
//! | anything else | | `404` (`405` for a method other than `GET`/`HEAD`) |
//!
//! `/livez` and `/readyz` answer with one plain-text line: the verdict (or the reason it is
//! not ready), then the consumer's status, e.g.
//! `ready; connection=connected since=2025-06-01T10:00:00Z assigned=6 in_flight=0 caught_up=true`
//! or `not ready: no partitions assigned; connection=connected ...`.
//!
//! Hand-written rather than a web framework: three fixed `GET` routes need only the request
//! line. Every connection runs in its own task under one deadline ([`CONNECTION_TIMEOUT`],
//! reading and writing), its request head is bounded ([`MAX_REQUEST_HEAD`], else `431`), at
//! most [`MAX_CONNECTIONS`] are served at once (more are closed at once), and each answer
//! closes its connection: a slow or malicious client holds one slot for a few seconds at
//! most and never delays the others.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use kourier::{
    ConnectionState, ConsumerMonitor, ConsumerSnapshot, Handler, RetryingConsumer, ShutdownReport,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// How long one connection may take, from accept to the last byte written.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes read of a request (request line and headers).
pub(crate) const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// The most connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// Builds a Prometheus recorder for kourier's metrics (see `kourier::metrics`) and installs it
/// as the process' global recorder. Call it before the consumer runs: a consumer registers its
/// metrics when it starts. Must be called within a Tokio runtime (it spawns the recorder's
/// upkeep task).
///
/// # Errors
/// When the bucket settings are invalid or a global recorder is already installed.
pub(crate) fn install_prometheus() -> Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        // Histograms (rather than summaries) for handler and commit durations.
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    // What `PrometheusBuilder::install` would do: drain histogram samples now and then, so
    // they do not pile up between scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The consumer's lifecycle as the probes see it. Cheap to clone; clones share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Probes {
    state: Arc<Mutex<Lifecycle>>,
}

#[derive(Debug, Default)]
struct Lifecycle {
    phase: Phase,
    /// The consumer's monitor, once it runs.
    monitor: Option<ConsumerMonitor>,
}

#[derive(Debug, Default, Clone)]
enum Phase {
    /// The process is setting up (topics, Redis, the consumer): alive, not ready.
    #[default]
    Starting,
    Running,
    /// Shutdown was requested; in-flight records finish. Alive, not ready.
    Stopping,
    /// The consumer's `run` returned (why) or its task ended without returning.
    Stopped(String),
}

impl Probes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
    }

    /// Runs `consumer` until `shutdown` resolves (see [`RetryingConsumer::run`]), reporting to
    /// the probes that it runs, drains and stops (or failed, or its task ended before `run`
    /// returned: panicked or cancelled).
    ///
    /// # Errors
    /// As for [`RetryingConsumer::run`].
    pub(crate) async fn run<H: Handler>(
        self,
        consumer: RetryingConsumer<H>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> kourier::Result<ShutdownReport> {
        {
            let mut state = self.lock();
            state.monitor = Some(consumer.monitor());
            state.phase = Phase::Running;
        }
        // Set on every way out of here, a panic or a dropped future included.
        let mut ended = Ended {
            probes: self.clone(),
            why: None,
        };
        let draining = self.clone();
        let result = consumer
            .run(async move {
                shutdown.await;
                draining.set_phase(Phase::Stopping);
            })
            .await;
        ended.why = Some(match &result {
            Ok(report) if report.is_clean() => "consumer stopped".to_owned(),
            Ok(report) => format!(
                "consumer stopped; {} records abandoned (delivered again after a restart)",
                report.abandoned
            ),
            Err(e) => format!("consumer failed: {}", error_chain(e)),
        });
        result
    }

    /// `/livez`: alive while the consumer is starting, running or draining.
    pub(crate) fn liveness(&self) -> (bool, String) {
        let state = self.lock();
        let (alive, verdict) = match &state.phase {
            Phase::Starting => (true, "alive: consumer starting".to_owned()),
            Phase::Running => (true, "alive: consumer running".to_owned()),
            Phase::Stopping => (true, "alive: consumer shutting down".to_owned()),
            Phase::Stopped(why) => (false, format!("not alive: {why}")),
        };
        (alive, with_status(verdict, state.monitor.as_ref()))
    }

    /// `/readyz`: ready while the consumer runs, reaches the cluster and has partitions.
    pub(crate) fn readiness(&self) -> (bool, String) {
        let state = self.lock();
        let snapshot = state.monitor.as_ref().map(ConsumerMonitor::snapshot);
        let reason = match (&state.phase, &snapshot) {
            (Phase::Starting, _) | (_, None) => Some("consumer starting".to_owned()),
            (Phase::Stopping, _) => Some("consumer shutting down".to_owned()),
            (Phase::Stopped(why), _) => Some(why.clone()),
            (Phase::Running, Some(s)) => not_ready_because(s),
        };
        let ready = reason.is_none();
        let verdict = match reason {
            None => "ready".to_owned(),
            Some(reason) => format!("not ready: {reason}"),
        };
        let line = match &snapshot {
            Some(s) => format!("{verdict}; {}", status(s)),
            None => verdict,
        };
        (ready, line)
    }
}

/// Why a running consumer is not ready, if it is not.
fn not_ready_because(s: &ConsumerSnapshot) -> Option<String> {
    let since = humantime::format_rfc3339_seconds(s.connection_since);
    let for_how_long = SystemTime::now()
        .duration_since(s.connection_since)
        .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
        .unwrap_or_else(|_| "0s".to_owned());
    match s.connection {
        ConnectionState::Connected if s.assigned.is_empty() => {
            Some("no partitions assigned".to_owned())
        }
        ConnectionState::Connected => None,
        ConnectionState::Starting => Some(format!(
            "not connected to kafka yet (startup checks running since {since}, {for_how_long})"
        )),
        ConnectionState::Disconnected => Some(format!(
            "not connected to kafka since {since} ({for_how_long})"
        )),
        other => Some(format!("connection state {other:?} since {since}")),
    }
}

fn with_status(verdict: String, monitor: Option<&ConsumerMonitor>) -> String {
    match monitor {
        Some(m) => format!("{verdict}; {}", status(&m.snapshot())),
        None => verdict,
    }
}

/// `connection=connected since=... assigned=6 in_flight=0 caught_up=true`
fn status(s: &ConsumerSnapshot) -> String {
    let connection = match s.connection {
        ConnectionState::Starting => "starting",
        ConnectionState::Connected => "connected",
        ConnectionState::Disconnected => "disconnected",
        _ => "unknown",
    };
    format!(
        "connection={connection} since={} assigned={} in_flight={} caught_up={}",
        humantime::format_rfc3339_seconds(s.connection_since),
        s.assigned.len(),
        s.in_flight,
        s.caught_up
    )
}

/// An error and its sources on one line, each once.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            let _ = write!(line, ": {text}");
        }
        source = cause.source();
    }
    line.replace(['\r', '\n'], " ")
}

/// Sets the probes' phase to `Stopped` when `Probes::run` ends, however it ends.
struct Ended {
    probes: Probes,
    why: Option<String>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let why = self.why.take().unwrap_or_else(|| {
            "consumer task ended before the consumer stopped (panicked or cancelled)".to_owned()
        });
        self.probes.set_phase(Phase::Stopped(why));
    }
}

/// The running server; stops when dropped.
#[derive(Debug)]
pub(crate) struct OpsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl OpsServer {
    /// Listens on `addr` (port `0`: any free port) and serves `/metrics` from `metrics` and
    /// `/livez` and `/readyz` from `probes`.
    ///
    /// # Errors
    /// When it cannot listen on `addr`.
    pub(crate) async fn start(
        addr: SocketAddr,
        metrics: PrometheusHandle,
        probes: Probes,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr} for metrics and probes"))?;
        let addr = listener.local_addr()?;
        let routes = Arc::new(Routes { metrics, probes });
        let task = tokio::spawn(accept(listener, routes));
        Ok(OpsServer { addr, task })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Routes {
    metrics: PrometheusHandle,
    probes: Probes,
}

async fn accept(listener: TcpListener, routes: Arc<Routes>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                // E.g. out of file descriptors: back off briefly rather than spin.
                tracing::warn!(error = %e, "ops server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "ops server: too many connections; closing this one");
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(CONNECTION_TIMEOUT, serve(stream, &routes)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "ops server: connection failed"),
                Err(_) => tracing::debug!(%peer, "ops server: connection timed out"),
            }
        });
    }
}

/// Reads one request head, answers it and closes the connection.
async fn serve(mut stream: TcpStream, routes: &Routes) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let response = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // Closed before the head was complete: nobody to answer.
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = end_of_head(&head) {
            break respond(&head[..end], routes);
        }
        if head.len() > MAX_REQUEST_HEAD {
            break Response::text(431, "request header fields too large\n".to_owned());
        }
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.shutdown().await?;
    // A lingering close: closing with unread bytes (the rest of an oversized head) would
    // reset the connection and could discard the answer before the client reads it. Clients
    // close once answered (`connection: close`), which ends this at once.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    })
    .await;
    Ok(())
}

/// Where the blank line that ends a request head ends (`\r\n\r\n`, or `\n\n` from lenient
/// clients), if it has arrived.
fn end_of_head(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn respond(head: &[u8], routes: &Routes) -> Response {
    let request_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let request_line = String::from_utf8_lossy(request_line);
    let Some((method, path)) = parse_request_line(request_line.trim_end_matches('\r')) else {
        return Response::text(400, "bad request\n".to_owned());
    };
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Response::text(405, "method not allowed\n".to_owned());
            r.allow = true;
            return r;
        }
    };
    let mut response = match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: routes.metrics.render(),
            allow: false,
            head_only: false,
        },
        "/livez" => {
            let (alive, line) = routes.probes.liveness();
            Response::text(if alive { 200 } else { 503 }, line + "\n")
        }
        "/readyz" => {
            let (ready, line) = routes.probes.readiness();
            Response::text(if ready { 200 } else { 503 }, line + "\n")
        }
        _ => Response::text(404, "not found\n".to_owned()),
    };
    response.head_only = head_only;
    response
}

/// `GET /readyz?verbose HTTP/1.1` → `("GET", "/readyz")`; `None` unless it is an HTTP/1.x
/// request line with an origin-form target.
pub(crate) fn parse_request_line(line: &str) -> Option<(&str, &str)> {
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && target.starts_with('/')
        && matches!(version, "HTTP/1.0" | "HTTP/1.1");
    if !well_formed {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some((method, path))
}

#[derive(Debug)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    /// Add `Allow: GET, HEAD` (to a `405`).
    allow: bool,
    /// A `HEAD` request: headers only.
    head_only: bool,
}

impl Response {
    fn text(status: u16, body: String) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
            allow: false,
            head_only: false,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            head.push_str("allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}
