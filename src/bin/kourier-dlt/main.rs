//! # kourier-dlt — inspect and redrive a dead-letter topic
//!
//! A command-line tool for the dead-letter topics kourier writes (and Spring Kafka's: the
//! `kafka_dlt-*` headers are the same), built on
//! [`kourier::dead_letter::Provenance`] and [`kourier::dead_letter::RedriveRecord`]:
//!
//! ```text
//! cargo install kourier --features cli     # or, in a checkout: cargo install --path . --features cli
//! kourier-dlt inspect notify.v1.dlt
//! kourier-dlt inspect notify.v1.dlt --json --kind permanent --since 2h
//! kourier-dlt redrive notify.v1.dlt --kind retries-exhausted --dry-run
//! kourier-dlt redrive notify.v1.dlt --key u-42
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
//! - `redrive <dlt-topic>` publishes the selected letters again, each to its original topic
//!   (or `--to <topic>`), with the original key, value and headers **minus** the dead-letter
//!   headers, **plus** a raised `kourier-redrive-count`. Its progress is the committed offset
//!   of a consumer group (`--group`, default `kourier-dlt-redrive`) in the dead-letter topic,
//!   committed for each letter only after the broker acknowledged its re-publish: a rerun
//!   after a crash goes on after the last committed letter, so at most the one letter in
//!   flight at the crash is redriven twice. Letters passed over (filtered out or refused)
//!   are passed for that group too; `--from-beginning` or another `--group` reconsiders
//!   them. A letter already redriven `--max-redrives` times (default 3) is refused unless
//!   `--force`, so a record that keeps failing cannot loop forever; so is a metadata-only
//!   letter whose value was too large to keep. `--dry-run` shows what would be redriven.
//!
//! Filters, for both: `--kind` (decode, permanent, retries-exhausted, panic; repeatable),
//! `--since`/`--until` (when the record was given up: RFC 3339, epoch ms, or a duration ago
//! such as `2h`), `--key`. Progress goes to stderr every 2 s on long runs. A missing topic or
//! an unreachable broker is an error within `--timeout` (default 10 s), never a hang.
//!
//! Headers are untrusted (anyone who can write to a topic can write them): the tool reads
//! them by the rules of [`kourier::dead_letter::headers`] and never panics on any value. A
//! time outside 1970..9999 is shown as `-` (`null` in JSON), control characters in table
//! cells as spaces; a redrive count that is too large or unreadable counts as `u32::MAX`, so
//! `--max-redrives` refuses the letter; a letter naming an invalid topic is refused.
//!
//! Do not run two redrives of one dead-letter topic with the same group at once: each
//! would redrive the same letters.

mod dlt;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use kourier::DeadLetterReason;

use crate::dlt::{Filter, Kafka, Progress, RedriveOptions};

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
        /// The consumer group that keeps the redrive's position in the dead-letter topic.
        #[arg(long, default_value = "kourier-dlt-redrive")]
        group: String,
        /// Show what would be redriven; publish and commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse letters already redriven this many times.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
        /// Redrive refused letters too (too many redrives, value dropped).
        #[arg(long)]
        force: bool,
        /// Ignore the group's position and consider every letter again.
        #[arg(long)]
        from_beginning: bool,
        /// Testing aid: exit like a crash right after the Nth re-publish is acknowledged,
        /// before its progress is committed.
        #[arg(long, hide = true)]
        crash_after: Option<u64>,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

#[derive(Debug, Args)]
struct FilterArgs {
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

impl From<FilterArgs> for Filter {
    fn from(a: FilterArgs) -> Filter {
        Filter {
            kinds: a.kinds,
            since: a.since,
            until: a.until,
            key: a.key.map(String::into_bytes),
        }
    }
}

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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn progress() -> Progress<'static> {
    Progress::new(Duration::from_secs(2), |line| eprintln!("{line}"))
}

fn run(cli: Cli) -> Result<()> {
    let kafka = Kafka {
        bootstrap: cli.bootstrap_servers,
        timeout: cli.timeout,
    };
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Inspect {
            dlt_topic,
            json,
            filter,
        } => {
            let (letters, read) =
                dlt::inspect(&kafka, &dlt_topic, &filter.into(), &mut progress())?;
            if json {
                for letter in &letters {
                    writeln!(stdout, "{}", letter.to_json())?;
                }
            } else {
                write!(stdout, "{}", dlt::table(&letters))?;
            }
            let summary = format!(
                "{} of {read} dead letter(s) in {dlt_topic} shown",
                letters.len()
            );
            if json || !std::io::stdout().is_terminal() {
                stdout.flush()?;
                eprintln!("{summary}");
            } else {
                writeln!(stdout, "{summary}")?;
            }
        }
        Command::Redrive {
            dlt_topic,
            to,
            group,
            dry_run,
            max_redrives,
            force,
            from_beginning,
            crash_after,
            filter,
        } => {
            let opts = RedriveOptions {
                dlt: dlt_topic,
                to,
                group,
                filter: filter.into(),
                dry_run,
                max_redrives,
                force,
                from_beginning,
                crash_after,
            };
            let report = dlt::redrive(&kafka, &opts, &mut progress())?;
            print_redrive(&mut stdout, &opts, &report)?;
        }
    }
    Ok(())
}

/// What a redrive did (or, with `--dry-run`, would do), letter by letter, then a summary.
fn print_redrive(
    stdout: &mut impl std::io::Write,
    opts: &RedriveOptions,
    report: &dlt::RedriveReport,
) -> Result<()> {
    let dry_run = opts.dry_run;
    let verb = if dry_run { "would redrive" } else { "redrove" };
    for r in &report.redriven {
        let at = match r.offset {
            Some(o) => format!("{}/{}@{o}", r.topic, r.partition),
            None => r.topic.clone(),
        };
        writeln!(
            stdout,
            "{verb} {} ({}) -> {at}  key={} redrive-count={}",
            r.letter,
            r.original,
            r.key.as_deref().unwrap_or("-"),
            r.redrive_count
        )?;
    }
    for r in &report.refused {
        writeln!(
            stdout,
            "refused {} ({}): {}",
            r.letter, r.original, r.reason
        )?;
    }
    writeln!(
        stdout,
        "{}: read {}, {} {}, filtered out {}, refused {}{}",
        opts.dlt,
        report.read,
        verb,
        report.redriven.len(),
        report.filtered_out,
        report.refused.len(),
        if dry_run {
            " (dry run: nothing published or committed)".to_owned()
        } else {
            format!("; progress committed for group {}", opts.group)
        }
    )?;
    Ok(())
}
