//! The tool's logic on top of [`kourier::dead_letter::DeadLetterTopic`]: listing letters
//! (as a table or JSON, grouped by event or not), redriving a selection with progress, and
//! reading times and kinds from the command line.
//!
//! Everything here is blocking (every wait bounded by `Kafka::timeout`): it runs on the main
//! thread of the tool, and the tests call it from `spawn_blocking`.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use kourier::dead_letter::{
    DeadLetterTopic, LetterPlace, LetterSelector, Provenance, Redrive, RedriveReport,
    RedriveStopped, Redriven, Refused, headers,
};
use kourier::tiers::headers as tiers;
use kourier::{DeadLetterReason, Header, RawRecord};

/// Where Kafka is, and how long any single wait may take.
#[derive(Debug, Clone)]
pub(crate) struct Kafka {
    pub(crate) bootstrap: String,
    pub(crate) timeout: Duration,
}

impl Kafka {
    /// The dead-letter (or tier) topic `topic` on this cluster.
    pub(crate) fn topic(&self, topic: &str) -> DeadLetterTopic {
        DeadLetterTopic::new(&self.bootstrap, topic).timeout(self.timeout)
    }
}

// ───────────── letters and filters ─────────────

/// One record of a dead-letter topic, with its provenance parsed.
#[derive(Debug, Clone)]
pub(crate) struct Letter {
    /// The record as read from the dead-letter topic (its topic/partition/offset are the
    /// letter's place there).
    pub(crate) record: RawRecord,
    pub(crate) provenance: Provenance,
}

impl Letter {
    pub(crate) fn new(record: RawRecord) -> Self {
        let provenance = Provenance::from_headers(&record.headers);
        Letter { record, provenance }
    }

    /// `partition@offset` in the dead-letter topic.
    pub(crate) fn place(&self) -> String {
        format!("{}@{}", self.record.partition, self.record.offset)
    }

    /// The retry tier a record read from a tier topic is in, and when it is due.
    pub(crate) fn tier(&self) -> Option<(u32, Option<SystemTime>)> {
        let tier = self
            .record
            .headers
            .get_str(tiers::TIER)?
            .trim()
            .parse()
            .ok()?;
        let due = self
            .record
            .headers
            .get_str(tiers::DUE_MS)
            .and_then(|d| d.trim().parse::<i64>().ok())
            .and_then(epoch_millis);
        Some((tier, due))
    }

    pub(crate) fn key_text(&self) -> Option<String> {
        self.record
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// The letter as one JSON object (one line of `inspect --json`).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let p = &self.provenance;
        let key = self.record.key.as_deref();
        let key_utf8 = key.and_then(|k| std::str::from_utf8(k).ok());
        serde_json::json!({
            "dlt_topic": &*self.record.topic,
            "dlt_partition": self.record.partition,
            "dlt_offset": self.record.offset,
            "original_topic": p.original_topic,
            "original_partition": p.original_partition,
            "original_offset": p.original_offset,
            "original_timestamp": p.original_timestamp.and_then(epoch_millis).and_then(rfc3339),
            "consumer_group": p.consumer_group,
            "kind": p.failure_kind.map(DeadLetterReason::as_str),
            "exception": p.exception_class,
            "error": p.error,
            "attempts": p.attempts,
            "first_failure": p.first_failure.and_then(rfc3339),
            "last_failure": p.last_failure.and_then(rfc3339),
            "redrive_count": p.redrive_count,
            "retry_tier": self.tier().map(|(t, _)| t),
            "due": self.tier().and_then(|(_, d)| d).and_then(rfc3339),
            "deferred": self.record.headers.get_str(tiers::DEFERRED) == Some("true"),
            "key": key_utf8,
            "key_hex": key.filter(|_| key_utf8.is_none()).map(hex),
            "value_bytes": self.record.value.as_ref().map(|v| v.len()),
            "value_dropped_bytes": p.value_dropped_bytes,
            "trace_id": self.record.trace_context().map(|t| t.trace_id_hex()),
            "headers": self
                .record
                .headers
                .iter()
                .filter(|h| {
                    !headers::ALL
                        .iter()
                        .chain(tiers::ALL)
                        .any(|name| h.is_named(name))
                })
                .map(header_json)
                .collect::<Vec<_>>(),
        })
    }
}

