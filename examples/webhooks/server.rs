//! A small HTTP server on loopback for the demo and its test: webhook endpoints
//! (`POST /hooks/<endpoint id>`, `axum`) that fail on purpose, by the endpoint's name.
//!
//! | endpoint id      | answers                                                                |
//! |------------------|------------------------------------------------------------------------|
//! | `healthy-*`      | `200`                                                                  |
//! | `flaky-*`        | `500` to its calls 2 to 4, `503` to call 7, `500` to call 9; else `200` |
//! | `ratelimited-*`  | `200` to 5 calls a second; past that `429` with `Retry-After` (seconds until the next second's window) |
//! | `gone-*`         | `410 Gone`                                                             |
//! | `rejecting-*`    | `422 Unprocessable Entity`                                             |
//! | `down-*`         | `200`, on a second address that refuses connections while the server has it down ([`TestServer::set_down`]) |
//!
//! A flaky endpoint's script, with the sender's settings (3 attempts in place, key order):
//! one webhook fails its three attempts in place (calls 2 to 4) and goes to the first retry
//! tier, the endpoint's later webhooks wait behind it; a `503` pauses the endpoint for its
//! open interval; one webhook is retried once in place. A body that is not JSON gets `400`,
//! an unknown endpoint `404`.
//!
//! Every request is kept ([`TestServer::calls`]): what was asked, when, and the answer.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::event::WEBHOOK_ID_HEADER;

/// How an endpoint answers: the first part of its id (`flaky-2` is [`Behaviour::Flaky`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Behaviour {
    Healthy,
    Flaky,
    RateLimited,
    Down,
    Gone,
    Rejecting,
}

impl Behaviour {
    pub(crate) const ALL: [Behaviour; 6] = [
        Behaviour::Healthy,
        Behaviour::Flaky,
        Behaviour::RateLimited,
        Behaviour::Down,
        Behaviour::Gone,
        Behaviour::Rejecting,
    ];

    /// The first part of the ids of endpoints that answer so.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Behaviour::Healthy => "healthy",
            Behaviour::Flaky => "flaky",
            Behaviour::RateLimited => "ratelimited",
            Behaviour::Down => "down",
            Behaviour::Gone => "gone",
            Behaviour::Rejecting => "rejecting",
        }
    }

    /// The behaviour of endpoint `id` (`<prefix>-<n>`).
    pub(crate) fn of(id: &str) -> Option<Behaviour> {
        let (prefix, _) = id.rsplit_once('-')?;
        Behaviour::ALL.into_iter().find(|b| b.prefix() == prefix)
    }
}

/// The flaky endpoints' failures: (call number, status).
pub(crate) const FLAKY_SCRIPT: [(u32, u16); 5] = [(2, 500), (3, 500), (4, 500), (7, 503), (9, 500)];
/// A rate-limited endpoint takes this many calls ...
pub(crate) const RATE_LIMIT_CALLS: u32 = 5;
/// ... per window of this long (a window starts at the first call after the last one ended).
pub(crate) const RATE_LIMIT_WINDOW: Duration = Duration::from_secs(1);

/// One request the server answered.
#[derive(Debug, Clone)]
pub(crate) struct ServerCall {
    pub(crate) endpoint_id: String,
    /// Its `webhook-id` header.
    pub(crate) event_id: Option<String>,
    pub(crate) status: u16,
    /// The `Retry-After` it answered with, in seconds.
    pub(crate) retry_after: Option<u64>,
    /// When it arrived.
    pub(crate) at: Instant,
}

#[derive(Debug, Default)]
struct Shared {
    calls: Mutex<Vec<ServerCall>>,
    endpoints: Mutex<HashMap<String, EndpointState>>,
}

#[derive(Debug, Default)]
struct EndpointState {
    calls: u32,
    /// The rate limit's window: when it started, calls taken in it.
    window: Option<(Instant, u32)>,
}

/// The second address, for `down-*` endpoints.
#[derive(Debug)]
enum DownHost {
    /// Bound, not listening: connecting is refused, and the address stays ours.
    Refusing(TcpSocket),
    Serving(Serving),
}

#[derive(Debug)]
struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A running server; stops when dropped.
#[derive(Debug)]
pub(crate) struct TestServer {
    addr: SocketAddr,
    down_addr: SocketAddr,
    shared: Arc<Shared>,
    /// `None` only when a change failed halfway.
    down_host: tokio::sync::Mutex<Option<DownHost>>,
    _main: Serving,
}

impl TestServer {
    /// Serves at `addr`, and the `down-*` endpoints at `down_addr` (port 0: a free port for
    /// either), the latter refusing connections from the start when `down`.
    pub(crate) async fn start(
        addr: SocketAddr,
        down_addr: SocketAddr,
        down: bool,
    ) -> io::Result<TestServer> {
        let shared = Arc::new(Shared::default());
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let main = serve(listener, &shared);
        let socket = reserve(down_addr)?;
        let down_addr = socket.local_addr()?;
        let server = TestServer {
            addr,
            down_addr,
            shared,
            down_host: tokio::sync::Mutex::new(Some(DownHost::Refusing(socket))),
            _main: main,
        };
        if !down {
            server.set_down(false).await?;
        }
        Ok(server)
    }

