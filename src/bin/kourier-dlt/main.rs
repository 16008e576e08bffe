//! # kourier-dlt — inspect and redrive a dead-letter topic
//!
//! A command-line tool for the dead-letter topics kourier writes (and Spring Kafka's: the
//! `kafka_dlt-*` headers are the same), built on
//! [`kourier::dead_letter::DeadLetterTopic`]:
//!
//! ```text
//! cargo install kourier --features cli     # or, in a checkout: cargo install --path . --features cli
//! kourier-dlt inspect notify.v1.dlt
//! kourier-dlt inspect notify.v1.dlt --json --kind permanent --since 2h
//! kourier-dlt inspect notify.v1.dlt --group-by             # copies of one event together (event-id)
//! kourier-dlt redrive notify.v1.dlt --at 0:42              # one letter, by its place
//! kourier-dlt redrive notify.v1.dlt --header event-id=e-1  # the letters of one event
//! kourier-dlt redrive notify.v1.dlt --at 0:40-49 --kind retries-exhausted --dry-run
//! kourier-dlt redrive notify.v1.dlt --resume-group replay-2026-12-06 --until 2026-12-06T08:00:00Z
//! ```
//!
//! In a checkout without installing: `cargo run --features cli --bin kourier-dlt -- inspect ...`.
//!
//! - `inspect <dlt-topic>` reads the topic from the beginning to its current end and lists
//!   each dead letter's provenance — original topic/partition/offset, failure kind, error,
//!   attempts, first and last failure times, redrive count — as a table, or as JSON lines
//!   with `--json`, which also lists each letter's own headers (`headers`: `name`, `value`;
//!   a name that is not UTF-8 is shown escaped, `\xNN` per byte, with its exact bytes in
//!   `name_hex`, and a value that is not UTF-8 as `value_hex`). Header names and values are
//!   redriven byte for byte, whatever they hold. A retry-tier topic (`<topic>.retry.<n>`) can
//!   be inspected too: its records carry the same provenance, and the table's kind column
//!   says `(in tier n)`; the JSON adds `retry_tier`, `due` and `deferred`. Letters that went
//!   through tiers are dead-lettered as their source record (attempts of all tiers summed).
//!
//!   `--group-by <header name | key>` (`--group-by` alone: `event-id`) lists the copies of one
//!   event together: one row per letter under the event's value with how many letters it
//!   has, each with its fate (place, kind, error, attempts, failure times, redrive count);
//!   groups in the order of their first letter, letters without the header last. With
//!   `--json`, one object per group (`group_by`, `value`, `letters`, `kinds`, `fates`). A
//!   header literally named `key` is `header:key`. One event can have several letters (a
//!   crash between a letter's acknowledgement and its mark in the idempotency store, see
//!   delivery rule 18 in the crate docs; a consumer without a store): this is where they show.
//! - `redrive <dlt-topic>` publishes the selected letters again, each to its original topic
//!   (or `--to <topic>`), with the original key, value and headers **minus** the dead-letter
//!   headers, **plus** a raised `kourier-redrive-count` and `kourier-redriven-from:
//!   <dlt>/<partition>@<offset>`. It prints each letter republished with its coordinates —
//!   `redrove <dlt>/<p>@<o> (<original>) -> <topic>/<p>@<o>` — and each letter refused with
//!   the reason, then a summary; with `--json`, one object per letter — `status`
//!   (`redriven`, `would-redrive` or `refused`), `letter` and `destination` (`topic`,
//!   `partition`, `offset`), `original`, `key`, `redrive_count` or `reason` — and the summary
//!   on stderr.
//!
//!   **Stateless by default:** it reads with assign and seek, joins no group and commits
//!   nothing; running it again redrives the same letters again. A consumer with an
//!   idempotency store handles the copies of one letter (same redrive count) once: the
//!   dedup key of a redriven record is its event's key at its redrive count.
//!   **`--resume-group NAME`** makes a large replay resumable: the position of group NAME
//!   in the dead-letter topic is committed right after each republished letter is
//!   acknowledged (a rerun after a crash redrives again at most the letter in flight), and
//!   past the letters passed over at the end. The commits carry the selection (the filters
//!   below), and a run with another selection refuses the group's position (exit 1) rather
//!   than pass over letters it would select: one selection, one group. Give time bounds as
//!   absolute times there (`2h` ago moves between runs).
//!
//!   A letter is **refused**, with its reason, and the others go on (also with `--dry-run`)
//!   when its destination topic does not exist or is not a valid name, when the broker
//!   refuses the record (too large for its destination, not authorized), when it was redriven
//!   `--max-redrives` times already (default 3; a record that keeps failing cannot loop
//!   forever), or when it is a metadata-only letter whose value was too large to keep
//!   (`--force` redrives the last two). `--dry-run` checks the same and publishes nothing.
//!
//! - `console --listen ADDR --dlt TOPIC [--consumer NAME=URL]` (feature `console`) serves
//!   one web page: each consumer's JSON status (kourier's health routes), the dead-letter
//!   topics browsed with the filters below, a letter's headers and value, and redrive of
//!   ticked letters after a dry-run confirmation (see the README, "The console page").
//!
//! Filters, for both (every filter given must match; a repeated filter matches any of its
//! values): `--at P:O` or `--at P:FIRST-LAST` (the letter's place in the dead-letter topic;
//! the tool reads only those offsets), `--header NAME=VALUE` (the letter's last header of
//! that name has exactly that value, e.g. an event id), `--key`, `--kind` (decode,
//! permanent, retries-exhausted, panic), `--since`/`--until` (when the record was given up —
//! its last failure, else the letter's timestamp: RFC 3339, epoch ms, or a duration ago
//! such as `2h`). Progress goes to stderr every 2 s on long runs. A missing topic or an
//! unreachable broker is an error within `--timeout` (default 10 s), never a hang.
//!
//! Exit status: 0 when everything selected was redriven (or listed), **2 when a letter was
//! refused** (the others were redriven), 1 on an error that stopped the run (what was
//! redriven before it is printed first).
//!
//! Headers are untrusted (anyone who can write to a topic can write them): the tool reads
//! them by the rules of [`kourier::dead_letter::headers`] and never panics on any value. A
//! time outside 1970..9999 is shown as `-` (`null` in JSON), control characters in table
//! cells as spaces; a redrive count that is too large or unreadable counts as `u32::MAX`, so
//! `--max-redrives` refuses the letter; a letter naming an invalid topic is refused.
//!
//! Do not run two resumable redrives with the same `--resume-group` at once: each would
//! redrive the same letters.

