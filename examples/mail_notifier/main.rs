//! # mail_notifier — kourier's showcase: Kafka events in, mails out, nothing lost or sent twice
//!
//! A notification service as teams write it: `NotifyEvent`s arrive on `notify.v1` (keyed by
//! user id), and a [`kourier::RetryingConsumer`] runs a [`kourier::Handler`] that mails each
//! one over SMTP with `lettre`. kourier adds what such a service needs to be reliable:
//! SMTP `4xx` replies and connection trouble are *transient* (retried with back-off), `5xx`
//! replies and invalid addresses are *permanent* (dead-lettered to `notify.v1.dlt` at once),
//! undecodable records are dead-lettered without reaching the handler, each event id is mailed
//! once (Redis idempotency), one user's mails go out in order (`ProcessingOrder::Key`), and offsets
//! are committed only once a record is settled.
//!
//! One command on a fresh machine (starts Kafka and Redis, then runs the demo):
//!
//! ```text
//! scripts/demo
//! ```
//!
//! or, with Kafka on 127.0.0.1:9092 and Redis on 127.0.0.1:6379 already running:
//!
//! ```text
//! cargo run --example mail_notifier -- demo
//! ```
//!
//! The demo creates the topics if missing, starts a real SMTP server on loopback (it refuses
//! `@bounce.invalid` with `550` and greylists `flaky*@` addresses once with `451`), publishes
//! sample events with the typed `Publisher` — normal mails, a duplicate event, a record that
//! is not JSON, a bouncing address, a greylisted one, an invalid one — runs the notifier until
//! every record is settled; then the outage sample: the SMTP server refuses connections for a
//! few seconds (`--outage-secs`, default 4; 0 skips it) while more mails come in, and the
//! consumer's breaker opens, probes and closes, so those mails wait and go out once the server
//! is back, nothing dead-lettered for the outage. Then it shuts the notifier down gracefully
//! and prints what became of each record.
//! The mails are written as `.eml` files to `target/mail_notifier/outbox/<run id>/`.
//!
//! The exit status is non-zero when a record was not settled in time or ended unexpectedly.
//!
//! Running it again is safe: each run's event ids start with a fresh run id, so a new run's
//! events are new events, while the group `notifier` resumes after the records it already
//! committed (records an interrupted run left behind are handled then, and listed apart).
//! `--run-id <an earlier run's id>` re-publishes that run's events: within the 6 h the
//! idempotency store remembers them, every valid one is skipped as a duplicate (the summary
//! then flags them as unexpected, by design). Other subcommands: `run` (the notifier alone, against
//! any SMTP server, until Ctrl-C), `publish` (the sample events) and `smtp-server` (the
//! loopback server alone): try them in three terminals. Settings come from flags or the
//! environment (`KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL`, `SMTP_HOST`, `SMTP_PORT`, ...);
//! `--help` lists them.
//!
//! `--retry-tiers 30,300` (with `demo` and `run`) adds retry tiers: a mail that still fails
//! after its in-place attempts waits 30 s in `<topic>.retry.1`, then 5 min in
//! `<topic>.retry.2`, before the dead-letter topic, and the user's later mails wait behind it
//! (`with_key_order`, the ledger in the same Redis). The tier topics are created when missing.
//!
//! `--batch` (or `NOTIFY_BATCH=true`; with `demo` and `run`) is batch mode: the handler is a
//! `kourier::batch::BatchHandler` (`mailer::BulkMailer`) that sends the mails of the records
//! running at the same moment in one SMTP session (one connection and `EHLO`, then
//! `MAIL FROM`/`RCPT TO`/`DATA` per mail) instead of one pooled send per handler call, and
//! answers for each mail on its own (`BatchOutcome::each`): a `550` dead-letters that mail
//! only, a `451` retries that mail only, a refused session makes the batch's mails wait for the
//! relay. Everything else holds as in the default mode, per record: one user's mails in order
//! (a batch holds one record per user), Redis idempotency, retries, dead letters, the breaker.
//! A mail waits up to 20 ms for others to join its batch; the summary counts the bulk calls.
//!
//! `--queue` (or `NOTIFY_QUEUE=true`; with `demo` and `run`; kourier's experimental `queue`
//! feature: `cargo run --features queue --example mail_notifier -- --queue demo`) is queue
//! mode: the same mailer, Redis idempotency, retry policy and dead-letter topic run by a
//! `kourier::queue::QueueConsumer` over a Kafka share group (`<group>-queue`, from the earliest
//! record), which hands records to its members one by one, each locked for the member that got
//! it: members may outnumber partitions, and a user's mails may go out in any order. A refused
//! connection holds the mail (its lock renewed) instead of opening a breaker; retry tiers,
//! kourier's metrics and the health routes' consumer status are consumer-group features
//! (`--retry-tiers` is refused, the probes keep answering "starting").
//!
//! `--metrics-addr 127.0.0.1:9464` (with `demo` and `run`) serves, on that one address, while
//! the notifier runs:
//!
//! - `GET /metrics`: kourier's metrics (records handled, retried, dead-lettered, duplicates,
//!   handler durations, lag, connection state, ...; see `kourier::metrics`) for Prometheus;
//! - `GET /livez`: `200` while the consumer is starting, running (its poll loop going round)
//!   or draining at shutdown, `503` once it has stopped or failed;
//! - `GET /readyz`: `200` while the consumer runs, reaches the Kafka cluster and has at least
//!   one partition assigned, else `503` with the reasons
//!   (`{"ready":false,"reasons":["no partitions assigned"]}`, ...);
//! - `GET /status`: the consumer's snapshot as JSON.
//!
//! Those are kourier's health routes (`kourier::health`, feature `health`) mounted in the
//! example's own axum router (`ops_server.rs`), which adds an index at `/`.
//! `examples/mail_notifier/ops/` has a Grafana dashboard, Prometheus alert rules and
//! Kubernetes probe settings for them.

