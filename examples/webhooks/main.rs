//! # webhooks — HTTP webhooks to many endpoints, where one endpoint's trouble stays its own
//!
//! A webhook sender as teams write it: `WebhookEvent`s arrive on `webhooks.v1`, keyed by the
//! endpoint they go to, and a [`kourier::RetryingConsumer`] runs a [`kourier::Handler`] that
//! POSTs each one with `reqwest`. Every reply is classified once (`delivery::classify`):
//! `2xx` delivered; `503` or no connection: the endpoint is down; `429`: it asks for a pause
//! (`Retry-After`); `410`: it is gone; `408`, `425`, other `5xx` and timeouts are transient;
//! other `4xx` permanent. kourier does the rest: a breaker per endpoint (`Destinations::by_key`,
//! delivery rule 19 in the crate docs), so an endpoint that is down, paused or gone holds only
//! its own webhooks while the others go out; in-place retries, then retry tiers
//! (`<topic>.retry.<n>`) that keep each endpoint's order (`with_key_order`, a ledger in Redis);
//! each event delivered once (Redis idempotency on the `event-id` header); a consumer-wide
//! breaker that opens only when the failures span many endpoints (the trouble is ours then);
//! dead letters to `webhooks.v1.dlt`; offsets committed once a webhook is settled.
//!
//! With Kafka on 127.0.0.1:9092 and Redis on 127.0.0.1:6379 (`scripts/services up`):
//!
//! ```text
//! cargo run --example webhooks -- demo
//! ```
//!
//! The demo creates the topics if missing, starts an HTTP server on loopback with endpoints
//! that behave on purpose (`server.rs`: healthy, flaky, rate-limited, gone, rejecting, and
//! down: the `down-*` endpoints are on a second address that refuses connections for the
//! first seconds, `--outage-secs`, default 3), publishes `--events` webhooks (default 400)
//! round-robin over `--endpoints` endpoints (default 40), runs the sender until every webhook
//! is delivered or dead-lettered, shuts it down gracefully and prints a summary: webhooks
//! delivered per endpoint kind, dead letters by reason, the calls to the down, gone and
//! rate-limited endpoints, the endpoint breakers open at the peak and the consumer-wide
//! breaker's state. The exit status is non-zero when a webhook was not settled in time or
//! ended unexpectedly.
//!
//! Running it again is safe: each run's event ids start with a fresh run id, and the group
//! `webhook-sender` resumes after what it committed. Other subcommands: `run` (the sender
//! alone, until Ctrl-C), `publish` (sample webhooks to a server started with `server`) and
//! `server` (the test server alone): try them in three terminals. `run --health-addr
//! 127.0.0.1:9465` also serves kourier's health routes (`/livez`, `/readyz`, `/status`;
//! `kourier::health`) while the sender runs. Settings come from flags or
//! the environment (`KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL`, `WEBHOOKS_TOPIC`, ...); `--help`
//! lists them.

mod delivery;
mod demo;
mod event;
// Shared with the mail notifier: committed offsets and reading dead letters back.
#[path = "../mail_notifier/kafka.rs"]
mod kafka;
mod samples;
mod sender;
mod server;

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::delivery::{Deliverer, Journal};
use crate::demo::DemoConfig;
use crate::sender::Settings;
use crate::server::TestServer;

