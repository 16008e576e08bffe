//! The checks after the run: nothing lost, the dead letters exactly the expected ones, each
//! effect at its predicted attempt, per-key order, duplicates within their bound per kill, and
//! the end state (commits at the log end, the last consumer idle).

use std::collections::{BTreeMap, HashMap};

use crate::event::{Event, Fate};
use crate::kafka::Letter;
use crate::ledger::Ledgers;
use crate::procs::{ChildRecord, ZombieRecord};

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
    pub(crate) dlt_partitions: i32,
    /// Dead letters that a kill or broker restart may have repeated.
    pub(crate) dlt_allowance: u64,
    /// Kills, broker restarts and a zombie's three hand-overs: how often one record can be
    /// redelivered at most.
    pub(crate) redeliveries: u32,
    /// Attempts an event gets in all (over every stage with `--compose`).
    pub(crate) max_attempts: u32,
    /// Partitions of the source and tier topics together (the last consumer holds them all).
    pub(crate) assigned_partitions: usize,
    /// With `--compose`, what only its checks need.
    pub(crate) compose: Option<ComposeInputs<'a>>,
}

/// The inputs of the `--compose` checks.
pub(crate) struct ComposeInputs<'a> {
    /// In-place attempts per stage: an effect at attempt `a` cannot come before tier
    /// `(a - 1) / attempts_per_stage`.
    pub(crate) attempts_per_stage: u32,
    /// Each tier topic: name, the group's commits (`None`: unreadable) and its log end.
    pub(crate) tiers: Vec<(String, Option<Vec<i64>>, Vec<i64>)>,
    /// When the idempotency Redis was killed (ms since the epoch): done marks written
    /// before are gone.
    pub(crate) redis_kills_ms: &'a [u64],
    /// SIGKILLs made: each may leave letters in flight (acknowledged, not yet marked).
    pub(crate) kills: u64,
}

pub(crate) struct Checked {
    pub(crate) lost: u64,
    /// Every repeated effect (kills', zombies' and any other).
    pub(crate) duplicates: u64,
    /// Repeats of the effects of killed processes.
    pub(crate) kill_duplicates: u64,
    /// Repeats caused by zombies: effects a zombie wrote after it was resumed that another
    /// process had already made (late writes), plus effects it made before the freeze that
    /// another process made again (redone).
    pub(crate) zombie_duplicates: u64,
    pub(crate) zombie_late: u64,
    pub(crate) dlt_duplicates: u64,
    pub(crate) dead_lettered: u64,
    /// Events dead-lettered because a downstream outage failed all their attempts.
    pub(crate) outage_dead_lettered: u64,
    /// Of those, handled anyway after a crash delivered them again (exempt from key order).
    pub(crate) outage_redone: u64,
    /// Dead letters from source partitions the dead-letter topic lacks (placed by key).
    pub(crate) dlt_by_key: u64,
    pub(crate) per_kill: String,
    pub(crate) per_zombie: String,
    /// First effects out of their key's order.
    pub(crate) order_violations: u64,
    /// The most dead letters one event has.
    pub(crate) max_letters_per_event: u32,
    /// Letters written by a process killed between the broker's acknowledgement and the
    /// delivery's settled mark (nobody reported them): the window rule 18 leaves.
    pub(crate) letters_in_kill_window: u64,
    /// Dead letters per event id.
    pub(crate) letters_per_event: Vec<u32>,
    /// `--compose`: effects of an event made after a process had reported it handled (its
    /// key marked done in the store), with no Redis outage in between.
    pub(crate) after_done: u64,
    /// Effects per tier (index 0: the source topic).
    pub(crate) effects_by_tier: Vec<u64>,
    /// `--compose`: repeated effects with a loss of the idempotency Redis between them and
    /// the effect before (not in `duplicates`: reported, not bounded).
    pub(crate) redis_repeats: u64,
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

