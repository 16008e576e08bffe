//! Throwaway `redis-server` processes for tests that stop, restart or pause Redis (or build a
//! cluster): each listens on a free loopback port, in its own directory, and is killed when
//! dropped, also when the test fails.
//!
//! The functions here block (they spawn processes and poll with `redis-cli`): from an async
//! test on the multi-thread runtime, call them inside `tokio::task::block_in_place` when other
//! tasks must keep running meanwhile.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Fails the test unless `name` (`redis-server`, `redis-cli`) runs.
pub(crate) fn require_binary(name: &str) {
    if let Err(err) = Command::new(name).arg("--version").output() {
        panic!(
            "`{name}` is not on PATH ({err}): install it with `apt-get install redis-server` \
             (`scripts/services up` installs it)"
        );
    }
}

/// A loopback port that is free, with its cluster bus port (port + 10000) free too, and not
/// in `taken`.
pub(crate) fn free_port(taken: &[u16]) -> u16 {
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..30_000);
        if taken.contains(&port) {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free loopback port found");
}

/// A temporary directory, deleted on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir, named after `name`.
    pub(crate) fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "kourier-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` child process (no persistence), killed on drop.
#[derive(Debug)]
pub(crate) struct RedisServer {
    child: Option<Child>,
    pub(crate) port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    log: PathBuf,
    /// The directory, when the server made its own (see [`RedisServer::start_on_free_port`]).
    /// Declared last: it is removed after the process is killed.
    _own_dir: Option<TempDir>,
}

impl RedisServer {
    /// Starts `redis-server` on `port` with its files in `dir` and the `extra` arguments, and
    /// waits until it answers `PING`.
    pub(crate) fn start(port: u16, dir: &Path, extra: &[&str]) -> Self {
        let mut server = RedisServer {
            child: None,
            port,
            dir: dir.to_owned(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            log: dir.join(format!("redis-{port}.log")),
            _own_dir: None,
        };
        server.spawn();
        server
    }

    /// Starts a plain server on a free port in a temporary directory of its own (named after
    /// `name`), deleted with the server.
    pub(crate) fn start_on_free_port(name: &str) -> Self {
        let dir = TempDir::new(name);
        let mut server = RedisServer::start(free_port(&[]), dir.path(), &[]);
        server._own_dir = Some(dir);
        server
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs `redis-cli` against this server; returns its stdout and stderr.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// Whether the process was started and not killed since.
    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server at once (SIGKILL) and waits for the process to end. Its data is gone
    /// (no persistence). Does nothing when it is not running.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, then starts a fresh (empty) one on the same port, with the
    /// same directory and arguments, and waits until it answers `PING`.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        require_binary("redis-server");
        let port = self.port;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&self.log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start redis-server on port {port}: {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if self.cli(&["ping"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}; log:\n{}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args>`; returns its stdout and stderr.
pub(crate) fn redis_cli(port: u16, args: &[&str]) -> String {
    require_binary("redis-cli");
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
