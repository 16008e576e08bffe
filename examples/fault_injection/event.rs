//! The events the runner produces, and the failures injected into them: which events fail, how
//! often, and on which attempt their side effect happens, as a pure function of id and seed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Event {
    pub(crate) id: u64,
    pub(crate) key: String,
    pub(crate) seq: u64,
}

/// The injected outcome of an event, a pure function of its id and the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Ok,
    /// Fails transiently on this many attempts, then succeeds. With `--compose` the attempts
    /// are counted over every stage (the source's and each tier's in-place attempts).
    Transient(u32),
    /// Always fails transiently: retries exhausted (after the last tier with `--compose`),
    /// dead-lettered.
    Exhausted,
    /// Fails permanently: dead-lettered after one attempt.
    Permanent,
}

impl Fate {
    /// The fate of event `id`. `compose`: the distribution of `--compose` runs, whose
    /// consumers have [`COMPOSE_ATTEMPTS_PER_STAGE`](crate::COMPOSE_ATTEMPTS_PER_STAGE)
    /// attempts per stage and two tiers: 2 % fail once (retried in place at the source),
    /// 1.5 % two or three times (they succeed in tier 1), 1 % four or five times (tier 2),
    /// 0.5 % always (dead-lettered after the last tier), 0.5 % permanently.
    pub(crate) fn of(id: u64, seed: u64, compose: bool) -> Fate {
        let h = splitmix64(id ^ seed.rotate_left(29));
        let pick = ((h >> 32) % 2) as u32;
        if compose {
            return match h % 1000 {
                0..5 => Fate::Permanent,
                5..10 => Fate::Exhausted,
                10..30 => Fate::Transient(1),
                30..45 => Fate::Transient(2 + pick),
                45..55 => Fate::Transient(4 + pick),
                _ => Fate::Ok,
            };
        }
        match h % 1000 {
            0..5 => Fate::Permanent,
            5..10 => Fate::Exhausted,
            10..55 => Fate::Transient(1 + pick),
            _ => Fate::Ok,
        }
    }

    pub(crate) fn dead_lettered(self) -> bool {
        matches!(self, Fate::Exhausted | Fate::Permanent)
    }

    /// The attempt on which the side effect happens.
    pub(crate) fn success_attempt(self) -> Option<u32> {
        match self {
            Fate::Ok => Some(1),
            Fate::Transient(n) => Some(n + 1),
            Fate::Exhausted | Fate::Permanent => None,
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `n` events with ids `0..n`, each keyed by one of `keys` keys chosen at random and carrying
/// its key's next sequence number.
pub(crate) fn make_events(n: u64, keys: u32, rng: &mut fastrand::Rng) -> Vec<Event> {
    let mut next_seq = vec![0u64; keys as usize];
    (0..n)
        .map(|id| {
            let k = rng.usize(..keys as usize);
            let seq = next_seq[k];
            next_seq[k] += 1;
            Event {
                id,
                key: format!("k{k:04}"),
                seq,
            }
        })
        .collect()
}
