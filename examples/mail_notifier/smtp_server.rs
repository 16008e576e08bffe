//! A small SMTP server on loopback for the demo and its test: a real SMTP conversation
//! (`mailin-embedded`, blocking, in its own threads), with failures on purpose.
//!
//! - Every accepted mail is written to `<outbox>/<event id>.eml` (the id is taken from the
//!   mail's `Message-ID`; `mail-<n>.eml` when there is none; `-2`, `-3`, ... are appended
//!   rather than overwrite a file) and kept in memory.
//! - `RCPT TO` an address at [`REJECTED_DOMAIN`] is refused with `550` (permanent).
//! - The *first* `RCPT TO` of each address whose local part starts with [`FLAKY_PREFIX`] is
//!   deferred with `451` (transient); the next try is accepted, as a greylisting server does.
//!   (Per address, not per mail: mailin cannot fail a mail at the end of `DATA` cleanly — its
//!   session stays in the `DATA` state and takes the client's `QUIT` for mail text. The demo
//!   puts its run id into the flaky address, `flaky+<run id>@...`, so each run fails once.)
//! - [`SmtpServer::set_refusing`] simulates an outage: while it is on, nothing listens on the
//!   server's address (connections are refused) and open connections are cut. Clients
//!   connect to a small front door that pipes each connection to mailin's own listener, which
//!   is what makes this possible (mailin cannot stop listening).
//! - Each mail records the SMTP session it came in ([`ReceivedMail::session`]), so a test can
//!   tell how many mails shared a connection.
//!
//! `mailin-embedded` has no shutdown handle: the server lives until the process ends.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mailin_embedded::{Handler, Response, Server, SslConfig, response};

/// Recipients at this domain are refused with `550`.
pub(crate) const REJECTED_DOMAIN: &str = "bounce.invalid";
/// The first `RCPT TO` of each address whose local part starts with this gets `451`.
pub(crate) const FLAKY_PREFIX: &str = "flaky";

/// One accepted mail.
#[derive(Debug, Clone)]
pub(crate) struct ReceivedMail {
    /// `MAIL FROM` address.
    #[allow(dead_code)] // read by tests/mail_notifier.rs
    pub(crate) from: String,
    /// `RCPT TO` addresses.
    pub(crate) to: Vec<String>,
    /// The `Message-ID` header without angle brackets, if the mail has one.
    #[allow(dead_code)] // read by tests/mail_notifier.rs
    pub(crate) message_id: Option<String>,
    /// The `.eml` file it was written to.
    pub(crate) path: PathBuf,
    /// The SMTP session (connection) it came in, numbered from 1 in the order of their first
    /// `MAIL FROM`.
    #[allow(dead_code)] // read by tests/mail_notifier.rs
    pub(crate) session: u64,
}

/// A running server; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct SmtpServer {
    addr: SocketAddr,
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    outbox: PathBuf,
    /// Flaky addresses already deferred once.
    deferred: Mutex<HashSet<String>>,
    received: Mutex<Vec<ReceivedMail>>,
    /// The simulated outage is on.
    refusing: AtomicBool,
    /// Both ends of every piped connection (by a connection number), to cut them when the
    /// outage begins.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
    connections: AtomicU64,
    /// SMTP sessions that sent `MAIL FROM`.
    sessions: AtomicU64,
}

impl SmtpServer {
    /// Binds `addr` (`127.0.0.1:0` picks a free port), creates `outbox` and serves in the
    /// background.
    pub(crate) fn start(addr: &str, outbox: impl Into<PathBuf>) -> io::Result<Self> {
        let outbox = outbox.into();
        fs::create_dir_all(&outbox)?;
        let front = TcpListener::bind(addr)?;
        let addr = front.local_addr()?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let backend = listener.local_addr()?;
        let state = Arc::new(State {
            outbox,
            deferred: Mutex::new(HashSet::new()),
            received: Mutex::new(Vec::new()),
            refusing: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
            connections: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
        });
        let mut server = Server::new(Session::new(state.clone()));
        server
            .with_name("mail-notifier.local")
            .with_ssl(SslConfig::None)
            .map_err(|e| io::Error::other(e.to_string()))?
            // One thread per session. lettre's pool keeps idle connections open (each holds
            // a thread here), so this must stay above the client's pool size.
            .with_num_threads(16)
            .with_tcp_listener(listener);
        std::thread::Builder::new()
            .name("smtp-server".into())
            .spawn(move || {
                if let Err(e) = server.serve() {
                    eprintln!("smtp server stopped: {e}");
                }
            })?;
        let front_state = state.clone();
        std::thread::Builder::new()
            .name("smtp-front".into())
            .spawn(move || serve_front(front, addr, backend, &front_state))?;
        Ok(SmtpServer { addr, state })
    }

