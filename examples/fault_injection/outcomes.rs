//! The outcome log: each consumer process notes every record's outcome (what its
//! `on_outcome` observer is told) in a file of its own, one line each, written at once (no
//! buffering, so a SIGKILL right after keeps it); the runner reads every file back as it
//! grows, and tails the current consumer's to kill it right after a dead letter.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kourier::{RawRecord, RecordOutcome};

use crate::event::Event;
use crate::ledger::now_ms;

// ---------------------------------------------------------------------------------------------
// Writing (in the consumer process)

/// Appends one line per outcome: `time_ms outcome id tier partition offset`, where `outcome`
/// is `handled`, `duplicate`, `dead-lettered/<kind>`, `forwarded/<tier>`, `abandoned` or
/// `left-for-later` (`RecordOutcome::as_str` for the others), `id`
/// the event's (`-` when the value is not an event), `tier` the tier the record was in (0:
/// the source topic) and `partition`/`offset` the record's in that topic.
pub(crate) struct OutcomeLog {
    file: Mutex<File>,
}

impl OutcomeLog {
    pub(crate) fn open(path: &Path) -> std::io::Result<OutcomeLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(OutcomeLog {
            file: Mutex::new(file),
        })
    }

    pub(crate) fn note(&self, record: &RawRecord, outcome: RecordOutcome, tier: u32) {
        let id = record
            .value
            .as_deref()
            .and_then(|v| serde_json::from_slice::<Event>(v).ok())
            .map_or("-".to_owned(), |e| e.id.to_string());
        let what = match outcome {
            RecordOutcome::DeadLettered(kind) => format!("dead-lettered/{}", kind.as_str()),
            RecordOutcome::Forwarded(tier) => format!("forwarded/{tier}"),
            other => other.as_str().to_owned(),
        };
        let line = format!(
            "{} {what} {id} {tier} {} {}\n",
            now_ms(),
            record.partition,
            record.offset
        );
        // One write(2) per line (O_APPEND): in the kernel before the observer returns.
        if let Ok(mut f) = self.file.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading (in the runner)

/// What happened to a record, as its outcome line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Handled,
    Duplicate,
    /// With the failure kind (`permanent`, `retries-exhausted`, ...).
    DeadLettered(String),
    Forwarded(u32),
    Abandoned,
}

#[derive(Debug, Clone)]
pub(crate) struct OutcomeLine {
    pub(crate) time_ms: u64,
    pub(crate) kind: Kind,
    pub(crate) id: Option<u64>,
    pub(crate) tier: u32,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// One outcome line; `None` for a line it does not count, such as `left-for-later` (a tier
/// record not yet due at a stop: nothing of it ran).
pub(crate) fn parse(line: &str) -> Option<OutcomeLine> {
    let mut it = line.split(' ');
    let time_ms = it.next()?.parse().ok()?;
    let kind = match it.next()? {
        "handled" => Kind::Handled,
        "duplicate" => Kind::Duplicate,
        "abandoned" => Kind::Abandoned,
        other => match other.split_once('/')? {
            ("dead-lettered", kind) => Kind::DeadLettered(kind.to_owned()),
            ("forwarded", tier) => Kind::Forwarded(tier.parse().ok()?),
            _ => return None,
        },
    };
    let id = it.next()?.parse().ok();
    let tier = it.next()?.parse().ok()?;
    let partition = it.next()?.parse().ok()?;
    let offset = it.next()?.parse().ok()?;
    Some(OutcomeLine {
        time_ms,
        kind,
        id,
        tier,
        partition,
        offset,
    })
}

/// The complete lines appended to a file since the last read.
pub(crate) struct Tail {
    path: PathBuf,
    pos: u64,
    partial: Vec<u8>,
}

impl Tail {
    /// From the start of the file, or from its end now (`from_end`).
    pub(crate) fn new(path: PathBuf, from_end: bool) -> Tail {
        let pos = if from_end {
            std::fs::metadata(&path).map_or(0, |m| m.len())
        } else {
            0
        };
        Tail {
            path,
            pos,
            partial: Vec::new(),
        }
    }

    pub(crate) fn lines(&mut self) -> Vec<String> {
        let Ok(mut file) = File::open(&self.path) else {
            return Vec::new();
        };
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(self.pos)).is_err() || file.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.pos += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A final outcome (handled, duplicate, dead-lettered or forwarded: not abandoned) of one
/// record, by one process: what counts replays (see [`crate::replays`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Final {
    pub(crate) time_ms: u64,
    /// The record: its tier (0: the source topic), partition and offset.
    pub(crate) tier: u32,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// Every outcome line read so far, and per event what the checks need.
pub(crate) struct Outcomes {
    files: Vec<Tail>,
    /// Every final outcome, in the order read.
    pub(crate) finals: Vec<Final>,
    /// Per id, when a process first reported it handled (its key marked done).
    pub(crate) handled_at: Vec<Option<u64>>,
    /// Per id, the dead-lettered outcomes reported (one per dead letter written).
    pub(crate) dead_lettered: Vec<u32>,
    /// Forwards per tier (index 0: tier 1).
    pub(crate) forwarded: Vec<u64>,
    pub(crate) duplicates: u64,
    pub(crate) abandoned: u64,
    /// The highest offset with an outcome, per (tier, partition).
    pub(crate) max_offset: BTreeMap<(u32, i32), i64>,
    pub(crate) malformed: Vec<String>,
}

impl Outcomes {
    pub(crate) fn new(events: usize) -> Outcomes {
        Outcomes {
            files: Vec::new(),
            finals: Vec::new(),
            handled_at: vec![None; events],
            dead_lettered: vec![0; events],
            forwarded: Vec::new(),
            duplicates: 0,
            abandoned: 0,
            max_offset: BTreeMap::new(),
            malformed: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, path: PathBuf) {
        self.files.push(Tail::new(path, false));
    }

    pub(crate) fn poll(&mut self) {
        let mut lines = Vec::new();
        for tail in &mut self.files {
            lines.extend(tail.lines());
        }
        for line in lines {
            let Some(o) = parse(&line) else {
                self.malformed.push(line);
                continue;
            };
            if o.kind != Kind::Abandoned {
                self.finals.push(Final {
                    time_ms: o.time_ms,
                    tier: o.tier,
                    partition: o.partition,
                    offset: o.offset,
                });
            }
            let id = o.id.filter(|&id| (id as usize) < self.handled_at.len());
            let max = self.max_offset.entry((o.tier, o.partition)).or_insert(-1);
            *max = (*max).max(o.offset);
            match (&o.kind, id) {
                (Kind::Handled, Some(id)) => {
                    let at = &mut self.handled_at[id as usize];
                    *at = Some(at.map_or(o.time_ms, |t| t.min(o.time_ms)));
                }
                (Kind::DeadLettered(_), Some(id)) => self.dead_lettered[id as usize] += 1,
                (Kind::Forwarded(tier), _) => {
                    let i = tier.saturating_sub(1) as usize;
                    if self.forwarded.len() <= i {
                        self.forwarded.resize(i + 1, 0);
                    }
                    self.forwarded[i] += 1;
                }
                (Kind::Duplicate, _) => self.duplicates += 1,
                (Kind::Abandoned, _) => self.abandoned += 1,
                _ => {}
            }
        }
    }
}
