//! Health endpoints for a running consumer: liveness and readiness probes, a JSON status and
//! the Prometheus metrics, as an [axum](https://docs.rs/axum) [`Router`] that an application
//! mounts in its own HTTP server, or served on their own by [`serve`].
//!
//! | route | `200` | `503` |
//! |---|---|---|
//! | `GET /livez` | the consumer is starting, running with a poll loop that goes round, or stopping; also before it is built | its run is over (stopped or failed), or its poll loop has not gone round for [`max_poll_gap`](Health::max_poll_gap) |
//! | `GET /readyz` | running, connected to the cluster, partitions assigned, poll loop going round (and, with [`require_caught_up`](Health::require_caught_up), caught up) | otherwise, with every reason |
//! | `GET /status` | always: the [`ConsumerSnapshot`] as JSON | — |
//! | `GET /metrics` | the text of the renderer given to [`metrics`](Health::metrics) (Prometheus text format) | — (`404` without one) |
//!
//! `HEAD` is answered like `GET` without a body; other methods get `405`. Every answer has
//! `cache-control: no-store`.
//!
//! The probes answer a small JSON object: `{"live":true,"reasons":[]}`,
//! `{"ready":false,"reasons":["no partitions assigned"]}`. Each reason is one lowercase
//! sentence; readiness lists all that apply. `/status` answers
//! `{"live":…,"ready":…,"reasons":[…],"consumer":{…}}` where `consumer` is the snapshot
//! (times in RFC 3339, UTC; durations in milliseconds), or `null` before the consumer is
//! built.
//!
//! The routes read [`ConsumerMonitor::snapshot`] at each request: a probe costs one lock of
//! the consumer's shared state, nothing is polled on a timer.
//!
//! # Mounting the routes in your own server
//!
//! ```no_run
//! # use kourier::{async_trait, Handler, HandlerError, Message, RetryingConsumer};
//! # struct Mailer;
//! # #[async_trait]
//! # impl Handler for Mailer {
//! #     type Event = serde_json::Value;
//! #     async fn handle(&self, _: &Message<serde_json::Value>) -> Result<(), HandlerError> { Ok(()) }
//! # }
//! use kourier::health::Health;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let consumer = RetryingConsumer::builder(Mailer)
//!         .bootstrap_servers("127.0.0.1:9092")
//!         .group_id("notifier")
//!         .topic("notify.v1")
//!         .build()?;
//!     // Your application's routes, with the health routes under `/health`:
//!     // `/health/livez`, `/health/readyz`, `/health/status`.
//!     let app = axum::Router::new()
//!         .route("/", axum::routing::get(|| async { "hello" }))
//!         .nest("/health", Health::new(consumer.monitor()).router());
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     tokio::spawn(async move { axum::serve(listener, app).await });
//!     consumer.run_until_signal().await?.into_result()?;
//!     Ok(())
//! }
//! ```
//!
//! Without a server of your own, one line serves them (and
//! [`HealthServer::shutdown`] stops it):
//!
//! ```no_run
//! # async fn f(monitor: kourier::ConsumerMonitor) -> std::io::Result<()> {
//! let server = kourier::health::serve("0.0.0.0:9090", monitor).await?;
//! # server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Probes that must answer before the consumer is built (its startup may take a while: the
//! routes say "starting" meanwhile) take a [`ConsumerSlot`], filled once the consumer
//! exists. Metrics come from the exporter the application installs; with
//! `metrics-exporter-prometheus`:
//!
//! ```no_run
//! # use kourier::{async_trait, Handler, HandlerError, Message, RetryingConsumer};
//! # struct Mailer;
//! # #[async_trait]
//! # impl Handler for Mailer {
//! #     type Event = serde_json::Value;
//! #     async fn handle(&self, _: &Message<serde_json::Value>) -> Result<(), HandlerError> { Ok(()) }
//! # }
//! # fn build_consumer() -> kourier::Result<RetryingConsumer<Mailer>> {
//! #     RetryingConsumer::builder(Mailer).bootstrap_servers("k:9092").group_id("g").topic("t").build()
//! # }
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use kourier::health::{ConsumerSlot, Health};
//!
//! let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
//! let slot = ConsumerSlot::new();
//! let server = Health::new(slot.clone())
//!     .metrics(move || handle.render())
//!     .serve("0.0.0.0:9090")
//!     .await?;
//! let consumer = build_consumer()?; // meanwhile /livez 200, /readyz 503 "not built yet"
//! slot.set(consumer.monitor());
//! consumer.run_until_signal().await?;
//! server.shutdown().await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future as _;
use std::io;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::{TcpListener, ToSocketAddrs};

