//! The checks after the run: nothing lost, the dead letters exactly the expected ones, each
//! effect at its predicted attempt, per-key order, duplicates within their bound per kill, and
//! the end state (commits at the log end, the last consumer idle).

use std::collections::{BTreeMap, HashMap};

use crate::MAX_ATTEMPTS;
use crate::event::{Event, Fate};
use crate::kafka::Letter;
use crate::ledger::Ledgers;
use crate::procs::ChildRecord;

pub(crate) struct Inputs<'a> {
    pub(crate) events: &'a [Event],
    pub(crate) fates: &'a [Fate],
    pub(crate) ledgers: &'a Ledgers,
    pub(crate) letters: &'a [Letter],
    pub(crate) committed: Option<&'a Vec<i64>>,
    pub(crate) log_end: &'a [i64],
    pub(crate) snapshot: Option<&'a serde_json::Value>,
    pub(crate) children: &'a [ChildRecord],
    pub(crate) max_in_flight: usize,
    pub(crate) partitions: i32,
    /// Dead letters that a kill or broker restart may have repeated.
    pub(crate) dlt_allowance: u64,
    /// Kills and broker restarts: how often one record can be redelivered at most.
    pub(crate) redeliveries: u32,
}

pub(crate) struct Checked {
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) dlt_duplicates: u64,
    pub(crate) dead_lettered: u64,
    pub(crate) per_kill: String,
    pub(crate) problems: Vec<String>,
}