#[derive(Debug, Parser)]
#[command(
    about = "kourier's webhooks example: Kafka events in, HTTP webhooks out, a breaker per endpoint"
)]
struct Cli {
    #[command(flatten)]
    sender: SenderArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct SenderArgs {
    /// Kafka brokers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    bootstrap_servers: String,
    /// Redis for the idempotency store and the retry tiers' key-order ledger.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/",
        global = true
    )]
    redis_url: String,
    /// The events topic; dead letters go to `<topic>.dlt`, retries to `<topic>.retry.<n>`.
    #[arg(
        long,
        env = "WEBHOOKS_TOPIC",
        default_value = "webhooks.v1",
        global = true
    )]
    topic: String,
    /// The consumer group.
    #[arg(
        long,
        env = "WEBHOOKS_GROUP",
        default_value = "webhook-sender",
        global = true
    )]
    group: String,
    /// Partitions of the topics when they are created.
    #[arg(long, env = "WEBHOOKS_PARTITIONS", default_value_t = 6, global = true)]
    partitions: i32,
    /// Retry tiers: delays in seconds of the tier topics `<topic>.retry.<n>`, comma-separated.
    /// A webhook that still fails after its 3 in-place attempts waits there (its endpoint's
    /// later webhooks behind it) before the dead-letter topic. Short for the demo: a real
    /// sender waits minutes to hours.
    #[arg(
        long,
        env = "WEBHOOKS_RETRY_TIERS",
        value_delimiter = ',',
        default_values_t = [2, 30],
        global = true
    )]
    retry_tiers: Vec<u64>,
    /// Seconds each request may take (connecting: 2 s of it at most).
    #[arg(long, env = "WEBHOOKS_REQUEST_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    request_timeout_secs: u64,
    /// At most this many calls per second to one endpoint.
    #[arg(long, env = "WEBHOOKS_ENDPOINT_RATE", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    endpoint_rate: u32,
    /// The consumer-wide breaker opens only when the failures span this many endpoints
    /// (2 to 1000).
    #[arg(long, env = "WEBHOOKS_MIN_FAILING_ENDPOINTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=1000), global = true)]
    min_failing_endpoints: u32,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the test server, publish webhooks, deliver them, print what happened.
    Demo {
        /// Webhooks to publish.
        #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..))]
        events: u32,
        /// Endpoints to spread them over (the 8 that misbehave, the rest healthy).
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(samples::MIN_ENDPOINTS as i64..=10_000))]
        endpoints: u32,
        /// Seconds the `down-*` endpoints refuse connections after the webhooks are
        /// published (0: they are never down).
        #[arg(long, default_value_t = 3)]
        outage_secs: u64,
        /// Seconds to wait for every webhook to be settled.
        #[arg(long, default_value_t = 60)]
        settle_timeout: u64,
    },
    /// Run the sender until Ctrl-C (webhooks go to the URLs their events carry).
    Run {
        /// Serve kourier's health routes on this address while the sender runs: `/livez`,
        /// `/readyz`, `/status` (JSON) (e.g. 127.0.0.1:9465).
        #[arg(long, env = "WEBHOOKS_HEALTH_ADDR")]
        health_addr: Option<SocketAddr>,
    },
    /// Publish sample webhooks to the endpoints of a server started with `server`.
    Publish {
        /// Where that server's endpoints are.
        #[arg(long, env = "HOOKS_URL", default_value = "http://127.0.0.1:8080")]
        hooks_url: String,
        /// Where its `down-*` endpoints are.
        #[arg(long, env = "DOWN_HOOKS_URL", default_value = "http://127.0.0.1:8081")]
        down_hooks_url: String,
        /// Webhooks to publish.
        #[arg(long, default_value_t = 400)]
        events: u32,
        /// Endpoints to spread them over.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(samples::MIN_ENDPOINTS as i64..=10_000))]
        endpoints: u32,
        /// Prefix of the event ids (default: one derived from the clock).
        #[arg(long, value_parser = parse_run_id)]
        run_id: Option<String>,
    },
    /// Run the demo's test server alone until Ctrl-C.
    Server {
        /// Where the endpoints listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Where the `down-*` endpoints listen, when they are up.
        #[arg(long, default_value = "127.0.0.1:8081")]
        down_addr: SocketAddr,
        /// Seconds the `down-*` endpoints refuse connections after the start (0: never).
        #[arg(long, default_value_t = 30)]
        down_secs: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,webhooks=info".into()),
        )
        // Logs to stderr, the demo's summary to stdout.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let a = cli.sender;
    let settings = Settings {
        bootstrap: a.bootstrap_servers,
        redis_url: a.redis_url,
        topic: a.topic,
        group: a.group,
        partitions: a.partitions,
        retry_tiers: a
            .retry_tiers
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect(),
        request_timeout: Duration::from_secs(a.request_timeout_secs),
        endpoint_rate: a.endpoint_rate,
        min_failing_endpoints: a.min_failing_endpoints,
    };
    match cli.command {
        Command::Demo {
            events,
            endpoints,
            outage_secs,
            settle_timeout,
        } => {
            let config = DemoConfig {
                settings,
                run_id: clock_run_id(),
                events: events as usize,
                endpoints: endpoints as usize,
                outage: Duration::from_secs(outage_secs),
                settle_timeout: Duration::from_secs(settle_timeout),
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
        Command::Run { health_addr } => {
            sender::ensure_topics(&settings).await?;
            let deliverer = Deliverer::new(settings.request_timeout, Journal::default())
                .context("building the HTTP client")?;
            let consumer = sender::consumer(&settings, deliverer).await?;
            // kourier's health routes on a port of their own; stopped when dropped.
            let _health = match health_addr {
                Some(addr) => {
                    let server = kourier::health::serve(addr, consumer.monitor())
                        .await
                        .with_context(|| format!("listening on {addr} for the health routes"))?;
                    let addr = server.local_addr();
                    tracing::info!(%addr, "health at http://{addr}/livez, /readyz and /status");
                    Some(server)
                }
                None => None,
            };
            tracing::info!(topic = %settings.topic, group = %settings.group, "sender running; Ctrl-C stops it");
            let report = consumer.run(kourier::shutdown_signal()).await?;
            if report.is_clean() {
                tracing::info!("sender stopped");
            } else {
                tracing::warn!(
                    abandoned = report.abandoned,
                    "sender stopped; records were abandoned and will be delivered again"
                );
            }
        }
        Command::Publish {
            hooks_url,
            down_hooks_url,
            events,
            endpoints,
            run_id,
        } => {
            sender::ensure_topics(&settings).await?;
            let run_id = run_id.unwrap_or_else(clock_run_id);
            let publisher = samples::publisher(&settings.bootstrap, &settings.topic)?;
            let events = samples::events(
                &run_id,
                events as usize,
                endpoints as usize,
                &hooks_url,
                &down_hooks_url,
            );
            let published = samples::publish(&publisher, events).await?;
            for p in &published {
                println!(
                    "{:<12} {:<14} {}/{}@{}  {}",
                    p.event.event_id,
                    p.event.endpoint_id,
                    settings.topic,
                    p.partition,
                    p.offset,
                    p.event.url
                );
            }
        }
        Command::Server {
            addr,
            down_addr,
            down_secs,
        } => serve(addr, down_addr, Duration::from_secs(down_secs)).await?,
    }
    Ok(())
}

/// The `server` subcommand: the test server until Ctrl-C, its `down-*` endpoints down for
/// `down_for` first; then the answers it gave, per endpoint.
async fn serve(addr: SocketAddr, down_addr: SocketAddr, down_for: Duration) -> Result<()> {
    let mut down = !down_for.is_zero();
    let server = TestServer::start(addr, down_addr, down)
        .await
        .with_context(|| format!("starting the test server on {addr} and {down_addr}"))?;
    println!(
        "webhook endpoints at http://{}/hooks/<endpoint id>, down-* endpoints at http://{}/hooks/<id>{}; Ctrl-C stops it",
        server.addr(),
        server.down_addr(),
        if down {
            format!(" (refusing connections for {}s)", down_for.as_secs())
        } else {
            String::new()
        }
    );
    let back = tokio::time::sleep(down_for);
    let stop = kourier::shutdown_signal();
    tokio::pin!(back, stop);
    loop {
        tokio::select! {
            () = &mut back, if down => {
                server.set_down(false).await.context("bringing the down-* endpoints back")?;
                down = false;
                println!("down-* endpoints back: accepting connections");
            }
            () = &mut stop => break,
        }
    }
    let mut answers: std::collections::BTreeMap<String, std::collections::BTreeMap<u16, usize>> =
        std::collections::BTreeMap::new();
    for c in server.calls() {
        *answers
            .entry(c.endpoint_id)
            .or_default()
            .entry(c.status)
            .or_default() += 1;
    }
    println!("{} request(s) answered", server.calls().len());
    for (endpoint, statuses) in answers {
        let statuses: Vec<String> = (statuses.iter())
            .map(|(status, n)| format!("{status} ×{n}"))
            .collect();
        println!("  {endpoint:<14} {}", statuses.join(", "));
    }
    Ok(())
}

/// Run ids go into event ids: letters, digits, `-`, `_`.
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