use crate::{ConnectionState, ConsumerMonitor, ConsumerSnapshot, RunState};

/// How long the poll loop may go without a round before liveness fails, by default: above
/// the default revoke timeout (30 s), during which a rebalance holds the poll loop.
pub const DEFAULT_MAX_POLL_GAP: Duration = Duration::from_secs(60);
/// The least [`Health::max_poll_gap`] accepted: shorter gaps are raised to it.
pub const MIN_MAX_POLL_GAP: Duration = Duration::from_secs(1);
/// The most [`Health::max_poll_gap`] accepted: longer gaps are lowered to it.
pub const MAX_MAX_POLL_GAP: Duration = Duration::from_secs(3600);

/// The consumer the health routes report on: a [`ConsumerMonitor`] given now, or set later
/// (once the consumer is built). Cheap to clone; clones share the slot.
#[derive(Debug, Clone, Default)]
pub struct ConsumerSlot {
    monitor: Arc<RwLock<Option<ConsumerMonitor>>>,
}

impl ConsumerSlot {
    /// An empty slot: the routes answer "starting" until [`set`](Self::set) is called.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reports on `monitor` from now on (replacing the one set before, if any).
    pub fn set(&self, monitor: ConsumerMonitor) {
        *self.monitor.write().unwrap_or_else(PoisonError::into_inner) = Some(monitor);
    }

    /// The monitor set, if any.
    pub fn monitor(&self) -> Option<ConsumerMonitor> {
        self.monitor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl From<ConsumerMonitor> for ConsumerSlot {
    fn from(monitor: ConsumerMonitor) -> Self {
        let slot = ConsumerSlot::new();
        slot.set(monitor);
        slot
    }
}

/// A probe's answer: whether it passes and, when it does not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verdict {
    /// Whether the probe passes (`200`) or not (`503`).
    pub ok: bool,
    /// Why it does not pass, one lowercase sentence each; empty when it passes.
    pub reasons: Vec<String>,
}

impl Verdict {
    fn from_reasons(reasons: Vec<String>) -> Self {
        Verdict {
            ok: reasons.is_empty(),
            reasons,
        }
    }