mod demo;
mod event;
mod kafka;
mod mailer;
mod notifier;
mod ops_server;
mod samples;
mod smtp_server;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::demo::DemoConfig;
use crate::mailer::{BulkMailer, Journal, Mailer};
use crate::notifier::Settings;
use crate::ops_server::{OpsServer, Probes};
use crate::smtp_server::SmtpServer;

#[derive(Debug, Parser)]
#[command(about = "kourier's mail notifier example: Kafka events in, mails out")]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct KafkaArgs {
    /// Kafka brokers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    bootstrap_servers: String,
    /// Redis for the idempotency store.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/",
        global = true
    )]
    redis_url: String,
    /// The events topic; dead letters go to `<topic>.dlt`.
    #[arg(long, env = "NOTIFY_TOPIC", default_value = "notify.v1", global = true)]
    topic: String,
    /// The consumer group.
    #[arg(long, env = "NOTIFY_GROUP", default_value = "notifier", global = true)]
    group: String,
    /// Partitions of the topics when they are created.
    #[arg(long, env = "NOTIFY_PARTITIONS", default_value_t = 6, global = true)]
    partitions: i32,
    /// With `demo` and `run`: serve kourier's metrics for Prometheus at http://<ADDR>/metrics and
    /// liveness and readiness probes at /livez and /readyz, the consumer's status at /status
    /// (e.g. 127.0.0.1:9464).
    #[arg(long, env = "METRICS_ADDR", global = true)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Retry tiers: delays in seconds of the tier topics `<topic>.retry.<n>`, comma-separated
    /// (e.g. `30,300`). A mail that still fails after its in-place attempts waits there
    /// (the user's later mails behind it) before the dead-letter topic. Off when not given.
    #[arg(long, env = "NOTIFY_RETRY_TIERS", value_delimiter = ',', global = true)]
    retry_tiers: Vec<u64>,
    /// With `demo` and `run`: batch mode. The mails of records running at the same moment
    /// (one per user) go out in bulk calls of up to 50, each over one SMTP session, with an
    /// outcome per mail (kourier's `BatchHandler`). Off: one mail per handler call.
    #[arg(long, env = "NOTIFY_BATCH", global = true)]
    batch: bool,
    /// With `demo` and `run`: queue mode (experimental). The same mailer, idempotency and
    /// dead letters over a Kafka share group (`<group>-queue`): records shared one by one
    /// between members, no per-user order.
    #[cfg(feature = "queue")]
    #[arg(long, env = "NOTIFY_QUEUE", global = true)]
    queue: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start an SMTP server, publish sample events, mail them, print what happened.
    Demo {
        /// Where the mails are written (a folder per run inside it).
        #[arg(long, env = "MAIL_OUTBOX", default_value = default_outbox())]
        outbox: PathBuf,
        /// Prefix of this run's event ids (default: one derived from the clock).
        #[arg(long, value_parser = parse_run_id)]
        run_id: Option<String>,
        /// Seconds to wait for every sample record to be settled.
        #[arg(long, default_value_t = 60)]
        settle_timeout: u64,
        /// The outage sample: after the other samples, the SMTP server refuses connections
        /// this many seconds while more mails come in (0: no outage).
        #[arg(long, default_value_t = 4)]
        outage_secs: u64,
    },
    /// Run the notifier against an SMTP server until Ctrl-C.
    Run {
        /// SMTP server to send through (plain SMTP, no TLS or login: see mailer.rs).
        #[arg(long, env = "SMTP_HOST", default_value = "127.0.0.1")]
        smtp_host: String,
        /// Its port.
        #[arg(long, env = "SMTP_PORT", default_value_t = 2525)]
        smtp_port: u16,
    },
    /// Publish the sample events (for a notifier started with `run`).
    Publish {
        /// Prefix of the event ids (default: one derived from the clock).
        #[arg(long, value_parser = parse_run_id)]
        run_id: Option<String>,
    },
    /// Run the demo's SMTP server alone until Ctrl-C.
    SmtpServer {
        /// Port to listen on, on 127.0.0.1.
        #[arg(long, env = "SMTP_PORT", default_value_t = 2525)]
        smtp_port: u16,
        /// Where the mails are written.
        #[arg(long, env = "MAIL_OUTBOX", default_value = default_outbox())]
        outbox: PathBuf,
    },
}