#[cfg(feature = "console")]
mod console;
mod dlt;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use kourier::DeadLetterReason;
use kourier::dead_letter::{LetterRange, LetterSelector, Redrive, RedriveReport};

use crate::dlt::{Kafka, Progress};

#[derive(Debug, Parser)]
#[command(about = "Inspect and redrive a kourier (or Spring Kafka) dead-letter topic")]
struct Cli {
    /// Kafka brokers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    bootstrap_servers: String,
    /// How long any single wait on Kafka may take (e.g. `10s`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the dead letters of a topic with their provenance.
    Inspect {
        /// The dead-letter topic, e.g. `notify.v1.dlt`.
        dlt_topic: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Show the copies of one event together: group by this header's value, or by
        /// `key` (alone: `event-id`).
        #[arg(long, value_name = "HEADER|key", num_args = 0..=1, default_missing_value = "event-id", value_parser = dlt::GroupBy::parse)]
        group_by: Option<dlt::GroupBy>,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Publish selected dead letters again (to their original topic by default).
    Redrive {
        /// The dead-letter topic, e.g. `notify.v1.dlt`.
        dlt_topic: String,
        /// Publish to this topic instead of each letter's original topic.
        #[arg(long)]
        to: Option<String>,
        /// Resumable: keep the run's position in the dead-letter topic as this consumer
        /// group's (tied to the filters). Without it, nothing is committed.
        #[arg(long, value_name = "GROUP")]
        resume_group: Option<String>,
        /// Show what would be redriven; publish and commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object per letter (redriven or refused) instead of text lines; the
        /// summary goes to stderr.
        #[arg(long)]
        json: bool,
        /// Refuse letters already redriven this many times.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
        /// Redrive refused letters too (too many redrives, value dropped).
        #[arg(long)]
        force: bool,
        /// Testing aid: exit like a crash right after the Nth re-publish is acknowledged,
        /// before its progress is committed.
        #[arg(long, hide = true)]
        crash_after: Option<u64>,
        /// Removed (stateless by default now): refused with the migration.
        #[arg(long, hide = true)]
        group: Option<String>,
        /// Removed (every run reads from the beginning now): refused with the migration.
        #[arg(long, hide = true)]
        from_beginning: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Serve a web page to watch consumers, browse dead-letter topics and redrive letters
    /// (feature `console`).
    #[cfg(feature = "console")]
    Console {
        /// The address to listen on (no login: keep it on loopback, or behind a proxy that
        /// authenticates).
        #[arg(long, default_value = "127.0.0.1:8088")]
        listen: std::net::SocketAddr,
        /// A dead-letter topic to browse (repeatable; the first is shown first).
        #[arg(long = "dlt", value_name = "TOPIC", required = true)]
        dlts: Vec<String>,
        /// A consumer's JSON status URL, e.g. `notifier=http://127.0.0.1:9090/status`
        /// (kourier's health routes; repeatable).
        #[arg(long = "consumer", value_name = "NAME=URL", value_parser = console::parse_consumer)]
        consumers: Vec<(String, String)>,
        /// Most letters listed on one page.
        #[arg(long, default_value_t = 50)]
        max_letters: usize,
        /// Most records read for one page.
        #[arg(long, default_value_t = 10_000)]
        max_read: u64,
    },
}

#[derive(Debug, Args)]
struct FilterArgs {
    /// Only the letter at this place in the dead-letter topic, `PARTITION:OFFSET`, or the
    /// letters of a range, `PARTITION:FIRST-LAST` (repeatable).
    #[arg(long = "at", value_name = "P:O[-O]", value_delimiter = ',')]
    places: Vec<LetterRange>,
    /// Only letters whose header NAME has exactly this value, e.g. `event-id=e-1`
    /// (repeatable: all must match).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = dlt::parse_header)]
    headers: Vec<(String, String)>,
    /// Only this failure kind: decode, permanent, retries-exhausted or panic (repeatable).
    #[arg(long = "kind", value_parser = dlt::parse_kind, value_delimiter = ',')]
    kinds: Vec<DeadLetterReason>,
    /// Only letters given up at or after this time (RFC 3339, epoch ms, or e.g. `2h` ago).
    #[arg(long, value_parser = dlt::parse_time)]
    since: Option<SystemTime>,
    /// Only letters given up before this time.
    #[arg(long, value_parser = dlt::parse_time)]
    until: Option<SystemTime>,
    /// Only letters with exactly this key (UTF-8).
    #[arg(long)]
    key: Option<String>,
}

impl From<FilterArgs> for LetterSelector {
    fn from(a: FilterArgs) -> LetterSelector {
        let mut s = LetterSelector::new();
        for place in a.places {
            s = s.at(place);
        }
        for (name, value) in a.headers {
            s = s.header(name, value);
        }
        for kind in a.kinds {
            s = s.kind(kind);
        }
        if let Some(t) = a.since {
            s = s.since(t);
        }
        if let Some(t) = a.until {
            s = s.until(t);
        }
        if let Some(key) = a.key {
            s = s.key(key);
        }
        s
    }
}

/// Exit status when letters were refused (the others redriven).
const REFUSED: u8 = 2;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // librdkafka reports every refused connection; the tool's own error says it once.
                .unwrap_or_else(|_| "error,librdkafka=off,rdkafka=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn progress() -> Progress<'static> {
    Progress::new(Duration::from_secs(2), |line| eprintln!("{line}"))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let kafka = Kafka {
        bootstrap: cli.bootstrap_servers,
        timeout: cli.timeout,
    };
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Inspect {
            dlt_topic,
            json,
            group_by,
            filter,
        } => {
            let (letters, read) =
                dlt::inspect(&kafka, &dlt_topic, &filter.into(), &mut progress())?;
            let groups = group_by.as_ref().map(|by| (by, dlt::group(&letters, by)));
            match (&groups, json) {
                (Some((by, groups)), true) => {
                    for group in groups {
                        writeln!(stdout, "{}", dlt::group_json(by, group))?;
                    }
                }
                (Some((by, groups)), false) => {
                    write!(stdout, "{}", dlt::grouped_table(groups, by))?
                }
                (None, true) => {
                    for letter in &letters {
                        writeln!(stdout, "{}", letter.to_json())?;
                    }
                }
                (None, false) => write!(stdout, "{}", dlt::table(&letters))?,
            }
            let mut summary = format!(
                "{} of {read} dead letter(s) in {dlt_topic} shown",
                letters.len()
            );
            if let Some((by, groups)) = &groups {
                let several = groups
                    .iter()
                    .filter(|g| g.value.is_some() && g.letters.len() > 1)
                    .count();
                summary.push_str(&format!(
                    ", {} value(s) of {}, {several} with more than one letter",
                    groups.iter().filter(|g| g.value.is_some()).count(),
                    by.name()
                ));
            }
            if json || !std::io::stdout().is_terminal() {
                stdout.flush()?;
                eprintln!("{summary}");
            } else {
                writeln!(stdout, "{summary}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Redrive {
            dlt_topic,
            to,
            resume_group,
            dry_run,
            json,
            max_redrives,
            force,
            crash_after,
            group,
            from_beginning,
            filter,
        } => {
            if group.is_some() || from_beginning {
                anyhow::bail!(
                    "--group and --from-beginning were removed: redrive is stateless by default (every run reads from the beginning, nothing is committed); for a resumable run use --resume-group with a new group name"
                );
            }
            let mut redrive = Redrive::new(filter.into())
                .dry_run(dry_run)
                .max_redrives(max_redrives)
                .force(force);
            redrive.to = to;
            redrive.resume_group = resume_group;
            redrive.crash_after = crash_after;
            match dlt::redrive(&kafka, &dlt_topic, &redrive, &mut progress()) {
                Ok(report) => {
                    print_redrive(&mut stdout, &redrive, &report, json)?;
                    Ok(if report.refused.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(REFUSED)
                    })
                }
                Err(stopped) => {
                    print_redrive(&mut stdout, &redrive, &stopped.report, json)?;
                    stdout.flush()?;
                    Err(anyhow::Error::new(*stopped.error).context(format!(
                        "redrive of {dlt_topic} stopped after redriving {} letter(s)",
                        stopped.report.redriven.len()
                    )))
                }
            }
        }
        #[cfg(feature = "console")]
        Command::Console {
            listen,
            dlts,
            consumers,
            max_letters,
            max_read,
        } => {
            drop(stdout); // the console prints its address
            let console = console::Console {
                kafka,
                dlts,
                consumers,
                max_letters: max_letters.max(1),
                max_read: max_read.max(1),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(console::serve(listen, console))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What a redrive did (or, with `--dry-run`, would do), letter by letter, then a summary
/// (to stderr with `--json`).
fn print_redrive(
    stdout: &mut impl std::io::Write,
    redrive: &Redrive,
    report: &RedriveReport,
    json: bool,
) -> Result<()> {
    let verb = if redrive.dry_run {
        "would redrive"
    } else {
        "redrove"
    };
    for r in &report.redriven {
        if json {
            writeln!(stdout, "{}", dlt::redriven_json(r, redrive.dry_run))?;
            continue;
        }
        let key = r.key.as_deref().map_or_else(
            || "-".to_owned(),
            |k| dlt::cell(&String::from_utf8_lossy(k)),
        );
        writeln!(
            stdout,
            "{verb} {}  key={key} redrive-count={}",
            dlt::cell(&r.to_string()),
            r.redrive_count
        )?;
    }
    for r in &report.refused {
        if json {
            writeln!(stdout, "{}", dlt::refused_json(r))?;
            continue;
        }
        writeln!(
            stdout,
            "refused {} ({}): {}",
            r.letter,
            dlt::cell(&r.original),
            dlt::cell(&r.reason)
        )?;
    }
    let summary = format!(
        "{}: read {}, {} {}, filtered out {}, refused {}{}",
        report.dlt,
        report.read,
        verb,
        report.redriven.len(),
        report.filtered_out,
        report.refused.len(),
        match (&redrive.resume_group, redrive.dry_run) {
            (_, true) => " (dry run: nothing published or committed)".to_owned(),
            (Some(group), false) => format!("; position committed for group {group}"),
            (None, false) => " (stateless: nothing committed)".to_owned(),
        }
    );
    if json {
        stdout.flush()?;
        eprintln!("{summary}");
    } else {
        writeln!(stdout, "{summary}")?;
    }
    Ok(())
}