    /// Turns the simulated outage on (connections to [`addr`](Self::addr) are refused, open
    /// ones are cut) or off (the server listens again, on the same address).
    pub(crate) fn set_refusing(&self, refusing: bool) {
        self.state.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Where the server listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The folder the `.eml` files are written to.
    pub(crate) fn outbox(&self) -> &Path {
        &self.state.outbox
    }

    /// Every mail accepted so far, in arrival order.
    pub(crate) fn received(&self) -> Vec<ReceivedMail> {
        lock(&self.state.received).clone()
    }
}

/// One SMTP connection's state (mailin clones the handler per connection; a pooled client
/// sends several mails over one connection, so `MAIL FROM` starts a fresh transaction).
#[derive(Clone)]
struct Session {
    state: Arc<State>,
    /// This connection's number, given at its first `MAIL FROM`.
    number: Option<u64>,
    from: String,
    to: Vec<String>,
    data: Vec<u8>,
}

impl Session {
    fn new(state: Arc<State>) -> Self {
        Session {
            state,
            number: None,
            from: String::new(),
            to: Vec::new(),
            data: Vec::new(),
        }
    }

    fn save(&mut self) -> io::Result<()> {
        let message_id = header_value(&self.data, "message-id").map(|v| {
            v.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        });
        let mut received = lock(&self.state.received);
        let stem = message_id
            .as_deref()
            .and_then(|id| id.split('@').next())
            .map(file_stem)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("mail-{}", received.len() + 1));
        // A second mail for one event (which must not happen) gets `-2`, `-3`, ...: visible.
        let mut path = self.state.outbox.join(format!("{stem}.eml"));
        let mut n = 1;
        while path.exists() {
            n += 1;
            path = self.state.outbox.join(format!("{stem}-{n}.eml"));
        }
        fs::write(&path, &self.data)?;
        received.push(ReceivedMail {
            from: std::mem::take(&mut self.from),
            to: std::mem::take(&mut self.to),
            message_id,
            path,
            session: self.number.unwrap_or_default(),
        });
        Ok(())
    }
}

impl Handler for Session {
    fn mail(&mut self, _ip: IpAddr, _domain: &str, from: &str) -> Response {
        if self.number.is_none() {
            self.number = Some(self.state.sessions.fetch_add(1, Ordering::SeqCst) + 1);
        }
        self.from = from.to_owned();
        self.to.clear();
        self.data.clear();
        response::OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        let address = to
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_ascii_lowercase();
        if address
            .rsplit_once('@')
            .is_some_and(|(_, domain)| domain == REJECTED_DOMAIN)
        {
            return Response::custom(
                550,
                format!("5.1.1 <{address}>: mailbox unavailable (this domain always bounces)"),
            );
        }
        let flaky = address.starts_with(FLAKY_PREFIX);
        if flaky && lock(&self.state.deferred).insert(address.clone()) {
            return Response::custom(
                451,
                format!("4.7.1 <{address}>: greylisted, please try again later"),
            );
        }
        self.to.push(address);
        response::OK
    }

    fn data_start(
        &mut self,
        _domain: &str,
        _from: &str,
        _is8bit: bool,
        _to: &[String],
    ) -> Response {
        self.data.clear();
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        match self.save() {
            Ok(()) => response::OK,
            Err(e) => {
                eprintln!("smtp server: cannot write the mail: {e}");
                // A 4xx that closes the connection: after any other error reply to the end of
                // DATA, mailin stays in the DATA state (see the module docs).
                Response::custom(421, "4.3.0 cannot store the mail now, closing".into())
            }
        }
    }
}

/// The front door: pipes each connection to mailin at `backend`; while the outage is on, it
/// does not listen at all (so connecting is refused, as with a relay that is down).
fn serve_front(first: TcpListener, addr: SocketAddr, backend: SocketAddr, state: &Arc<State>) {
    let mut listener = Some(first);
    loop {
        if state.refusing.load(Ordering::SeqCst) {
            if listener.take().is_some() {
                for ends in lock(&state.open).values() {
                    for stream in ends {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if listener.is_none() {
            // Same address again (std sets SO_REUSEADDR on Unix).
            match TcpListener::bind(addr) {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        let Some(l) = &listener else { continue };
        if l.set_nonblocking(true).is_err() {
            continue;
        }
        match l.accept() {
            Ok((client, _)) => pipe(client, backend, state.clone()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Copies bytes both ways between `client` and a new connection to `backend`.
fn pipe(client: TcpStream, backend: SocketAddr, state: Arc<State>) {
    let Ok(server) = TcpStream::connect(backend) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    let (Ok(client_r), Ok(server_r), Ok(client_cut), Ok(server_cut)) = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    ) else {
        return;
    };
    let id = state.connections.fetch_add(1, Ordering::SeqCst);
    lock(&state.open).insert(id, [client_cut, server_cut]);
    let copy = |mut from: TcpStream, mut to: TcpStream, done: Option<Arc<State>>| {
        move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
            if let Some(state) = done {
                lock(&state.open).remove(&id);
            }
        }
    };
    let _ = std::thread::Builder::new()
        .name("smtp-pipe".into())
        .spawn(copy(client_r, server, None));
    let _ = std::thread::Builder::new()
        .name("smtp-pipe".into())
        .spawn(copy(server_r, client, Some(state)));
}

/// The first value of header `name` (case-insensitive) in a raw mail's header block.
fn header_value(mail: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(mail);
    let headers = text.split("\r\n\r\n").next().unwrap_or_default();
    headers.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// A file name made of the safe characters of `s`.
fn file_stem(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
