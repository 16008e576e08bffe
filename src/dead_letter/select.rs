//! Which letters of a dead-letter topic a command works on: [`LetterSelector`].

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use super::DeadLetterReason;
use super::headers::{self, Provenance};
use crate::record::RawRecord;

/// Letters at one place, or a run of places, of one partition of a dead-letter topic:
/// `partition:offset` or `partition:first-last` (both ends included), as
/// `kourier-dlt redrive --at` takes them.
///
/// ```
/// use kourier::dead_letter::LetterRange;
///
/// let one: LetterRange = "0:42".parse()?;
/// assert_eq!(one, LetterRange::new(0, 42, 42));
/// let run: LetterRange = "3:10-19".parse()?;
/// assert!(run.contains(3, 19) && !run.contains(3, 20) && !run.contains(0, 10));
/// assert!("0:9-3".parse::<LetterRange>().is_err());
/// # Ok::<(), kourier::dead_letter::LetterRangeError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LetterRange {
    /// The partition of the dead-letter topic.
    pub partition: i32,
    /// The first offset, included.
    pub first: i64,
    /// The last offset, included.
    pub last: i64,
}

impl LetterRange {
    /// The letters of `partition` from offset `first` to `last`, both included.
    pub fn new(partition: i32, first: i64, last: i64) -> Self {
        LetterRange {
            partition,
            first,
            last,
        }
    }

    /// Whether the letter at `partition`/`offset` lies in the range.
    pub fn contains(&self, partition: i32, offset: i64) -> bool {
        partition == self.partition && (self.first..=self.last).contains(&offset)
    }
}

impl fmt::Display for LetterRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}:{}", self.partition, self.first)
        } else {
            write!(f, "{}:{}-{}", self.partition, self.first, self.last)
        }
    }
}

/// A [`LetterRange`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{given:?} is not a letter place: use partition:offset (0:42) or partition:first-last (0:10-19)"
)]
pub struct LetterRangeError {
    /// What was given, cut to 100 characters.
    pub given: String,
}

impl FromStr for LetterRange {
    type Err = LetterRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LetterRangeError {
            given: s.chars().take(100).collect(),
        };
        let (partition, offsets) = s.trim().split_once(':').ok_or_else(err)?;
        let partition: i32 = partition.trim().parse().map_err(|_| err())?;
        let (first, last) = match offsets.split_once('-') {
            Some((first, last)) => (first.trim(), last.trim()),
            None => (offsets.trim(), offsets.trim()),
        };
        let first: i64 = first.parse().map_err(|_| err())?;
        let last: i64 = last.parse().map_err(|_| err())?;
        if partition < 0 || first < 0 || last < first {
            return Err(err());
        }
        Ok(LetterRange::new(partition, first, last))
    }
}

/// Which letters of a dead-letter topic to work on. Every part given must match (an empty
/// selector selects every letter); within a part, any one value matches (any of the places,
/// any of the kinds).
///
/// - [`at`](Self::at): the letter's place in the dead-letter topic (partition and offset);
/// - [`header`](Self::header): the letter carries a header of that name whose value is
///   exactly these bytes — the last header of the name counts, as everywhere in kourier —
///   e.g. an event id;
/// - [`key`](Self::key): the letter's key is exactly these bytes;
/// - [`kind`](Self::kind): its [`FAILURE_KIND`](headers::FAILURE_KIND);
/// - [`since`](Self::since) / [`until`](Self::until): when the record was given up — its
///   [`LAST_FAILURE_MS`](headers::LAST_FAILURE_MS), else the letter's own timestamp — at or
///   after `since`, before `until`. A letter with neither never matches a time bound.
///
/// ```
/// use kourier::dead_letter::{LetterRange, LetterSelector};
/// use kourier::{DeadLetterReason, RawRecord};
///
/// let selector = LetterSelector::new()
///     .at(LetterRange::new(0, 40, 49))
///     .header("event-id", "e-1")
///     .kind(DeadLetterReason::Permanent);
/// let letter = RawRecord::builder("orders.v1.dlt")
///     .offset(42)
///     .header("event-id", "e-1")
///     .header("kourier-dlt-failure-kind", "permanent")
///     .build();
/// assert!(selector.matches(&letter));
/// assert!(!LetterSelector::new().header("event-id", "e-2").matches(&letter));
/// assert_eq!(selector.to_string(), "at=0:40-49 header:event-id=e-1 kind=permanent");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LetterSelector {
    places: Vec<LetterRange>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    key: Option<Vec<u8>>,
    kinds: Vec<DeadLetterReason>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
}