    /// Takes the `down-*` endpoints' address down (connections are refused; open ones are
    /// closed once their request is answered) or brings it back, on the same address.
    pub(crate) async fn set_down(&self, down: bool) -> io::Result<()> {
        let mut host = self.down_host.lock().await;
        let next = match (host.take(), down) {
            (Some(DownHost::Serving(serving)), true) => {
                let _ = serving.stop.send(());
                let _ = serving.task.await;
                DownHost::Refusing(reserve(self.down_addr)?)
            }
            (Some(DownHost::Refusing(socket)), false) => {
                DownHost::Serving(serve(socket.listen(1024)?, &self.shared))
            }
            (Some(unchanged), _) => unchanged,
            // A change that failed halfway: from scratch.
            (None, true) => DownHost::Refusing(reserve(self.down_addr)?),
            (None, false) => {
                DownHost::Serving(serve(reserve(self.down_addr)?.listen(1024)?, &self.shared))
            }
        };
        *host = Some(next);
        Ok(())
    }

    /// Where the endpoints are served.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the `down-*` endpoints are served (when they are up).
    pub(crate) fn down_addr(&self) -> SocketAddr {
        self.down_addr
    }

    /// Every request answered so far, in arrival order.
    pub(crate) fn calls(&self) -> Vec<ServerCall> {
        lock(&self.shared.calls).clone()
    }
}

/// The URL of endpoint `id` on a server whose endpoints are at `base` and whose `down-*`
/// endpoints are at `down_base` (`http://host:port`).
pub(crate) fn endpoint_url(base: &str, down_base: &str, id: &str) -> String {
    let base = if Behaviour::of(id) == Some(Behaviour::Down) {
        down_base
    } else {
        base
    };
    format!("{}/hooks/{id}", base.trim_end_matches('/'))
}

/// A socket bound to `addr` that does not listen (connections to it are refused).
fn reserve(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn serve(listener: TcpListener, shared: &Arc<Shared>) -> Serving {
    let app = Router::new()
        .route("/hooks/{endpoint}", post(hook))
        .with_state(shared.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            // A send, or the sender dropped with the server.
            let _ = stopped.await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "webhook test server stopped");
        }
    });
    Serving { stop, task }
}

async fn hook(
    State(shared): State<Arc<Shared>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let event_id = headers
        .get(WEBHOOK_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let is_json = serde_json::from_slice::<serde_json::Value>(&body).is_ok();
    let (status, retry_after, text) = shared.answer(&endpoint, event_id, is_json);
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        text,
    )
        .into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

impl Shared {
    /// Decides the answer to a call of `endpoint` arriving now (its body JSON or not), and
    /// keeps the call.
    fn answer(
        &self,
        endpoint: &str,
        event_id: Option<String>,
        is_json: bool,
    ) -> (u16, Option<u64>, &'static str) {
        let mut endpoints = lock(&self.endpoints);
        let now = Instant::now();
        let state = endpoints.entry(endpoint.to_owned()).or_default();
        state.calls += 1;
        let (status, retry_after, text) = match Behaviour::of(endpoint) {
            _ if !is_json => (400, None, "the body is not JSON"),
            None => (404, None, "no such endpoint"),
            Some(Behaviour::Healthy | Behaviour::Down) => (200, None, "ok"),
            Some(Behaviour::Gone) => (410, None, "this endpoint was deleted"),
            Some(Behaviour::Rejecting) => (422, None, "unknown event type"),
            Some(Behaviour::Flaky) => match FLAKY_SCRIPT.iter().find(|(n, _)| *n == state.calls) {
                Some((_, 503)) => (503, None, "restarting"),
                Some((_, status)) => (*status, None, "internal error"),
                None => (200, None, "ok"),
            },
            Some(Behaviour::RateLimited) => {
                let (start, taken) = match state.window {
                    Some((start, taken)) if now < start + RATE_LIMIT_WINDOW => (start, taken),
                    _ => (now, 0),
                };
                if taken < RATE_LIMIT_CALLS {
                    state.window = Some((start, taken + 1));
                    (200, None, "ok")
                } else {
                    state.window = Some((start, taken));
                    // Whole seconds (as HTTP has them), rounded up: the window has ended by then.
                    let left = (start + RATE_LIMIT_WINDOW).saturating_duration_since(now);
                    let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                    (429, Some(seconds.max(1)), "slow down")
                }
            }
        };
        lock(&self.calls).push(ServerCall {
            endpoint_id: endpoint.to_owned(),
            event_id,
            status,
            retry_after,
            at: now,
        });
        (status, retry_after, text)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