/// Runs every check on what the run left behind.
pub(crate) fn check(i: &Inputs<'_>) -> Checked {
    let mut problems = Vec::new();
    let n = i.events.len();
    let first_examples = |problems: &mut Vec<String>, what: &str, ids: &[u64]| {
        if !ids.is_empty() {
            problems.push(format!(
                "{what}: {} (e.g. ids {:?})",
                ids.len(),
                &ids[..ids.len().min(10)]
            ));
        }
    };

    // Dead letters per id.
    let mut letters_of = vec![0u32; n];
    let mut bad_letters = Vec::new();
    let mut wrong_provenance = Vec::new();
    for l in i.letters {
        let Some(id) = l.id.filter(|&id| (id as usize) < n) else {
            bad_letters.push(u64::MAX);
            continue;
        };
        letters_of[id as usize] += 1;
        let (kind, attempts) = match i.fates[id as usize] {
            Fate::Permanent => ("permanent", "1".to_owned()),
            Fate::Exhausted => ("retries-exhausted", MAX_ATTEMPTS.to_string()),
            _ => ("", String::new()),
        };
        if l.kind.as_deref() != Some(kind) || l.attempts.as_deref() != Some(attempts.as_str()) {
            wrong_provenance.push(id);
        }
    }
    first_examples(
        &mut problems,
        "dead letters whose value is not an event",
        &bad_letters,
    );

    let lost: Vec<u64> = (0..n as u64)
        .filter(|&id| i.ledgers.count[id as usize] == 0 && letters_of[id as usize] == 0)
        .collect();
    first_examples(
        &mut problems,
        "LOST (neither in the ledger nor dead-lettered)",
        &lost,
    );
    let unexpected_letters: Vec<u64> = (0..n as u64)
        .filter(|&id| letters_of[id as usize] > 0 && !i.fates[id as usize].dead_lettered())
        .collect();
    first_examples(
        &mut problems,
        "dead-lettered but expected to succeed",
        &unexpected_letters,
    );
    let missing_letters: Vec<u64> = (0..n as u64)
        .filter(|&id| letters_of[id as usize] == 0 && i.fates[id as usize].dead_lettered())
        .collect();
    first_examples(
        &mut problems,
        "expected in the dead-letter topic but missing",
        &missing_letters,
    );
    first_examples(
        &mut problems,
        "dead letters with a wrong failure kind or attempt count",
        &wrong_provenance,
    );
    let effects_of_dead: Vec<u64> = (0..n as u64)
        .filter(|&id| i.ledgers.count[id as usize] > 0 && i.fates[id as usize].dead_lettered())
        .collect();
    first_examples(
        &mut problems,
        "side effects of events that must always fail",
        &effects_of_dead,
    );

    // Each effect: the right key, sequence number and attempt.
    let mut wrong_effects = Vec::new();
    for e in &i.ledgers.effects {
        let ev = &i.events[e.id as usize];
        if e.key != ev.key
            || e.seq != ev.seq
            || Some(e.attempt) != i.fates[e.id as usize].success_attempt()
        {
            wrong_effects.push(e.id);
        }
    }
    first_examples(
        &mut problems,
        "effects with a wrong key, seq or attempt",
        &wrong_effects,
    );
    if !i.ledgers.malformed.is_empty() {
        problems.push(format!(
            "{} malformed ledger lines, e.g. {:?}",
            i.ledgers.malformed.len(),
            &i.ledgers.malformed[..i.ledgers.malformed.len().min(3)]
        ));
    }

    // Per key, first effects in strictly increasing sequence order.
    let mut seen = vec![false; n];
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut order_violations = Vec::new();
    // Duplicates, attributed to the process that wrote the previous effect of the same id.
    let mut previous_child: Vec<Option<usize>> = vec![None; n];
    let mut duplicates_from: BTreeMap<usize, u64> = BTreeMap::new();
    for e in &i.ledgers.effects {
        let id = e.id as usize;
        if !seen[id] {
            seen[id] = true;
            if let Some(&prev) = last_seq.get(e.key.as_str())
                && e.seq <= prev
            {
                order_violations.push(e.id);
            }
            last_seq.insert(e.key.as_str(), e.seq);
        } else if let Some(prev) = previous_child[id] {
            *duplicates_from.entry(prev).or_default() += 1;
        }
        previous_child[id] = Some(e.child);
    }
    first_examples(
        &mut problems,
        "per-key order violations (first effect with a seq not above the key's previous)",
        &order_violations,
    );
    let duplicates: u64 = duplicates_from.values().sum();
    let mut per_kill = Vec::new();
    for c in i.children {
        let dups = duplicates_from.get(&c.index).copied().unwrap_or(0);
        if c.killed {
            let allowed = c
                .uncommitted_at_kill
                .map_or(i.max_in_flight as u64, |u| u.min(i.max_in_flight as u64));
            per_kill.push(format!(
                "#{}: {}/{dups}",
                c.index,
                c.uncommitted_at_kill
                    .map_or("?".to_owned(), |u| u.to_string())
            ));
            if dups > allowed {
                problems.push(format!(
                    "consumer #{} was killed with {:?} uncommitted effects (max_in_flight {}), \
                     but {dups} of its effects were repeated",
                    c.index, c.uncommitted_at_kill, i.max_in_flight
                ));
            }
        } else if dups > 0 {
            problems.push(format!(
                "{dups} effects of consumer #{}, which was not killed, were repeated",
                c.index
            ));
        }
    }

    // Commits at the log end.
    match i.committed {
        Some(c) if c.as_slice() == i.log_end => {}
        Some(c) => problems.push(format!(
            "committed offsets {c:?} are not the log end {:?}",
            i.log_end
        )),
        None => problems.push("committed offsets could not be read".into()),
    }

    // The last consumer's state when it was told to stop.
    match i.snapshot {
        None => problems.push("the last consumer printed no snapshot".into()),
        Some(s) => {
            let paused = s["paused"].as_array().map_or(usize::MAX, Vec::len);
            let assigned = s["assigned"].as_array().map_or(0, Vec::len);
            if paused != 0
                || s["in_flight"] != 0
                || s["buffered_records"] != 0
                || assigned != i.partitions as usize
            {
                problems.push(format!(
                    "the last consumer was not idle with all partitions unpaused: {s}"
                ));
            }
        }
    }

    let dlt_duplicates = letters_of
        .iter()
        .map(|&c| u64::from(c.saturating_sub(1)))
        .sum();
    if dlt_duplicates > i.dlt_allowance {
        problems.push(format!(
            "{dlt_duplicates} duplicate dead letters, but only {} were uncommitted at kills and broker restarts",
            i.dlt_allowance
        ));
    }
    let looping: Vec<u64> = (0..n as u64)
        .filter(|&id| letters_of[id as usize] > i.redeliveries + 1)
        .collect();
    first_examples(
        &mut problems,
        "dead-lettered more often than there were redeliveries",
        &looping,
    );
    Checked {
        lost: lost.len() as u64,
        duplicates,
        dlt_duplicates,
        dead_lettered: letters_of.iter().filter(|&&c| c > 0).count() as u64,
        per_kill: if per_kill.is_empty() {
            "none".into()
        } else {
            per_kill.join(", ")
        },
        problems,
    }
}