impl LetterSelector {
    /// Selects every letter.
    pub fn new() -> Self {
        LetterSelector::default()
    }

    /// Only letters in `range` (or in any other range given).
    #[must_use]
    pub fn at(mut self, range: LetterRange) -> Self {
        self.places.push(range);
        self
    }

    /// Only letters whose last header named `name` has exactly the value `value` (and
    /// whatever other headers are asked for too).
    #[must_use]
    pub fn header(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    /// Only letters with exactly this key.
    #[must_use]
    pub fn key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.key = Some(key.as_ref().to_vec());
        self
    }

    /// Only letters of this failure kind (or of any other kind given).
    #[must_use]
    pub fn kind(mut self, kind: DeadLetterReason) -> Self {
        if !self.kinds.contains(&kind) {
            self.kinds.push(kind);
        }
        self
    }

    /// Only letters given up at or after `time`.
    #[must_use]
    pub fn since(mut self, time: SystemTime) -> Self {
        self.since = Some(time);
        self
    }

    /// Only letters given up before `time`.
    #[must_use]
    pub fn until(mut self, time: SystemTime) -> Self {
        self.until = Some(time);
        self
    }

    /// The places asked for ([`at`](Self::at)); empty: anywhere.
    pub fn places(&self) -> &[LetterRange] {
        &self.places
    }

    /// Whether `letter` (a record read from a dead-letter topic) is selected. Its headers are
    /// read by the rules of [`headers`](super::headers) (untrusted input: never panics).
    pub fn matches(&self, letter: &RawRecord) -> bool {
        if !self.places.is_empty()
            && !self
                .places
                .iter()
                .any(|r| r.contains(letter.partition, letter.offset))
        {
            return false;
        }
        if let Some(key) = &self.key
            && letter.key.as_deref() != Some(key.as_slice())
        {
            return false;
        }
        for (name, value) in &self.headers {
            if headers::last(&letter.headers, name) != Some(Some(value.as_slice())) {
                return false;
            }
        }
        if self.kinds.is_empty() && self.since.is_none() && self.until.is_none() {
            return true;
        }
        let provenance = Provenance::from_headers(&letter.headers);
        if !self.kinds.is_empty()
            && !provenance
                .failure_kind
                .is_some_and(|k| self.kinds.contains(&k))
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(at) = given_up_at(letter, &provenance) else {
                return false;
            };
            if self.since.is_some_and(|s| at < s) || self.until.is_some_and(|u| at >= u) {
                return false;
            }
        }
        true
    }

    /// For each partition with places asked for, the lowest and highest offset any of them
    /// names; `None` when no place was asked for (every partition, every offset).
    pub(crate) fn bounds(&self, partition: i32) -> Option<Option<(i64, i64)>> {
        if self.places.is_empty() {
            return None;
        }
        Some(
            self.places
                .iter()
                .filter(|r| r.partition == partition)
                .fold(None, |acc: Option<(i64, i64)>, r| {
                    Some(match acc {
                        None => (r.first, r.last),
                        Some((lo, hi)) => (lo.min(r.first), hi.max(r.last)),
                    })
                }),
        )
    }
}

/// When the record of `letter` was given up: its last failure, else the letter's timestamp.
pub(crate) fn given_up_at(letter: &RawRecord, provenance: &Provenance) -> Option<SystemTime> {
    provenance
        .last_failure
        .or_else(|| headers::epoch_millis(letter.timestamp?))
}

