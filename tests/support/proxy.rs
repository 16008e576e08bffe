//! A small TCP proxy for network-fault tests: it forwards loopback connections to an upstream
//! address and, on command, delays every byte, cuts every open connection, or refuses new
//! ones for a while.
//!
//! Kafka clients connect to the address a broker *advertises*, not the one they bootstrapped
//! from, so the proxy only sits in the path of a broker that advertises the proxy's address
//! (tests/network_faults.rs starts such a broker).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A running proxy; it stops (and closes its connections) when dropped.
#[derive(Debug)]
pub(crate) struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    /// Added to every chunk in each direction, in microseconds.
    latency_us: AtomicU64,
    /// New connections are closed at once while set.
    refusing: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    bytes: AtomicU64,
    /// The tasks of open connections, to cut them.
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    /// Listens on `listen` (port 0: any free port) and forwards to `upstream`.
    pub(crate) async fn start(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("proxy cannot listen on {listen}: {e}"));
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        let accept_state = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // E.g. out of file descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Checked and recorded under the connections' lock: a connection accepted
                // while `set_refusing(true)` and `cut_all` run is either refused or cut, never
                // left open (checked outside it, one could be recorded after the cut).
                let mut connections = accept_state.connections.lock().unwrap();
                if accept_state.refusing.load(Ordering::SeqCst) {
                    accept_state.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                accept_state.accepted.fetch_add(1, Ordering::SeqCst);
                let task = tokio::spawn(serve(client, upstream, accept_state.clone()));
                connections.retain(|t| !t.is_finished());
                connections.push(task);
            }
        });
        Proxy {
            addr,
            state,
            accept,
        }
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Delays every chunk by `latency` in each direction (so a round trip by twice that).
    pub(crate) fn set_latency(&self, latency: Duration) {
        self.state
            .latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    /// Closes every open connection now; returns how many there were.
    pub(crate) fn cut_all(&self) -> usize {
        let connections = std::mem::take(&mut *self.state.connections.lock().unwrap());
        let open = connections.iter().filter(|t| !t.is_finished()).count();
        for task in connections {
            task.abort();
        }
        open
    }

    /// While `refusing`, new connections are accepted and closed at once (like a server
    /// that is down); open ones are not touched (see [`cut_all`](Self::cut_all)).
    pub(crate) fn set_refusing(&self, refusing: bool) {
        self.state.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Connections forwarded so far.
    pub(crate) fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused so far.
    pub(crate) fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far, both directions.
    pub(crate) fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, state: Arc<State>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // dropping the client closes it, as an unreachable server would
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction ending ends the connection (and aborting this task drops both).
    tokio::select! {
        () = pipe(client_read, server_write, state.clone()) => {}
        () = pipe(server_read, client_write, state) => {}
    }
}

/// Copies `from` to `to`, each chunk no earlier than `latency` after it was read: a reader
/// task stamps chunks, this task writes them when due, so latency does not cut throughput.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader_state = state.clone();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let latency =
                        Duration::from_micros(reader_state.latency_us.load(Ordering::SeqCst));
                    if tx
                        .send((Instant::now() + latency, buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            state.bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown().await;
    };
    // The writer drains what the reader stamped before the reader ended.
    let (_, ()) = tokio::join!(reader, writer);
}