/// One of a letter's own headers in `inspect --json`: `name` is the name when it is UTF-8,
/// else escaped without loss (`\xNN` for each byte that is not UTF-8, `\\` for a backslash)
/// with the exact bytes in `name_hex`; `value` is the value when it is UTF-8 (`null` for a
/// null value), else `value_hex` holds it.
fn header_json(h: &Header) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    match h.key_str() {
        Some(name) => {
            out.insert("name".into(), name.into());
        }
        None => {
            out.insert("name".into(), h.key_escaped().into());
            out.insert("name_hex".into(), hex(h.key()).into());
        }
    }
    match h.value().map(|v| (v, std::str::from_utf8(v))) {
        None => {
            out.insert("value".into(), serde_json::Value::Null);
        }
        Some((_, Ok(text))) => {
            out.insert("value".into(), text.into());
        }
        Some((bytes, Err(_))) => {
            out.insert("value_hex".into(), hex(bytes).into());
        }
    }
    out.into()
}

// ───────────── progress ─────────────

/// Reports progress at most every `every`.
pub(crate) struct Progress<'a> {
    every: Duration,
    last: Instant,
    report: Box<dyn FnMut(&str) + 'a>,
}

impl<'a> Progress<'a> {
    pub(crate) fn new(every: Duration, report: impl FnMut(&str) + 'a) -> Self {
        Progress {
            every,
            last: Instant::now(),
            report: Box::new(report),
        }
    }

    /// No progress output.
    #[allow(dead_code)] // tests/dlt_tool.rs
    pub(crate) fn silent() -> Self {
        Progress::new(Duration::MAX, |_| {})
    }

    fn tick(&mut self, line: impl FnOnce() -> String) {
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            (self.report)(&line());
        }
    }
}

// ───────────── inspect ─────────────

/// Every letter of `dlt` that `selector` selects, from the beginning to the current end, and
/// how many records were read.
pub(crate) fn inspect(
    kafka: &Kafka,
    dlt: &str,
    selector: &LetterSelector,
    progress: &mut Progress<'_>,
) -> Result<(Vec<Letter>, u64)> {
    let letters = kafka.topic(dlt).read(selector, |read, total| {
        progress.tick(|| format!("inspect {dlt}: read {read} of {total}"));
    })?;
    Ok((
        letters.letters.into_iter().map(Letter::new).collect(),
        letters.read,
    ))
}

/// What `inspect --group-by` groups letters by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GroupBy {
    /// The letter's key.
    Key,
    /// The value of the letter's last header of this name.
    Header(String),
}

impl GroupBy {
    /// `key`, or a header name (`header:NAME` for a header named `key`).
    pub(crate) fn parse(s: &str) -> std::result::Result<GroupBy, String> {
        let s = s.trim();
        match s {
            "" => Err("give `key` or a header name, e.g. event-id".into()),
            "key" => Ok(GroupBy::Key),
            _ => Ok(GroupBy::Header(
                s.strip_prefix("header:").unwrap_or(s).to_owned(),
            )),
        }
    }

    /// The name shown: `key` or the header's name.
    pub(crate) fn name(&self) -> &str {
        match self {
            GroupBy::Key => "key",
            GroupBy::Header(name) => name,
        }
    }

    /// The letter's value for this grouping, shown (`None`: it has none).
    fn value_of(&self, letter: &Letter) -> Option<String> {
        let bytes = match self {
            GroupBy::Key => letter.record.key.as_deref(),
            GroupBy::Header(name) => letter.record.headers.get(name),
        }?;
        Some(match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => format!("0x{}", hex(bytes)),
        })
    }
}

/// Letters that carry one value of a [`GroupBy`]: copies of one event when grouped by its
/// event id.
#[derive(Debug)]
pub(crate) struct Group<'a> {
    /// The value (`None`: the letters without one).
    pub(crate) value: Option<String>,
    pub(crate) letters: Vec<&'a Letter>,
}

/// `letters` grouped by `by`, groups in the order of their first letter, letters in their
/// order; letters without a value last, in one group.
pub(crate) fn group<'a>(letters: &'a [Letter], by: &GroupBy) -> Vec<Group<'a>> {
    let mut groups: Vec<Group<'a>> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut without = Vec::new();
    for letter in letters {
        match by.value_of(letter) {
            None => without.push(letter),
            Some(value) => match index.get(&value) {
                Some(&i) => groups[i].letters.push(letter),
                None => {
                    index.insert(value.clone(), groups.len());
                    groups.push(Group {
                        value: Some(value),
                        letters: vec![letter],
                    });
                }
            },
        }
    }
    if !without.is_empty() {
        groups.push(Group {
            value: None,
            letters: without,
        });
    }
    groups
}