    fn status(&self) -> StatusCode {
        if self.ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The health routes' settings, and the routes: [`router`](Self::router) to mount them,
/// [`serve`](Self::serve) to serve them on their own. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    slot: ConsumerSlot,
    require_caught_up: bool,
    max_poll_gap: Duration,
    metrics: Option<Render>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("slot", &self.slot)
            .field("require_caught_up", &self.require_caught_up)
            .field("max_poll_gap", &self.max_poll_gap)
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

impl Health {
    /// Health routes for the consumer behind `consumer`: a [`ConsumerMonitor`]
    /// (`consumer.monitor()`) or a [`ConsumerSlot`] filled later.
    pub fn new(consumer: impl Into<ConsumerSlot>) -> Self {
        Health {
            slot: consumer.into(),
            require_caught_up: false,
            max_poll_gap: DEFAULT_MAX_POLL_GAP,
            metrics: None,
        }
    }

    /// Readiness also requires the consumer to have caught up
    /// ([`ConsumerSnapshot::caught_up`]: nothing in flight or buffered, every partition read
    /// and committed to its end). Off by default: a consumer with a backlog is working, and
    /// is ready. On suits a batch job, or a deployment that should not take traffic until a
    /// backlog is drained.
    #[must_use]
    pub fn require_caught_up(mut self, yes: bool) -> Self {
        self.require_caught_up = yes;
        self
    }

    /// How long the poll loop may go without a round (see
    /// [`ConsumerSnapshot::since_last_poll`]) before liveness and readiness fail. Default
    /// [`DEFAULT_MAX_POLL_GAP`] (60 s); kept between [`MIN_MAX_POLL_GAP`] and
    /// [`MAX_MAX_POLL_GAP`]. Keep it above the consumer's
    /// [`revoke_timeout`](crate::RetryingConsumerBuilder::revoke_timeout): a rebalance holds
    /// the poll loop that long.
    #[must_use]
    pub fn max_poll_gap(mut self, gap: Duration) -> Self {
        self.max_poll_gap = gap.clamp(MIN_MAX_POLL_GAP, MAX_MAX_POLL_GAP);
        self
    }

    /// Serves `GET /metrics` with what `render` returns, as the Prometheus text format
    /// (e.g. `move || handle.render()` with a `metrics-exporter-prometheus` handle). Without
    /// it `/metrics` answers `404`.
    #[must_use]
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// Liveness, as `GET /livez` answers it.
    pub fn liveness(&self) -> Verdict {
        let snapshot = self.slot.monitor().map(|m| m.snapshot());
        Verdict::from_reasons(self.not_live_because(snapshot.as_ref()))
    }

    /// Readiness, as `GET /readyz` answers it.
    pub fn readiness(&self) -> Verdict {
        let snapshot = self.slot.monitor().map(|m| m.snapshot());
        Verdict::from_reasons(self.not_ready_because(snapshot.as_ref()))
    }

    /// The status `GET /status` answers: both verdicts and the snapshot, as JSON.
    pub fn status(&self) -> Value {
        let snapshot = self.slot.monitor().map(|m| m.snapshot());
        let live = self.not_live_because(snapshot.as_ref());
        let ready = self.not_ready_because(snapshot.as_ref());
        json!({
            "live": live.is_empty(),
            "ready": ready.is_empty(),
            "reasons": ready,
            "consumer": snapshot.as_ref().map(snapshot_json),
        })
    }

    fn stalled(&self, s: &ConsumerSnapshot) -> Option<String> {
        let gap = s.since_last_poll?;
        (s.state == RunState::Running && gap > self.max_poll_gap).then(|| {
            format!(
                "poll loop stalled: no round for {} ms (limit {} ms)",
                gap.as_millis(),
                self.max_poll_gap.as_millis()
            )
        })
    }

    fn not_live_because(&self, snapshot: Option<&ConsumerSnapshot>) -> Vec<String> {
        let Some(s) = snapshot else {
            return Vec::new();
        };
        match s.state {
            RunState::Stopped => vec!["consumer stopped".to_owned()],
            RunState::Failed => vec![failed(s)],
            _ => self.stalled(s).into_iter().collect(),
        }
    }

    fn not_ready_because(&self, snapshot: Option<&ConsumerSnapshot>) -> Vec<String> {
        let Some(s) = snapshot else {
            return vec!["consumer starting: not built yet".to_owned()];
        };
        let mut reasons = Vec::new();
        match s.state {
            RunState::NotStarted => reasons.push("consumer not started".to_owned()),
            RunState::Starting => {
                reasons.push("consumer starting: startup checks running".to_owned());
            }
            RunState::Running => {}
            RunState::Stopping => reasons.push("consumer shutting down".to_owned()),
            RunState::Stopped => reasons.push("consumer stopped".to_owned()),
            RunState::Failed => reasons.push(failed(s)),
        }
        if s.state.is_over() {
            return reasons;
        }
        let since = humantime::format_rfc3339_seconds(s.connection_since);
        match s.connection {
            ConnectionState::Connected => {}
            ConnectionState::Disconnected => reasons.push(format!(
                "kafka unreachable since {since} ({} s)",
                seconds_since(s.connection_since)
            )),
            ConnectionState::Starting => {
                if s.state != RunState::NotStarted {
                    reasons.push("connection to kafka not checked yet".to_owned());
                }
            }
        }
        if s.state == RunState::Running {
            if s.assigned.is_empty() {
                reasons.push("no partitions assigned".to_owned());
            }
            reasons.extend(self.stalled(s));
            if self.require_caught_up && !s.caught_up {
                let lag: i64 = s.partitions.iter().filter_map(|p| p.lag).sum();
                reasons.push(format!(
                    "not caught up: lag {lag}, {} in flight, {} buffered",
                    s.in_flight, s.buffered_records
                ));
            }
        }
        reasons
    }

    /// The routes, to mount in an application's router (`Router::merge`, or
    /// `Router::nest("/health", ...)`): `/livez`, `/readyz`, `/status` and `/metrics`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Serves [`router`](Self::router) on `addr` (port `0`: any free port) in a task of its
    /// own, until [`HealthServer::shutdown`] or until the server is dropped. Must be called
    /// within a Tokio runtime.
    ///
    /// A slow or silent client cannot hold the probes up: each connection is closed
    /// [`CONNECTION_LIFETIME`] after it was accepted (a probe's connection needs
    /// milliseconds), and above [`MAX_CONNECTIONS`] open at once new ones are closed at
    /// once. It has no authentication: serve it on a pod or loopback address.
    ///
    /// # Errors
    /// When it cannot listen on `addr`.
    pub async fn serve(&self, addr: impl ToSocketAddrs) -> io::Result<HealthServer> {
        serve_router(addr, self.router()).await
    }
}

/// The health routes for `consumer`, with the default settings: see [`Health::router`].
pub fn router(consumer: impl Into<ConsumerSlot>) -> Router {
    Health::new(consumer).router()
}

/// Serves the health routes for `consumer` on `addr`, with the default settings: see
/// [`Health::serve`].
///
/// # Errors
/// When it cannot listen on `addr`.
pub async fn serve(
    addr: impl ToSocketAddrs,
    consumer: impl Into<ConsumerSlot>,
) -> io::Result<HealthServer> {
    Health::new(consumer).serve(addr).await
}

/// The longest a connection to [`Health::serve`]'s server lives: then it is closed,
/// whatever it is doing (a client reconnects; probes and scrapes take milliseconds).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// The most connections [`Health::serve`]'s server keeps open at once; more are closed as
/// soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// A listener whose connections live at most [`CONNECTION_LIFETIME`], at most
/// [`MAX_CONNECTIONS`] at once.
struct Bounded {
    listener: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Bounded {
    fn new(listener: TcpListener) -> Self {
        Bounded {
            listener,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Expiring;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // E.g. out of file descriptors: back off briefly rather than spin.
                    tracing::debug!(error = %e, "health server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "health server: too many connections; closing this one");
                continue;
            };
            let io = Expiring {
                stream,
                expiry: Box::pin(tokio::time::sleep(CONNECTION_LIFETIME)),
                _slot: slot,
            };
            return (io, peer);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection that fails its reads and writes once its lifetime is over, so the server
/// drops it (and its slot).
struct Expiring {
    stream: tokio::net::TcpStream,
    expiry: std::pin::Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Expiring {
    /// An error once the lifetime is over; else registers the task to be woken when it is.
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> Option<io::Error> {
        self.expiry.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "health server: connection lifetime over",
            )
        })
    }
}

impl tokio::io::AsyncRead for Expiring {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Expiring {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves `app` on `addr` as [`Health::serve`] serves the health routes (in a task of its
/// own, with the same bounds on connections): for the health routes merged with pages of
/// an application's own, e.g. `serve_router(addr, health.router().merge(pages))`.
///
/// # Errors
/// When it cannot listen on `addr`.
pub async fn serve_router(addr: impl ToSocketAddrs, app: Router) -> io::Result<HealthServer> {
    let listener = Bounded::new(TcpListener::bind(addr).await?);
    let local_addr = listener.listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "health server stopped");
        }
    });
    Ok(HealthServer {
        local_addr,
        stop: Some(stop),
        task: Some(task),
    })
}

/// The routes served on their own, from [`Health::serve`] or [`serve_router`]. Dropping it
/// stops the server too (without waiting).
#[derive(Debug)]
pub struct HealthServer {
    local_addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How long [`HealthServer::shutdown`] lets open connections finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl HealthServer {
    /// Where it listens.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    /// Stops taking connections, lets requests being answered finish (at most 5 s, then
    /// closes the rest) and returns once the server has stopped.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn livez(State(health): State<Health>) -> Response {
    verdict_response("live", &health.liveness())
}

async fn readyz(State(health): State<Health>) -> Response {
    verdict_response("ready", &health.readiness())
}

async fn status(State(health): State<Health>) -> Response {
    json_response(StatusCode::OK, &health.status())
}

async fn metrics(State(health): State<Health>) -> Response {
    let Some(render) = health.metrics.clone() else {
        return (
            StatusCode::NOT_FOUND,
            no_store(),
            "no metrics exporter installed\n",
        )
            .into_response();
    };
    (
        StatusCode::OK,
        no_store(),
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        render(),
    )
        .into_response()
}

fn no_store() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))]
}

fn verdict_response(name: &str, verdict: &Verdict) -> Response {
    json_response(
        verdict.status(),
        &json!({ name: verdict.ok, "reasons": verdict.reasons }),
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        no_store(),
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        format!("{body}\n"),
    )
        .into_response()
}

fn failed(s: &ConsumerSnapshot) -> String {
    match &s.failure {
        Some(why) => format!("consumer failed: {why}"),
        None => "consumer failed".to_owned(),
    }
}

fn seconds_since(t: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn connection_str(c: ConnectionState) -> &'static str {
    match c {
        ConnectionState::Starting => "starting",
        ConnectionState::Connected => "connected",
        ConnectionState::Disconnected => "disconnected",
    }
}

/// The snapshot as JSON: field names as in [`ConsumerSnapshot`], times in RFC 3339 (UTC),
/// durations in milliseconds (`_ms`), partitions as `{topic, partition}` objects.
fn snapshot_json(s: &ConsumerSnapshot) -> Value {
    let tp = |v: &[(String, i32)]| -> Vec<Value> {
        v.iter()
            .map(|(topic, partition)| json!({ "topic": topic, "partition": partition }))
            .collect()
    };
    let breaker = s.breaker.as_ref().map(|b| {
        json!({
            "state": b.state.as_str(),
            "since": rfc3339(b.since),
            "opened": b.opened,
            "probes": b.probes,
            "held_failures": b.held_failures,
            "waiting": b.waiting,
            "open_interval_ms": millis(b.open_interval),
            "recent": b.recent.iter().map(|t| json!({
                "from": t.from.as_str(),
                "to": t.to.as_str(),
                "at": rfc3339(t.at),
            })).collect::<Vec<_>>(),
        })
    });
    let destinations = s.destinations.as_ref().map(|d| {
        json!({
            "tracked": d.tracked,
            "open": d.open,
            "untracked": d.untracked,
            "parked": d.parked,
            "top": d.top.iter().map(|t| json!({
                "name": t.name,
                "state": t.state.as_str(),
                "gone": t.gone,
                "since": rfc3339(t.since),
                "opened": t.opened,
                "held_failures": t.held_failures,
                "waiting": t.waiting,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "state": s.state.as_str(),
        "failure": s.failure,
        "since_last_poll_ms": s.since_last_poll.map(millis),
        "connection": connection_str(s.connection),
        "connection_since": rfc3339(s.connection_since),
        "assigned": tp(&s.assigned),
        "paused": tp(&s.paused),
        "partitions": s.partitions.iter().map(|p| json!({
            "topic": p.topic,
            "partition": p.partition,
            "committed": p.committed,
            "end_offset": p.end_offset,
            "lag": p.lag,
            "paused": p.paused,
        })).collect::<Vec<_>>(),
        "caught_up": s.caught_up,
        "in_flight": s.in_flight,
        "waiting_retry": s.waiting_retry,
        "buffered_records": s.buffered_records,
        "buffered_bytes": s.buffered_bytes,
        "outcomes": {
            "handled": s.handled,
            "retried": s.retried,
            "dead_lettered": {
                "decode": s.dead_lettered.decode,
                "permanent": s.dead_lettered.permanent,
                "retries_exhausted": s.dead_lettered.retries_exhausted,
                "panic": s.dead_lettered.panic,
            },
            "duplicates": s.duplicates,
            "forwarded": s.forwarded,
            "panics": s.panics,
            "stalled": s.stalled,
            "abandoned": s.abandoned,
            "skipped_finished": s.skipped_finished,
        },
        "breaker": breaker,
        "destinations": destinations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_slot_is_alive_and_not_ready() {
        let health = Health::new(ConsumerSlot::new());
        assert_eq!(
            health.liveness(),
            Verdict {
                ok: true,
                reasons: vec![]
            }
        );
        let ready = health.readiness();
        assert!(!ready.ok);
        assert_eq!(ready.reasons, ["consumer starting: not built yet"]);
        assert_eq!(health.status()["consumer"], Value::Null);
    }

    fn running_hub() -> Arc<crate::consumer::Hub> {
        let hub = Arc::new(crate::consumer::Hub::idle_for_tests());
        hub.lifecycle.set(RunState::Running);
        hub.set_connected(true);
        hub.lock().assign([(Arc::from("t"), 0)]);
        hub.lifecycle.polled();
        hub
    }

    /// A poll loop that stops going round fails liveness and readiness once the gap passes
    /// the limit, and only then.
    #[test]
    fn a_poll_loop_that_stops_going_round_is_not_alive() {
        let hub = running_hub();
        let health =
            Health::new(ConsumerMonitor { hub: hub.clone() }).max_poll_gap(Duration::from_secs(1));
        assert!(health.liveness().ok, "{:?}", health.liveness());
        assert!(health.readiness().ok, "{:?}", health.readiness());
        std::thread::sleep(Duration::from_millis(1100));
        let live = health.liveness();
        assert!(!live.ok);
        assert_eq!(live.reasons.len(), 1);
        assert!(
            live.reasons[0].starts_with("poll loop stalled: no round for "),
            "{live:?}"
        );
        assert_eq!(health.readiness().reasons, live.reasons);
        // It goes round again: alive.
        hub.lifecycle.polled();
        assert!(health.liveness().ok);
    }

    #[test]
    fn a_disconnected_running_consumer_is_alive_and_not_ready() {
        let hub = running_hub();
        hub.set_connected(false);
        let health = Health::new(ConsumerMonitor { hub });
        assert!(health.liveness().ok);
        let ready = health.readiness();
        assert_eq!(ready.reasons.len(), 1, "{ready:?}");
        assert!(
            ready.reasons[0].starts_with("kafka unreachable since "),
            "{ready:?}"
        );
    }

    #[test]
    fn the_poll_gap_is_bounded_where_it_enters() {
        let h = Health::new(ConsumerSlot::new());
        assert_eq!(
            h.clone().max_poll_gap(Duration::ZERO).max_poll_gap,
            MIN_MAX_POLL_GAP
        );
        assert_eq!(h.max_poll_gap(Duration::MAX).max_poll_gap, MAX_MAX_POLL_GAP);
    }
}