/// The selector in one line, the same for the same selection (places, headers and kinds in
/// the order given; times in ms since the epoch; bytes that are not UTF-8 escaped): what a
/// resumable redrive stores with its position.
impl fmt::Display for LetterSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if !self.places.is_empty() {
            let places: Vec<String> = self.places.iter().map(ToString::to_string).collect();
            parts.push(format!("at={}", places.join(",")));
        }
        for (name, value) in &self.headers {
            parts.push(format!("header:{}={}", escaped(name), escaped(value)));
        }
        if let Some(key) = &self.key {
            parts.push(format!("key={}", escaped(key)));
        }
        if !self.kinds.is_empty() {
            let kinds: Vec<&str> = self.kinds.iter().map(|k| k.as_str()).collect();
            parts.push(format!("kind={}", kinds.join(",")));
        }
        let ms = |t: SystemTime| match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis().to_string(),
            Err(e) => format!("-{}", e.duration().as_millis()),
        };
        if let Some(t) = self.since {
            parts.push(format!("since={}ms", ms(t)));
        }
        if let Some(t) = self.until {
            parts.push(format!("until={}ms", ms(t)));
        }
        if parts.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// UTF-8 as is with `\`, space and `=` escaped, any other byte as `\xNN`.
fn escaped(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' | ' ' | '=' | ',' => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Headers;
    use std::time::Duration;

    fn letter(partition: i32, offset: i64, headers: Headers) -> RawRecord {
        let mut r = RawRecord::builder("t.dlt")
            .offset(offset)
            .headers(headers)
            .key("k")
            .timestamp(5_000)
            .build();
        r.partition = partition;
        r
    }

    #[test]
    fn places_parse_and_refuse_nonsense() {
        assert_eq!("1:7".parse(), Ok(LetterRange::new(1, 7, 7)));
        assert_eq!(" 2 : 3 - 9 ".parse(), Ok(LetterRange::new(2, 3, 9)));
        for bad in [
            "", "7", "a:1", "0:", "0:1-", "-1:3", "0:-3", "0:5-4", "0:1-2-3",
        ] {
            assert!(bad.parse::<LetterRange>().is_err(), "{bad:?}");
        }
        assert_eq!(LetterRange::new(0, 1, 1).to_string(), "0:1");
    }

    #[test]
    fn every_part_must_match_and_any_value_within_a_part() {
        let h = Headers::new()
            .with("event-id", "e-0")
            .with("event-id", "e-1")
            .with(headers::FAILURE_KIND, "decode");
        let l = letter(2, 10, h);
        assert!(LetterSelector::new().matches(&l));
        let at = LetterSelector::new()
            .at(LetterRange::new(0, 10, 10))
            .at(LetterRange::new(2, 9, 11));
        assert!(at.matches(&l));
        assert!(
            !LetterSelector::new()
                .at(LetterRange::new(2, 11, 20))
                .matches(&l)
        );
        assert!(LetterSelector::new().header("event-id", "e-1").matches(&l));
        assert!(
            !LetterSelector::new().header("event-id", "e-0").matches(&l),
            "the last header of a name counts"
        );
        assert!(!LetterSelector::new().header("other", "e-1").matches(&l));
        assert!(!LetterSelector::new().key("k2").matches(&l));
        assert!(
            LetterSelector::new()
                .kind(DeadLetterReason::Permanent)
                .kind(DeadLetterReason::Decode)
                .matches(&l)
        );
        assert!(!at.clone().kind(DeadLetterReason::Permanent).matches(&l));
        // No failure time: the letter's timestamp (5 s after the epoch) counts.
        let t = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        assert!(LetterSelector::new().since(t(5_000)).matches(&l));
        assert!(!LetterSelector::new().until(t(5_000)).matches(&l));
    }

    #[test]
    fn bounds_cover_the_places_of_a_partition() {
        let s = LetterSelector::new()
            .at(LetterRange::new(0, 5, 7))
            .at(LetterRange::new(0, 2, 3))
            .at(LetterRange::new(1, 9, 9));
        assert_eq!(s.bounds(0), Some(Some((2, 7))));
        assert_eq!(s.bounds(1), Some(Some((9, 9))));
        assert_eq!(s.bounds(2), Some(None), "nothing asked of partition 2");
        assert_eq!(LetterSelector::new().bounds(0), None);
    }

    #[test]
    fn the_description_tells_selections_apart() {
        let a = LetterSelector::new().header("a b", "c=d");
        let b = LetterSelector::new().header("a", "b c=d");
        assert_ne!(a.to_string(), b.to_string());
        assert_eq!(LetterSelector::new().to_string(), "all");
        assert_eq!(
            LetterSelector::new().key(b"\xffk").to_string(),
            "key=\\xffk"
        );
    }
}