fn default_outbox() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/target/mail_notifier/outbox")
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,mail_notifier=info".into()),
        )
        // Logs to stderr, the demo's summary to stdout.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let probes = Probes::default();
    // Up before the consumer is built, so that the probes answer while it starts; kept until
    // `main` returns.
    let _ops_server = match cli.kafka.metrics_addr {
        Some(addr) if matches!(cli.command, Command::Demo { .. } | Command::Run { .. }) => {
            Some(serve_ops(addr, probes.clone()).await?)
        }
        Some(_) => {
            tracing::warn!("--metrics-addr applies to `demo` and `run` only; ignored");
            None
        }
        None => None,
    };
    let batch = cli.kafka.batch;
    if batch && !matches!(cli.command, Command::Demo { .. } | Command::Run { .. }) {
        tracing::warn!("--batch applies to `demo` and `run` only; ignored");
    }
    #[cfg(feature = "queue")]
    let queue = cli.kafka.queue;
    #[cfg(not(feature = "queue"))]
    let queue = false;
    if queue && !matches!(cli.command, Command::Demo { .. } | Command::Run { .. }) {
        tracing::warn!("--queue applies to `demo` and `run` only; ignored");
    }
    if queue && batch {
        tracing::warn!("--batch does not apply in queue mode; ignored");
    }
    let settings = Settings {
        bootstrap: cli.kafka.bootstrap_servers,
        redis_url: cli.kafka.redis_url,
        topic: cli.kafka.topic,
        group: cli.kafka.group,
        partitions: cli.kafka.partitions,
        retry_tiers: cli
            .kafka
            .retry_tiers
            .iter()
            .map(|s| std::time::Duration::from_secs(*s))
            .collect(),
    };
    match cli.command {
        Command::Demo {
            outbox,
            run_id,
            settle_timeout,
            outage_secs,
        } => {
            let config = DemoConfig {
                settings,
                outbox,
                run_id: run_id.unwrap_or_else(clock_run_id),
                settle_timeout: Duration::from_secs(settle_timeout),
                probes,
                outage: (outage_secs > 0).then(|| Duration::from_secs(outage_secs)),
                batch,
                queue,
            };
            // Listen for Ctrl-C from now on (a signal future only listens once polled).
            let (interrupted, interrupt) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                kourier::shutdown_signal().await;
                let _ = interrupted.send(());
            });
            let interrupt = async move {
                let _ = interrupt.await;
            };
            let report = demo::run_demo(config, interrupt).await?;
            println!("{}", report.summary());
            if !report.settled || !report.surprises().is_empty() {
                std::process::exit(1);
            }
        }
        Command::Run {
            smtp_host,
            smtp_port,
        } => {
            notifier::ensure_topics(&settings).await?;
            #[cfg(feature = "queue")]
            if queue {
                let mailer = Mailer::plaintext(&smtp_host, smtp_port, Journal::default());
                let consumer = notifier::queue_consumer(&settings, mailer, |_, _| {}).await?;
                tracing::info!(topic = %settings.topic, group = %settings.share_group(), smtp = %format!("{smtp_host}:{smtp_port}"), "notifier running in queue mode; Ctrl-C stops it");
                let report = consumer.run_until_signal().await?;
                tracing::info!(?report, "notifier stopped");
                return Ok(());
            }
            let started = |batch: bool| tracing::info!(topic = %settings.topic, group = %settings.group, smtp = %format!("{smtp_host}:{smtp_port}"), batch, "notifier running; Ctrl-C stops it");
            let report = if batch {
                let mailer = BulkMailer::plaintext(&smtp_host, smtp_port, Journal::default());
                let consumer = notifier::consumer(&settings, notifier::bulk(mailer)).await?;
                started(true);
                probes.run(consumer, kourier::shutdown_signal()).await?
            } else {
                let mailer = Mailer::plaintext(&smtp_host, smtp_port, Journal::default());
                let consumer = notifier::consumer(&settings, mailer).await?;
                started(false);
                probes.run(consumer, kourier::shutdown_signal()).await?
            };
            if report.is_clean() {
                tracing::info!("notifier stopped");
            } else {
                tracing::warn!(abandoned = report.abandoned, first = ?report.abandoned_records.first(), "notifier stopped; records were abandoned and will be delivered again");
            }
        }
        Command::Publish { run_id } => {
            notifier::ensure_topics(&settings).await?;
            let run_id = run_id.unwrap_or_else(clock_run_id);
            let publisher = samples::publisher(&settings.bootstrap, &settings.topic)?;
            let published = samples::publish(&publisher, samples::samples(&run_id)).await?;
            for p in &published {
                println!(
                    "{:<16} {:<6} {}/{}@{}  ({:?})",
                    p.sample.event_id,
                    p.sample.user_id,
                    settings.topic,
                    p.partition,
                    p.offset,
                    p.sample.expect
                );
            }
        }
        Command::SmtpServer { smtp_port, outbox } => {
            let server = SmtpServer::start(&format!("127.0.0.1:{smtp_port}"), &outbox)
                .with_context(|| format!("starting the SMTP server on 127.0.0.1:{smtp_port}"))?;
            println!(
                "SMTP server on {}, writing mails to {}; Ctrl-C stops it",
                server.addr(),
                server.outbox().display()
            );
            kourier::shutdown_signal().await;
            println!("{} mail(s) received", server.received().len());
        }
    }
    Ok(())
}

/// Installs a Prometheus recorder for kourier's metrics and serves them, with the probes, at
/// `http://<addr>/` (see `ops_server`). It must be installed before the consumer runs.
async fn serve_ops(addr: std::net::SocketAddr, probes: Probes) -> Result<OpsServer> {
    let metrics = ops_server::install_prometheus()?;
    let server = OpsServer::start(addr, metrics, probes).await?;
    let addr = server.addr();
    tracing::info!(%addr, "metrics at http://{addr}/metrics, probes at /livez and /readyz, status at /status");
    Ok(server)
}

/// Run ids go into event ids, file names and a mail address: letters, digits, `-`, `_`.
fn parse_run_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err("use 1-32 letters, digits, '-' or '_'".into())
    }
}

/// A short, increasing run id from the clock: `r` + seconds since the epoch in base 36.
fn clock_run_id() -> String {
    let mut secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut digits = Vec::new();
    while secs > 0 {
        digits.push(char::from_digit((secs % 36) as u32, 36).unwrap_or('0'));
        secs /= 36;
    }
    let mut id = String::from("r");
    id.extend(digits.iter().rev());
    id
}
