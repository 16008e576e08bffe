//! The consumer processes the runner starts, signals and watches: how one is spawned, stopped
//! (SIGKILL, or SIGTERM with a grace period), and what its status lines say.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::ledger::Ledgers;
use crate::{BoxResult, log};

pub(crate) struct ConsumerSpawn {
    pub(crate) exe: PathBuf,
    pub(crate) bootstrap: String,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) redis_url: Option<String>,
    pub(crate) seed: u64,
    pub(crate) max_in_flight: usize,
    pub(crate) work_ms: u64,
    pub(crate) work_dir: PathBuf,
    /// The downstream-outage flag file the consumers watch.
    pub(crate) outage_flag: PathBuf,
    /// The consumers run with the outage breaker.
    pub(crate) breaker: bool,
    /// `--compose`: the consumers run with retry tiers keeping key order, the ledger in the
    /// Redis at this URL.
    pub(crate) compose_ledger: Option<String>,
    /// The consumers commit without metadata (`CommitMetadata::None`).
    pub(crate) no_commit_metadata: bool,
    /// `--queue`: the consumers are `QueueConsumer`s fetching this many records at once.
    pub(crate) queue_fetch_size: Option<usize>,
}

impl ConsumerSpawn {
    pub(crate) fn ledger_path(&self, index: usize) -> PathBuf {
        self.work_dir.join(format!("ledger-{index:02}.log"))
    }

    pub(crate) fn out_path(&self, index: usize) -> PathBuf {
        self.work_dir.join(format!("consumer-{index:02}.out"))
    }

    /// The consumer's outcome log (see [`crate::outcomes`]).
    pub(crate) fn outcomes_path(&self, index: usize) -> PathBuf {
        self.work_dir.join(format!("outcomes-{index:02}.log"))
    }

    pub(crate) fn spawn(&self, index: usize, ledgers: &mut Ledgers) -> BoxResult<ConsumerProc> {
        let ledger = self.ledger_path(index);
        ledgers.add(index, ledger.clone());
        ledgers.outcomes.add(self.outcomes_path(index));
        let mut cmd = Command::new(&self.exe);
        cmd.arg("consume")
            .args(["--bootstrap", &self.bootstrap])
            .args(["--topic", &self.topic])
            .args(["--group", &self.group])
            .args(["--seed", &self.seed.to_string()])
            .args(["--max-in-flight", &self.max_in_flight.to_string()])
            .args(["--work-ms", &self.work_ms.to_string()])
            .arg("--ledger")
            .arg(&ledger)
            .arg("--outcomes")
            .arg(self.outcomes_path(index))
            .stdin(Stdio::null())
            .stdout(File::create(self.out_path(index))?)
            .stderr(File::create(
                self.work_dir.join(format!("consumer-{index:02}.log")),
            )?);
        if let Some(url) = &self.redis_url {
            cmd.args(["--redis-url", url]);
        }
        cmd.arg("--outage-flag").arg(&self.outage_flag);
        if self.breaker {
            cmd.arg("--breaker");
        }
        if let Some(url) = &self.compose_ledger {
            cmd.arg("--compose").args(["--ledger-url", url]);
        }
        if self.no_commit_metadata {
            cmd.arg("--no-commit-metadata");
        }
        if let Some(n) = self.queue_fetch_size {
            cmd.args(["--queue-fetch-size", &n.to_string()]);
        }
        let child = cmd.spawn()?;
        log(format!("started consumer #{index} (pid {})", child.id()));
        Ok(ConsumerProc {
            index,
            child,
            out: self.out_path(index),
        })
    }
}

pub(crate) struct ConsumerProc {
    pub(crate) index: usize,
    pub(crate) child: Child,
    /// Its stdout: JSON status lines.
    out: PathBuf,
}

impl ConsumerProc {
    /// The last line of its stdout carrying `field` (`status` or `snapshot`).
    pub(crate) fn last(&self, field: &str) -> Option<serde_json::Value> {
        read_last(&self.out, field)
    }

    /// How many status lines it printed so far.
    pub(crate) fn status_lines(&self) -> usize {
        std::fs::read_to_string(&self.out).map_or(0, |t| {
            t.lines().filter(|l| l.starts_with("{\"status\"")).count()
        })
    }

    /// Waits until it printed a status line (its signal handlers are installed then).
    fn wait_ready(&mut self, timeout: Duration) -> BoxResult<()> {
        let until = Instant::now() + timeout;
        while self.last("status").is_none() {
            if self.child.try_wait()?.is_some() || Instant::now() >= until {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub(crate) fn kill(&mut self) -> BoxResult<ExitStatus> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// SIGTERM, then wait up to `grace` (SIGKILL after that).
    pub(crate) fn terminate(&mut self, grace: Duration) -> BoxResult<ExitStatus> {
        self.wait_ready(Duration::from_secs(30))?;
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        signal(self.child.id(), "TERM")?;
        let until = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= until {
                log(format!(
                    "consumer #{} ignored SIGTERM for {grace:?}; killing it",
                    self.index
                ));
                return self.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ConsumerProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn signal(pid: u32, sig: &str) -> BoxResult<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        return Err(format!("kill -{sig} {pid} failed: {status}").into());
    }
    Ok(())
}

/// The run's consumer processes: the one running now, how to start the next, and what became
/// of the earlier ones.
pub(crate) struct Consumers {
    pub(crate) spawn: ConsumerSpawn,
    pub(crate) current: ConsumerProc,
    pub(crate) children: Vec<ChildRecord>,
}

/// What became of one consumer process.
pub(crate) struct ChildRecord {
    pub(crate) index: usize,
    /// SIGKILLed (its in-flight records may repeat).
    pub(crate) killed: bool,
    /// Its effects at offsets its group had not committed when it died.
    pub(crate) uncommitted_at_kill: Option<u64>,
    /// A zombie: frozen (SIGSTOP) while another consumer took over, then resumed.
    pub(crate) zombie: Option<ZombieRecord>,
}

/// What the runner saw of a zombie.
#[derive(Debug, Clone)]
pub(crate) struct ZombieRecord {
    /// Its records in flight in its last status line before the freeze (at most
    /// `max_in_flight`; status lines come every 500 ms).
    pub(crate) in_flight_at_freeze: u64,
    /// How long it stayed frozen.
    pub(crate) frozen_ms: u64,
    /// When it was resumed (ms since the epoch): its effects written later are late writes.
    pub(crate) resumed_ms: u64,
}

/// The value of `field` in the last JSON line of `path` that has it.
pub(crate) fn read_last(path: &Path, field: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get(field).cloned())
}

/// The consumer's `skipped_finished` so far (`ConsumerSnapshot::skipped_finished`: records
/// it did not deliver because a previous owner of their partition had finished them), as its
/// latest status or snapshot line in `path` says (0 before its first line). Status lines come
/// every 500 ms, so a killed consumer's figure may miss its last half second.
pub(crate) fn skipped_finished(path: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    // The counter only grows: the highest figure is the latest.
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            ["status", "snapshot"]
                .iter()
                .find_map(|f| v.get(*f)?.get("skipped_finished")?.as_u64())
        })
        .max()
        .unwrap_or(0)
}

/// Whether a consumer status shows it idle: every partition assigned (`partitions`: of the
/// source and tier topics together), none paused, nothing in flight or buffered.
pub(crate) fn idle(status: &serde_json::Value, partitions: i32) -> bool {
    status["paused"].as_array().is_some_and(Vec::is_empty)
        && status["assigned"]
            .as_array()
            .is_some_and(|a| a.len() == partitions as usize)
        && status["in_flight"] == 0
        && status["buffered_records"] == 0
}