    // Events whose last attempt a downstream outage failed: dead-lettered by it.
    let max_attempts = i.max_attempts;
    let outage_exhausted = |id: u64| i.ledgers.outage_attempt[id as usize] >= max_attempts;

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
            Fate::Exhausted => ("retries-exhausted", max_attempts.to_string()),
            _ if outage_exhausted(id) => ("retries-exhausted", max_attempts.to_string()),
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
        .filter(|&id| {
            letters_of[id as usize] > 0
                && !i.fates[id as usize].dead_lettered()
                && !outage_exhausted(id)
        })
        .collect();
    let outage_dead_lettered = (0..n as u64)
        .filter(|&id| {
            letters_of[id as usize] > 0
                && !i.fates[id as usize].dead_lettered()
                && outage_exhausted(id)
        })
        .count() as u64;
    let outage_unlettered: Vec<u64> = (0..n as u64)
        .filter(|&id| {
            outage_exhausted(id)
                && letters_of[id as usize] == 0
                && i.ledgers.count[id as usize] == 0
        })
        .collect();
    first_examples(
        &mut problems,
        "retries exhausted by the downstream outage but not dead-lettered",
        &outage_unlettered,
    );
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

    // Each effect: the right key, sequence number and attempt (and, with tiers, a tier its
    // failures can have brought it to: each stage of failed attempts moves it on by one, a
    // deferral for key order only ever further).
    let mut wrong_effects = Vec::new();
    let mut effects_by_tier = vec![0u64; i.compose.as_ref().map_or(1, |c| c.tiers.len() + 1)];
    for e in &i.ledgers.effects {
        let ev = &i.events[e.id as usize];
        let predicted = i.fates[e.id as usize].success_attempt();
        // A downstream outage fails attempts too: the effect comes at a later attempt then.
        let attempt_ok = if i.ledgers.outage_attempt[e.id as usize] > 0 {
            predicted.is_some_and(|p| e.attempt >= p && e.attempt <= max_attempts)
        } else {
            Some(e.attempt) == predicted
        };
        let tier_ok = match &i.compose {
            None => e.tier == 0,
            Some(c) => {
                (e.tier as usize) < effects_by_tier.len()
                    && e.tier >= e.attempt.saturating_sub(1) / c.attempts_per_stage
            }
        };
        if e.key != ev.key || e.seq != ev.seq || !attempt_ok || !tier_ok {
            wrong_effects.push(e.id);
        }
        if let Some(n) = effects_by_tier.get_mut(e.tier as usize) {
            *n += 1;
        }
    }
    first_examples(
        &mut problems,
        "effects with a wrong key, seq, attempt or tier",
        &wrong_effects,
    );
    if let Some(c) = &i.compose {
        // The injected failures must make records go through every tier.
        for (tier, &effects) in effects_by_tier.iter().enumerate().skip(1) {
            let due_here = i
                .fates
                .iter()
                .filter(|f| {
                    f.success_attempt()
                        .is_some_and(|a| (a - 1) / c.attempts_per_stage == tier as u32)
                })
                .count();
            if due_here > 0 && effects == 0 {
                problems.push(format!(
                    "no effect in tier {tier}, although {due_here} events were injected to succeed there"
                ));
            }
        }
    }
    if !i.ledgers.malformed.is_empty() {
        problems.push(format!(
            "{} malformed ledger lines, e.g. {:?}",
            i.ledgers.malformed.len(),
            &i.ledgers.malformed[..i.ledgers.malformed.len().min(3)]
        ));
    }