/// A group as one JSON object (one line of `inspect --group-by --json`).
pub(crate) fn group_json(by: &GroupBy, group: &Group<'_>) -> serde_json::Value {
    serde_json::json!({
        "group_by": by.name(),
        "value": group.value,
        "letters": group.letters.len(),
        "kinds": group
            .letters
            .iter()
            .map(|l| l.provenance.failure_kind.map(DeadLetterReason::as_str))
            .collect::<Vec<_>>(),
        "fates": group.letters.iter().map(|l| l.to_json()).collect::<Vec<_>>(),
    })
}

// ───────────── redrive ─────────────

/// Runs `redrive` on `dlt`, reporting progress.
pub(crate) fn redrive(
    kafka: &Kafka,
    dlt: &str,
    redrive: &Redrive,
    progress: &mut Progress<'_>,
) -> std::result::Result<RedriveReport, RedriveStopped> {
    kafka.topic(dlt).redrive(redrive, |r| {
        progress.tick(|| {
            format!(
                "redrive {dlt}: read {} of {}, redriven {}, filtered out {}, refused {}",
                r.read,
                r.total,
                r.redriven.len(),
                r.filtered_out,
                r.refused.len()
            )
        });
    })
}

/// A letter republished as one JSON object (a line of `redrive --json`).
pub(crate) fn redriven_json(r: &Redriven, dry_run: bool) -> serde_json::Value {
    let key = r.key.as_deref();
    let key_utf8 = key.and_then(|k| std::str::from_utf8(k).ok());
    serde_json::json!({
        "status": if dry_run { "would-redrive" } else { "redriven" },
        "letter": place_json(&r.letter),
        "original": r.original,
        "key": key_utf8,
        "key_hex": key.filter(|_| key_utf8.is_none()).map(hex),
        "destination": {
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
        },
        "redrive_count": r.redrive_count,
    })
}

/// A letter refused as one JSON object (a line of `redrive --json`).
pub(crate) fn refused_json(r: &Refused) -> serde_json::Value {
    serde_json::json!({
        "status": "refused",
        "letter": place_json(&r.letter),
        "original": r.original,
        "reason": r.reason,
    })
}

fn place_json(p: &LetterPlace) -> serde_json::Value {
    serde_json::json!({"topic": p.topic, "partition": p.partition, "offset": p.offset})
}

// ───────────── formatting ─────────────

/// RFC 3339, UTC, to the millisecond; `None` for a time RFC 3339 cannot write (before the
/// epoch, after 9999-12-31: a header is untrusted, and humantime's `Display` fails on those,
/// which `to_string` turns into a panic).
pub(crate) fn rfc3339(t: SystemTime) -> Option<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    write!(out, "{}", humantime::format_rfc3339_millis(in_range(t)?))
        .ok()
        .map(|()| out)
}

/// As [`rfc3339`], to the second.
pub(crate) fn rfc3339_seconds(t: SystemTime) -> Option<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    write!(out, "{}", humantime::format_rfc3339_seconds(in_range(t)?))
        .ok()
        .map(|()| out)
}

/// `t` when it lies between the epoch and the last millisecond of year 9999.
fn in_range(t: SystemTime) -> Option<SystemTime> {
    let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis();
    (ms <= headers::MAX_TIME_MS as u128).then_some(t)
}

/// `ms` since the epoch as a time, within the range [`rfc3339`] writes (else `None`).
fn epoch_millis(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms)
        .ok()
        .filter(|&ms| ms <= headers::MAX_TIME_MS as u64)?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A table cell: control characters (newlines, tabs, terminal escapes from a crafted
/// header) become spaces, so a row stays one line and cannot drive the terminal.
pub(crate) fn cell(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A time given on the command line: RFC 3339 (`2026-05-01T10:00:00Z`, or with a space, or a
/// bare date), milliseconds since the epoch, or a duration meaning "that long ago"
/// (`90m`, `2h`, `7days`).
pub(crate) fn parse_time(s: &str) -> std::result::Result<SystemTime, String> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    if s.len() == 10
        && let Ok(t) = humantime::parse_rfc3339_weak(&format!("{s}T00:00:00Z"))
    {
        return Ok(t);
    }
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(UNIX_EPOCH + Duration::from_millis(ms));
    }
    if let Ok(ago) = humantime::parse_duration(s) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{s} ago is before the epoch"));
    }
    Err(format!(
        "{s:?} is not a time: use RFC 3339 (2026-05-01T10:00:00Z), epoch milliseconds, or a duration ago (2h, 30m, 7days)"
    ))
}

