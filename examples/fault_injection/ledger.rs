//! The ledger of side effects: each consumer process appends one line per effect to a file of
//! its own (and counts the effect done only once the line is on disk); the runner reads every
//! file back as it grows. The line format is written and parsed here.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::event::Event;
use crate::outcomes::Outcomes;

// ---------------------------------------------------------------------------------------------
// Writing (in the consumer process)

/// Appends ledger lines from a dedicated thread, one `sync_data` per batch; `append` returns
/// once its line is on disk.
pub(crate) struct Ledger {
    tx: mpsc::Sender<LedgerWrite>,
}

/// A line to append, and who to tell once it is on disk.
type LedgerWrite = (Vec<u8>, tokio::sync::oneshot::Sender<Result<(), String>>);

impl Ledger {
    pub(crate) fn open(path: &Path) -> std::io::Result<Ledger> {
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::channel::<LedgerWrite>();
        std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < 512 {
                        match rx.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    let buf: Vec<u8> = batch.iter().flat_map(|(l, _)| l.iter().copied()).collect();
                    let result = file
                        .write_all(&buf)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| e.to_string());
                    for (_, done) in batch {
                        let _ = done.send(result.clone());
                    }
                }
            })?;
        Ok(Ledger { tx })
    }

    pub(crate) async fn append(&self, line: String) -> Result<(), String> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send((line.into_bytes(), done))
            .map_err(|_| "ledger thread gone".to_owned())?;
        wait.await.map_err(|_| "ledger thread gone".to_owned())?
    }
}

/// One ledger line: `id key seq attempt pid partition offset time_ms tier`. `partition` and
/// `offset` are those of the record the handler got: of the tier topic for a tier record
/// (`tier` > 0), whose `attempt` is counted over every stage (see `--compose`).
pub(crate) fn line(
    ev: &Event,
    attempt: u32,
    pid: u32,
    partition: i32,
    offset: i64,
    tier: u32,
) -> String {
    format!(
        "{} {} {} {} {} {} {} {} {tier}\n",
        ev.id,
        ev.key,
        ev.seq,
        attempt,
        pid,
        partition,
        offset,
        now_ms()
    )
}

/// Milliseconds since the epoch, the time every ledger and outcome line carries.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The line noting that a downstream outage failed `attempt` of event `id`.
pub(crate) fn outage_line(id: u64, attempt: u32) -> String {
    format!("outage {id} {attempt}\n")
}

// ---------------------------------------------------------------------------------------------
// Reading (in the runner)

#[derive(Debug, Clone)]
pub(crate) struct Effect {
    pub(crate) id: u64,
    pub(crate) key: String,
    pub(crate) seq: u64,
    pub(crate) attempt: u32,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The tier the record was in (0: the source topic).
    pub(crate) tier: u32,
    /// Which consumer process wrote it.
    pub(crate) child: usize,
    /// When it was written (ms since the epoch): orders effects of concurrent processes.
    pub(crate) time_ms: u64,
}

struct LedgerFile {
    child: usize,
    path: PathBuf,
    pos: u64,
    partial: Vec<u8>,
}

/// Every ledger line read so far, in write order (consumer processes one after another).
pub(crate) struct Ledgers {
    files: Vec<LedgerFile>,
    pub(crate) effects: Vec<Effect>,
    /// Effects per id.
    pub(crate) count: Vec<u32>,
    /// Ids with at least one effect.
    pub(crate) distinct: usize,
    /// Per id, the highest attempt a downstream outage failed (0: none).
    pub(crate) outage_attempt: Vec<u32>,
    /// Ids whose last attempt a downstream outage failed: dead-lettered by the outage.
    pub(crate) outage_exhausted: usize,
    pub(crate) malformed: Vec<String>,
    /// Attempts an event gets in all: an outage failure of the last one dead-letters it.
    max_attempts: u32,
    /// The consumers' outcome logs, read along.
    pub(crate) outcomes: Outcomes,
}

impl Ledgers {
    pub(crate) fn new(events: usize, max_attempts: u32) -> Ledgers {
        Ledgers {
            max_attempts,
            outcomes: Outcomes::new(events),
            files: Vec::new(),
            effects: Vec::new(),
            count: vec![0; events],
            distinct: 0,
            outage_attempt: vec![0; events],
            outage_exhausted: 0,
            malformed: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, child: usize, path: PathBuf) {
        self.files.push(LedgerFile {
            child,
            path,
            pos: 0,
            partial: Vec::new(),
        });
    }

    /// Reads what was appended since the last call (complete lines only), outcome logs
    /// included.
    pub(crate) fn poll(&mut self) {
        self.outcomes.poll();
        for f in &mut self.files {
            let Ok(mut file) = File::open(&f.path) else {
                continue;
            };
            if file.seek(SeekFrom::Start(f.pos)).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            if file.read_to_end(&mut buf).is_err() {
                continue;
            }
            f.pos += buf.len() as u64;
            f.partial.extend_from_slice(&buf);
            let Some(end) = f.partial.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let complete: Vec<u8> = f.partial.drain(..=end).collect();
            for line in String::from_utf8_lossy(&complete).lines() {
                if let Some(rest) = line.strip_prefix("outage ") {
                    match parse_outage(rest) {
                        Some((id, attempt)) if (id as usize) < self.count.len() => {
                            let a = &mut self.outage_attempt[id as usize];
                            if attempt >= self.max_attempts && *a < self.max_attempts {
                                self.outage_exhausted += 1;
                            }
                            *a = (*a).max(attempt);
                        }
                        _ => self.malformed.push(line.to_owned()),
                    }
                    continue;
                }
                match parse_effect(line, f.child) {
                    Some(e) if (e.id as usize) < self.count.len() => {
                        let c = &mut self.count[e.id as usize];
                        if *c == 0 {
                            self.distinct += 1;
                        }
                        *c += 1;
                        self.effects.push(e);
                    }
                    _ => self.malformed.push(line.to_owned()),
                }
            }
        }
    }
}

impl Ledgers {
    /// Ids a downstream outage dead-lettered (their last attempt failed by it) that have no
    /// effect: with the effects, they account for every event expected to succeed.
    pub(crate) fn outage_dead_lettered(&self) -> usize {
        if self.outage_exhausted == 0 {
            return 0;
        }
        self.outage_attempt
            .iter()
            .zip(&self.count)
            .filter(|&(&a, &c)| a >= self.max_attempts && c == 0)
            .count()
    }
}

fn parse_outage(rest: &str) -> Option<(u64, u32)> {
    let (id, attempt) = rest.split_once(' ')?;
    Some((id.parse().ok()?, attempt.parse().ok()?))
}

fn parse_effect(line: &str, child: usize) -> Option<Effect> {
    let mut it = line.split(' ');
    let id = it.next()?.parse().ok()?;
    let key = it.next()?.to_owned();
    let seq = it.next()?.parse().ok()?;
    let attempt = it.next()?.parse().ok()?;
    let _pid: u32 = it.next()?.parse().ok()?;
    let partition = it.next()?.parse().ok()?;
    let offset = it.next()?.parse().ok()?;
    let time_ms = it.next()?.parse().ok()?;
    // Absent in lines of runs without tiers.
    let tier = match it.next() {
        Some(t) => t.parse().ok()?,
        None => 0,
    };
    Some(Effect {
        tier,
        id,
        key,
        seq,
        attempt,
        partition,
        offset,
        child,
        time_ms,
    })
}