    // Per key, first effects in strictly increasing sequence order. Effects in the order they
    // were made (a zombie and its successor write at the same time; ties keep file order).
    let mut in_time_order: Vec<&crate::ledger::Effect> = i.ledgers.effects.iter().collect();
    in_time_order.sort_by_key(|e| e.time_ms);
    let zombies: BTreeMap<usize, &ZombieRecord> = i
        .children
        .iter()
        .filter_map(|c| c.zombie.as_ref().map(|z| (c.index, z)))
        .collect();
    // Per zombie: (late writes, redone effects).
    let mut zombie_dups: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    let mut seen = vec![false; n];
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut order_violations = Vec::new();
    let mut outage_redone = 0u64;
    // Duplicates, attributed to the process that wrote the previous effect of the same id.
    let mut previous_child: Vec<Option<usize>> = vec![None; n];
    let mut previous_time: Vec<u64> = vec![0; n];
    // `--compose`: repeats across a loss of the idempotency Redis.
    let mut redis_repeats = 0u64;
    let mut duplicates_from: BTreeMap<usize, u64> = BTreeMap::new();
    // `--compose`: effects after the event was reported handled (its key marked done)
    // with no Redis outage in between (which would have lost the done mark).
    let mut after_done = Vec::new();
    for e in in_time_order {
        let id = e.id as usize;
        if let (Some(c), Some(done)) = (&i.compose, i.ledgers.outcomes.handled_at[id])
            && e.time_ms > done
            && !c
                .redis_kills_ms
                .iter()
                .any(|&k| k >= done && k <= e.time_ms)
        {
            after_done.push(e.id);
        }
        if !seen[id] {
            seen[id] = true;
            // A record the outage dead-lettered that has an effect anyway: its dead letter
            // settled it in its turn (the key's next records ran after it), and a crash before
            // its offset was committed delivered it again once the outage was over. That
            // effect is a redelivery, not the key's order: it is neither checked nor the
            // key's new mark.
            if outage_exhausted(e.id) && letters_of[id] > 0 {
                outage_redone += 1;
            } else {
                if let Some(&prev) = last_seq.get(e.key.as_str())
                    && e.seq <= prev
                {
                    order_violations.push(e.id);
                }
                last_seq.insert(e.key.as_str(), e.seq);
            }
        } else if zombies
            .get(&e.child)
            .is_some_and(|z| e.time_ms >= z.resumed_ms)
        {
            zombie_dups.entry(e.child).or_default().0 += 1;
        } else if let Some(prev) = previous_child[id] {
            if i.compose.as_ref().is_some_and(|c| {
                c.redis_kills_ms
                    .iter()
                    .any(|&k| k >= previous_time[id] && k <= e.time_ms)
            }) {
                // The idempotency Redis lost its done marks between the two: a copy of the
                // event still going round the tiers (a forward repeated after a kill, deferred
                // behind its key) runs again, and the store cannot tell.
                redis_repeats += 1;
            } else if zombies.contains_key(&prev) {
                zombie_dups.entry(prev).or_default().1 += 1;
            } else {
                *duplicates_from.entry(prev).or_default() += 1;
            }
        }
        previous_child[id] = Some(e.child);
        previous_time[id] = e.time_ms;
    }
    first_examples(
        &mut problems,
        "per-key order violations (first effect with a seq not above the key's previous)",
        &order_violations,
    );
    first_examples(
        &mut problems,
        "effects repeated after the event was reported handled (its key marked done), with no Redis outage between",
        &after_done,
    );
    let kill_duplicates: u64 = duplicates_from.values().sum();
    let zombie_late: u64 = zombie_dups.values().map(|d| d.0).sum();
    let zombie_duplicates: u64 = zombie_dups.values().map(|d| d.0 + d.1).sum();
    let duplicates = kill_duplicates + zombie_duplicates;
    let mut per_zombie = Vec::new();
    for (&index, z) in &zombies {
        let (late, redone) = zombie_dups.get(&index).copied().unwrap_or_default();
        per_zombie.push(format!(
            "#{index}: {} in flight at the freeze, frozen {:.1} s, {} duplicates ({late} late writes after SIGCONT, {redone} of its earlier effects redone)",
            z.in_flight_at_freeze,
            z.frozen_ms as f64 / 1000.0,
            late + redone
        ));
        // Each record the zombie had in flight makes at most one repeat: its effect either
        // came before the freeze (the new owner redoes it) or after SIGCONT (a late write).
        if late + redone > i.max_in_flight as u64 {
            problems.push(format!(
                "zombie consumer #{index} caused {} duplicate effects, above max_in_flight {}",
                late + redone,
                i.max_in_flight
            ));
        }
    }
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
        } else if dups > 0 && c.zombie.is_none() {
            problems.push(format!(
                "{dups} effects of consumer #{}, which was not killed, were repeated",
                c.index
            ));
        }
    }

    // Commits at the log end, of the source and of every tier topic.
    match i.committed {
        Some(c) if c.as_slice() == i.log_end => {}
        Some(c) => problems.push(format!(
            "committed offsets {c:?} are not the log end {:?}",
            i.log_end
        )),
        None => problems.push("committed offsets could not be read".into()),
    }
    for (name, committed, end) in i.compose.iter().flat_map(|c| &c.tiers) {
        match committed {
            Some(c) if c == end => {}
            Some(c) => problems.push(format!(
                "committed offsets {c:?} of {name} are not its log end {end:?}"
            )),
            None => problems.push(format!("committed offsets of {name} could not be read")),
        }
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
                || assigned != i.assigned_partitions
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
    let max_letters_per_event = letters_of.iter().copied().max().unwrap_or(0);
    let mut letters_in_kill_window = 0u64;
    if let Some(c) = &i.compose {
        // One event, one outcome (rule 18 in the crate docs): across kills, redeliveries and
        // tier copies, at most one dead letter per event *as far as the store can tell*. A
        // process reports a letter (`on_outcome`) only after it marked the delivery settled,
        // so two reported letters of one event mean the mark did not hold: a failure. A
        // letter nobody reported was written by a process killed between the broker's
        // acknowledgement and the mark (only a killed process leaves a job unreported): the
        // one window at-least-once without a transaction leaves, at most `max_in_flight`
        // letters per kill.
        let reported = |id: u64| i.ledgers.outcomes.dead_lettered[id as usize];
        let twice: Vec<u64> = (0..n as u64).filter(|&id| reported(id) > 1).collect();
        if !twice.is_empty() {
            problems.push(format!(
                "{} events reported dead-lettered more than once (the settled mark did not hold), e.g. {:?}",
                twice.len(),
                twice
                    .iter()
                    .take(10)
                    .map(|&id| format!("{id}×{}", reported(id)))
                    .collect::<Vec<_>>()
            ));
        }
        letters_in_kill_window = (0..n as u64)
            .map(|id| u64::from(letters_of[id as usize].saturating_sub(reported(id).max(1))))
            .sum();
        let window_bound = c.kills * i.max_in_flight as u64;
        if letters_in_kill_window > window_bound {
            problems.push(format!(
                "{letters_in_kill_window} dead letters nobody reported (written by killed processes before their mark), above kills × max_in_flight = {window_bound}"
            ));
        }
    } else if dlt_duplicates > i.dlt_allowance {
        problems.push(format!(
            "{dlt_duplicates} duplicate dead letters, but only {} were uncommitted at kills, broker restarts and zombie hand-overs",
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
    let dlt_by_key = check_dlt_partitions(i, &mut problems);
    Checked {
        lost: lost.len() as u64,
        duplicates,
        kill_duplicates,
        zombie_duplicates,
        zombie_late,
        outage_dead_lettered,
        outage_redone,
        dlt_by_key,
        per_zombie: if per_zombie.is_empty() {
            "none".into()
        } else {
            per_zombie.join("; ")
        },
        dlt_duplicates,
        dead_lettered: letters_of.iter().filter(|&&c| c > 0).count() as u64,
        per_kill: if per_kill.is_empty() {
            "none".into()
        } else {
            per_kill.join(", ")
        },
        order_violations: order_violations.len() as u64,
        max_letters_per_event,
        letters_in_kill_window,
        letters_per_event: letters_of,
        after_done: after_done.len() as u64,
        effects_by_tier,
        redis_repeats,
        problems,
    }
}

/// Where dead letters landed: a letter from a source partition the dead-letter topic has is
/// in that partition; any other is where a Java producer's default partitioner puts its key
/// (`murmur2`), so all letters of one key share a partition. Returns how many were placed by
/// key.
fn check_dlt_partitions(i: &Inputs<'_>, problems: &mut Vec<String>) -> u64 {
    let mut by_key = 0;
    let mut misplaced = Vec::new();
    for l in i.letters {
        let Some((source, _)) = l.source else {
            continue;
        };
        let expected = if source < i.dlt_partitions {
            source
        } else {
            by_key += 1;
            match &l.key {
                Some(k) => java_partition(k, i.dlt_partitions),
                None => continue,
            }
        };
        if l.partition != expected {
            misplaced.push(format!(
                "id {:?} from partition {source} in {} (expected {expected})",
                l.id, l.partition
            ));
        }
    }
    if !misplaced.is_empty() {
        problems.push(format!(
            "{} dead letters in an unexpected dead-letter partition (of {}), e.g. {:?}",
            misplaced.len(),
            i.dlt_partitions,
            &misplaced[..misplaced.len().min(5)]
        ));
    }
    by_key
}

/// The partition Kafka's Java default partitioner picks for a key: `murmur2(key) & 0x7fffffff
/// % partitions`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) as i32 % partitions
}

/// Kafka's `Utils.murmur2` (seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}