/// A header filter given on the command line: `NAME=VALUE` (the first `=` splits; the value
/// may be empty or hold more `=`).
pub(crate) fn parse_header(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!(
            "{s:?} is not a header filter: use NAME=VALUE, e.g. event-id=e-1"
        )),
    }
}

/// A failure kind given on the command line.
pub(crate) fn parse_kind(s: &str) -> std::result::Result<DeadLetterReason, String> {
    DeadLetterReason::parse(s.trim()).ok_or_else(|| {
        format!("{s:?} is not a failure kind: use decode, permanent, retries-exhausted or panic")
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The letters as an aligned table.
pub(crate) fn table(letters: &[Letter]) -> String {
    let rows: Vec<Vec<String>> = letters.iter().map(row).collect();
    render(&COLUMNS, &rows)
}

/// The letters grouped (`inspect --group-by`): one table whose first column is the group's
/// value and how many letters it has, the letters of a group on consecutive rows, a blank
/// line between groups.
pub(crate) fn grouped_table(groups: &[Group<'_>], by: &GroupBy) -> String {
    let first = by.name().to_uppercase();
    let mut header = vec![first.as_str()];
    header.extend(COLUMNS);
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        if i > 0 {
            rows.push(Vec::new());
        }
        for (j, letter) in group.letters.iter().enumerate() {
            let label = if j > 0 {
                String::new()
            } else {
                let value = group
                    .value
                    .as_deref()
                    .map_or_else(|| format!("(no {})", by.name()), cell);
                match group.letters.len() {
                    1 => value,
                    n => format!("{value} ({n} letters)"),
                }
            };
            let mut r = vec![label];
            r.extend(row(letter));
            rows.push(r);
        }
    }
    render(&header, &rows)
}

const COLUMNS: [&str; 9] = [
    "DLT",
    "ORIGIN",
    "KIND",
    "ATT",
    "FIRST FAILURE",
    "LAST FAILURE",
    "RDR",
    "KEY",
    "ERROR",
];

/// A letter's cells under [`COLUMNS`].
fn row(l: &Letter) -> Vec<String> {
    const ERROR_WIDTH: usize = 60;
    let time = |t: Option<SystemTime>| t.and_then(rfc3339_seconds).unwrap_or_else(|| "-".into());
    let p = &l.provenance;
    let error = cell(p.error.as_deref().unwrap_or("-"));
    let error = if error.chars().count() > ERROR_WIDTH {
        let cut: String = error.chars().take(ERROR_WIDTH - 1).collect();
        format!("{cut}…")
    } else {
        error
    };
    vec![
        l.place(),
        cell(&p.original_coordinates()),
        {
            let kind = p.failure_kind.map_or("-", DeadLetterReason::as_str);
            match l.tier() {
                Some((tier, _)) => format!("{kind} (in tier {tier})"),
                None => kind.to_owned(),
            }
        },
        p.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        time(p.first_failure),
        time(p.last_failure),
        p.redrive_count.to_string(),
        l.key_text().map_or_else(|| "-".to_owned(), |k| cell(&k)),
        error,
    ]
}

/// `header` and `rows` as aligned columns (an empty row is a blank line).
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every failure kind a letter can carry is accepted by `--kind` and named in its error.
    #[test]
    fn every_failure_kind_is_a_kind_filter() {
        let refused = parse_kind("nope").expect_err("not a kind");
        for kind in [
            DeadLetterReason::Decode,
            DeadLetterReason::Permanent,
            DeadLetterReason::RetriesExhausted,
            DeadLetterReason::Panic,
        ] {
            assert_eq!(parse_kind(kind.as_str()), Ok(kind));
            assert!(refused.contains(kind.as_str()), "{refused} omits {kind}");
        }
    }

    #[test]
    fn tier_records_show_their_tier_and_due_time() {
        let record = RawRecord::builder("orders.retry.2")
            .header(tiers::TIER, "2")
            .header(tiers::DUE_MS, "1000")
            .header(headers::ATTEMPTS, "3")
            .header("own", "x")
            .build();
        let letter = Letter::new(record);
        assert_eq!(
            letter.tier(),
            Some((2, Some(UNIX_EPOCH + Duration::from_secs(1))))
        );
        let json = letter.to_json();
        assert_eq!(json["retry_tier"], 2);
        assert_eq!(json["attempts"], 3);
        assert_eq!(json["deferred"], false);
        let own = json["headers"].as_array().unwrap();
        assert_eq!(
            own.len(),
            1,
            "tier and provenance headers are not listed as own: {own:?}"
        );
    }
}
