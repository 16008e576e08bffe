//! The demo: webhooks through the real sender to a real (loopback) HTTP server whose
//! endpoints misbehave on purpose, and a report of what became of every webhook — built from
//! evidence: the requests the server answered, the handler's calls, the dead letters read back
//! from Kafka and the consumer's snapshots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kourier::dead_letter::headers;
use kourier::rdkafka::Message as _;
use kourier::rdkafka::message::OwnedMessage;
use kourier::{BreakerState, BreakerStatus};
use tokio::time::Instant;

use crate::delivery::{Call, Deliverer, Journal, Outcome};
use crate::event::EVENT_ID_HEADER;
use crate::kafka::{CommittedOffsets, end_offsets, read_from};
use crate::samples::{self, Published};
use crate::sender::{self, Settings};
use crate::server::{Behaviour, ServerCall, TestServer};

/// A demo run's settings.
#[derive(Debug, Clone)]
pub(crate) struct DemoConfig {
    pub(crate) settings: Settings,
    /// Prefix of this run's event ids.
    pub(crate) run_id: String,
    /// Webhooks to publish, round-robin over `endpoints` endpoints.
    pub(crate) events: usize,
    pub(crate) endpoints: usize,
    /// How long the `down-*` endpoints refuse connections, counted from when the webhooks are
    /// published (zero: they are never down).
    pub(crate) outage: Duration,
    /// How long to wait for every webhook to be settled.
    pub(crate) settle_timeout: Duration,
}

/// A dead letter read back from the dead-letter topic.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub(crate) event_id: Option<String>,
    /// The record key: the endpoint.
    pub(crate) endpoint_id: Option<String>,
    pub(crate) failure_kind: String,
    pub(crate) error: String,
    pub(crate) attempts: String,
}

/// What became of one published webhook.
#[derive(Debug, Clone)]
pub(crate) enum Fate {
    /// The endpoint answered `2xx` this many times (once, unless something is wrong).
    Delivered(usize),
    DeadLettered(DeadLetter),
    /// Not settled when the demo stopped waiting.
    Unsettled,
}

/// The most endpoint breakers open at once during the run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Peak {
    pub(crate) open: usize,
    /// Since the run started.
    pub(crate) at: Duration,
    /// The endpoints not closed then: name, state, whether it was gone.
    pub(crate) endpoints: Vec<(String, BreakerState, bool)>,
}

/// Everything a demo run did. Times are since the run started.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) config: DemoConfig,
    pub(crate) partitions: i32,
    pub(crate) server: (SocketAddr, SocketAddr),
    pub(crate) published: Vec<Published>,
    /// One per published webhook, in the same order.
    pub(crate) fates: Vec<Fate>,
    /// The handler's calls for this run's webhooks.
    pub(crate) calls: Vec<Call>,
    /// The requests the server answered for this run's webhooks.
    pub(crate) server_calls: Vec<ServerCall>,
    /// This run's dead letters.
    pub(crate) dead_letters: Vec<DeadLetter>,
    /// This run's webhooks whose offsets the group has not committed after the shutdown.
    pub(crate) uncommitted: usize,
    /// Handler calls and dead letters for webhooks published before this run (left over in
    /// the topic).
    pub(crate) earlier_calls: usize,
    pub(crate) earlier_letters: usize,
    pub(crate) settled: bool,
    pub(crate) interrupted: bool,
    pub(crate) started: Instant,
    pub(crate) elapsed: Duration,
    /// When the webhooks were published.
    pub(crate) published_at: Duration,
    /// When the `down-*` endpoints came back, if they were down.
    pub(crate) back_at: Option<Duration>,
    pub(crate) peak: Peak,
    /// The endpoints whose breaker the snapshots (ten times a second) saw not closed, and
    /// whether it was because they were gone.
    pub(crate) opened: BTreeMap<String, bool>,
    /// The consumer-wide breaker at the end of the run.
    pub(crate) breaker: Option<BreakerStatus>,
    /// Webhooks forwarded to each retry tier (after failures, or to wait behind one).
    pub(crate) forwarded: Vec<u64>,
}

/// How waiting for the webhooks ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    All,
    TimedOut,
    Interrupted,
}

/// Runs the demo: topics, test server (its `down-*` endpoints down), sender, webhooks; brings
/// the `down-*` endpoints back after the outage; waits until every webhook is delivered or
/// dead-lettered, `settle_timeout` passes or `interrupt` resolves; then shuts the sender down
/// gracefully and collects the report.
pub(crate) async fn run_demo(
    config: DemoConfig,
    interrupt: impl Future<Output = ()>,
) -> Result<Report> {
    let started = Instant::now();
    let settings = &config.settings;
    let (partitions, dlt_partitions) = sender::ensure_topics(settings).await?;
    let dlt = settings.dead_letter_topic();
    let dlt_start = blocking({
        let (bootstrap, dlt) = (settings.bootstrap.clone(), dlt.clone());
        move || end_offsets(&bootstrap, &dlt, dlt_partitions)
    })
    .await?;
    let read_letters = {
        let (bootstrap, dlt, run) = (settings.bootstrap.clone(), dlt.clone(), run_prefix(&config));
        move || {
            let (bootstrap, dlt, start, run) = (
                bootstrap.clone(),
                dlt.clone(),
                dlt_start.clone(),
                run.clone(),
            );
            blocking(move || {
                let letters: Vec<DeadLetter> = read_from(&bootstrap, &dlt, dlt_partitions, &start)?
                    .iter()
                    .map(parse_dead_letter)
                    .collect();
                let (ours, earlier): (Vec<DeadLetter>, Vec<DeadLetter>) = letters
                    .into_iter()
                    .partition(|d| d.event_id.as_ref().is_some_and(|id| id.starts_with(&run)));
                Ok((ours, earlier))
            })
        }
    };

    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let down = !config.outage.is_zero();
    let server = TestServer::start(loopback, loopback, down)
        .await
        .context("starting the webhook test server")?;
    tracing::info!(addr = %server.addr(), down_addr = %server.down_addr(), "webhook test server listening");

    let journal = Journal::default();
    let deliverer = Deliverer::new(settings.request_timeout, journal.clone())
        .context("building the HTTP client")?;
    let consumer = sender::consumer(settings, deliverer).await?;
    let monitor = consumer.monitor();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut running = tokio::spawn(consumer.run(async {
        let _ = stop_rx.await;
    }));

    let publisher = samples::publisher(&settings.bootstrap, &settings.topic)?;
    let events = samples::events(
        &config.run_id,
        config.events,
        config.endpoints,
        &format!("http://{}", server.addr()),
        &format!("http://{}", server.down_addr()),
    );
    let published = samples::publish(&publisher, events).await?;
    let published_at = started.elapsed();
    tracing::info!(webhooks = published.len(), "webhooks published");

    let run = run_prefix(&config);
    let deadline = started + config.settle_timeout;
    let back_due = started + published_at + config.outage;
    let mut back_at = (!down).then_some(Duration::ZERO);
    let mut peak = Peak::default();
    let mut opened: BTreeMap<String, bool> = BTreeMap::new();
    let mut checked: Option<Instant> = None;
    tokio::pin!(interrupt);
    let settled = loop {
        let snapshot = monitor.snapshot();
        for t in snapshot.destinations.iter().flat_map(|d| &d.top) {
            *opened.entry(t.name.clone()).or_default() |= t.gone.is_some();
        }
        if let Some(d) = &snapshot.destinations
            && d.open > peak.open
        {
            peak = Peak {
                open: d.open,
                at: started.elapsed(),
                endpoints: (d.top.iter())
                    .map(|t| (t.name.clone(), t.state, t.gone.is_some()))
                    .collect(),
            };
        }
        if back_at.is_none() && Instant::now() >= back_due {
            server
                .set_down(false)
                .await
                .context("bringing the down-* endpoints back")?;
            back_at = Some(started.elapsed());
            tracing::info!("down-* endpoints back: accepting connections");
        }
        let delivered = delivered_events(&server.calls(), &run);
        let dead = usize::try_from(snapshot.dead_lettered.total()).unwrap_or(usize::MAX);
        // The counts say done: confirm with this run's dead letters (at most once a second).
        if back_at.is_some()
            && snapshot.in_flight == 0
            && delivered + dead >= published.len()
            && checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            checked = Some(Instant::now());
            let (ours, _) = read_letters().await?;
            if delivered + ours.len() >= published.len() {
                break Settled::All;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = interrupt.as_mut() => break Settled::Interrupted,
            result = &mut running => {
                let _report = result.context("the consumer task panicked")?.context("the consumer stopped")?;
                bail!("the consumer stopped on its own");
            }
        }
        if Instant::now() >= deadline {
            break Settled::TimedOut;
        }
    };
    let end = monitor.snapshot();

    let _ = stop_tx.send(());
    let shutdown = running
        .await
        .context("the consumer task panicked")?
        .context("the consumer failed while shutting down")?;
    if !shutdown.is_clean() {
        tracing::warn!(
            abandoned = shutdown.abandoned,
            "the shutdown abandoned records; they will be delivered again"
        );
    }

    // The shutdown committed what settled meanwhile: every webhook, when all settled.
    let committed = blocking({
        let (b, g, t) = (
            settings.bootstrap.clone(),
            settings.group.clone(),
            settings.topic.clone(),
        );
        move || CommittedOffsets::new(&b, &g, &t, partitions)?.get()
    })
    .await?;
    let uncommitted = (published.iter())
        .filter(|p| committed.get(&p.partition).is_none_or(|c| *c <= p.offset))
        .count();
    let (dead_letters, earlier): (Vec<DeadLetter>, Vec<DeadLetter>) = read_letters().await?;
    let all_calls = journal.calls();
    let (calls, earlier_calls): (Vec<Call>, Vec<Call>) = all_calls
        .into_iter()
        .partition(|c| c.event_id.starts_with(&run));
    let server_calls: Vec<ServerCall> = (server.calls().into_iter())
        .filter(|c| c.event_id.as_ref().is_some_and(|id| id.starts_with(&run)))
        .collect();
    let mut accepted: HashMap<&str, usize> = HashMap::new();
    for c in &server_calls {
        if (200..300).contains(&c.status)
            && let Some(id) = &c.event_id
        {
            *accepted.entry(id.as_str()).or_default() += 1;
        }
    }
    let fates = (published.iter())
        .map(|p| {
            let letter = (dead_letters.iter())
                .find(|d| d.event_id.as_deref() == Some(p.event.event_id.as_str()));
            match (letter, accepted.get(p.event.event_id.as_str())) {
                (Some(d), _) => Fate::DeadLettered(d.clone()),
                (None, Some(n)) => Fate::Delivered(*n),
                (None, None) => Fate::Unsettled,
            }
        })
        .collect();

    Ok(Report {
        partitions,
        server: (server.addr(), server.down_addr()),
        published,
        fates,
        calls,
        server_calls,
        dead_letters,
        uncommitted,
        earlier_calls: earlier_calls.len(),
        earlier_letters: earlier.len(),
        settled: settled == Settled::All,
        interrupted: settled == Settled::Interrupted,
        started,
        elapsed: started.elapsed(),
        published_at,
        back_at: back_at.filter(|_| down),
        peak,
        opened,
        breaker: end.breaker,
        forwarded: end.forwarded,
        config,
    })
}

/// `<run id>-`: the start of this run's event ids.
fn run_prefix(config: &DemoConfig) -> String {
    format!("{}-", config.run_id)
}

/// This run's webhooks the server answered with `2xx` (each counted once).
fn delivered_events(calls: &[ServerCall], run: &str) -> usize {
    (calls.iter())
        .filter(|c| (200..300).contains(&c.status))
        .filter_map(|c| c.event_id.as_deref())
        .filter(|id| id.starts_with(run))
        .collect::<BTreeSet<_>>()
        .len()
}

/// The calls the server answered with `429` and `Retry-After`, each with the calls of the
/// same endpoint that came before the pause it asked for was over: (the `429`, the calls).
pub(crate) fn calls_inside_pauses(calls: &[ServerCall]) -> Vec<(&ServerCall, Vec<&ServerCall>)> {
    (calls.iter())
        .filter_map(|pause| {
            let seconds = pause.retry_after.filter(|_| pause.status == 429)?;
            let until = pause.at + Duration::from_secs(seconds);
            let inside: Vec<&ServerCall> = (calls.iter())
                .filter(|c| c.endpoint_id == pause.endpoint_id && c.at > pause.at && c.at < until)
                .collect();
            Some((pause, inside))
        })
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking Kafka call panicked")?
}

fn parse_dead_letter(m: &OwnedMessage) -> DeadLetter {
    // Read through kourier: header names are bytes, and rdkafka's own getters panic on a
    // name that is not UTF-8 (which a dead letter keeps as it came).
    let own = m.headers().map(kourier::Headers::from).unwrap_or_default();
    let text = |name: &str| {
        own.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    DeadLetter {
        event_id: text(EVENT_ID_HEADER),
        endpoint_id: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        failure_kind: text(headers::FAILURE_KIND).unwrap_or_default(),
        error: text(headers::EXCEPTION_MESSAGE).unwrap_or_default(),
        attempts: text(headers::ATTEMPTS).unwrap_or_default(),
    }
}

fn behaviour(endpoint: &str) -> Option<Behaviour> {
    Behaviour::of(endpoint)
}

/// Whether webhooks to endpoints of this kind are meant to be delivered (else dead-lettered).
pub(crate) fn delivered_kind(b: Behaviour) -> bool {
    !matches!(b, Behaviour::Gone | Behaviour::Rejecting)
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl Report {
    fn since_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.started)
    }

    fn endpoints_of(&self, b: Behaviour) -> Vec<String> {
        (self.published.iter())
            .map(|p| p.event.endpoint_id.clone())
            .filter(|id| behaviour(id) == Some(b))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Webhooks whose fate is not the one their endpoint was set up to show, and broken
    /// promises: a `429`'s pause not kept, a gone endpoint called more than once, an attempt
    /// used up by an endpoint that was down.
    pub(crate) fn surprises(&self) -> Vec<String> {
        let mut out: Vec<String> = (self.published.iter())
            .zip(&self.fates)
            .filter_map(|(p, fate)| {
                let b = behaviour(&p.event.endpoint_id)?;
                let ok = match fate {
                    Fate::Delivered(1) => delivered_kind(b),
                    Fate::DeadLettered(d) => !delivered_kind(b) && d.failure_kind == "permanent",
                    Fate::Delivered(_) | Fate::Unsettled => false,
                };
                (!ok).then(|| {
                    format!(
                        "{} to {} ({}/{}@{}): {}",
                        p.event.event_id,
                        p.event.endpoint_id,
                        self.config.settings.topic,
                        p.partition,
                        p.offset,
                        fate_name(fate)
                    )
                })
            })
            .collect();
        for (pause, inside) in calls_inside_pauses(&self.server_calls) {
            if !inside.is_empty() {
                out.push(format!(
                    "{}: called {} time(s) within the {} s its 429 at +{} asked for",
                    pause.endpoint_id,
                    inside.len(),
                    pause.retry_after.unwrap_or_default(),
                    secs(self.since_start(pause.at))
                ));
            }
        }
        if self.settled && self.uncommitted > 0 {
            out.push(format!(
                "{} settled webhooks not committed by group {}",
                self.uncommitted, self.config.settings.group
            ));
        }
        for gone in self.endpoints_of(Behaviour::Gone) {
            let n = (self.server_calls.iter())
                .filter(|c| c.endpoint_id == gone)
                .count();
            if n > 1 {
                out.push(format!("{gone}: answered 410 Gone, yet called {n} times"));
            }
        }
        for c in &self.calls {
            if behaviour(&c.endpoint_id) == Some(Behaviour::Down)
                && c.outcome == Outcome::Delivered
                && c.attempt != 1
            {
                out.push(format!(
                    "{} to {}: delivered at attempt {} (refused calls must not use attempts)",
                    c.event_id, c.endpoint_id, c.attempt
                ));
            }
        }
        out
    }

    /// The human summary the demo prints.
    pub(crate) fn summary(&self) -> String {
        let s = &self.config.settings;
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "\n== webhooks demo: run {} ==", self.config.run_id);
        let tiers: Vec<String> = (s.retry_tiers.iter()).map(|d| secs(*d)).collect();
        let _ = writeln!(
            w,
            "topic {} ({} partitions), dead letters to {}, retry tiers {}.retry.<n> ({}), group {}",
            s.topic,
            self.partitions,
            s.dead_letter_topic(),
            s.topic,
            if tiers.is_empty() {
                "none".to_owned()
            } else {
                tiers.join(", ")
            },
            s.group,
        );
        let _ = writeln!(
            w,
            "test server http://{} (down-* endpoints at http://{}{})",
            self.server.0,
            self.server.1,
            match self.back_at {
                Some(back) => format!(
                    ", refusing connections until {} after publishing",
                    secs(back.saturating_sub(self.published_at))
                ),
                None => String::new(),
            }
        );
        let _ = writeln!(
            w,
            "published {} webhooks to {} endpoints; {} after {}",
            self.published.len(),
            self.config.endpoints.max(samples::MIN_ENDPOINTS),
            if self.settled {
                "all settled"
            } else if self.interrupted {
                "INTERRUPTED, stopped waiting"
            } else {
                "TIMED OUT waiting for all to settle"
            },
            secs(self.elapsed),
        );

        if self.uncommitted == 0 {
            let _ = writeln!(w, "the group committed every one of them");
        } else {
            let _ = writeln!(w, "{} of them not committed by the group", self.uncommitted);
        }

        self.kinds_table(w);
        self.dead_letter_lines(w);
        self.endpoint_lines(w);

        let _ = writeln!(
            w,
            "\nendpoint breakers at the peak: {} not closed (+{}){}",
            self.peak.open,
            secs(self.peak.at),
            if self.peak.endpoints.is_empty() {
                String::new()
            } else {
                let names: Vec<String> = (self.peak.endpoints.iter())
                    .map(|(name, state, gone)| {
                        format!("{name} {}", if *gone { "gone" } else { state.as_str() })
                    })
                    .collect();
                format!(": {}", names.join(", "))
            }
        );
        let opened = |gone: bool| {
            let names: Vec<&str> = (self.opened.iter())
                .filter(|(_, g)| **g == gone)
                .map(|(name, _)| name.as_str())
                .collect();
            if names.is_empty() {
                "-".to_owned()
            } else {
                names.join(", ")
            }
        };
        let _ = writeln!(
            w,
            "endpoint breakers that opened: {}; gone: {}",
            opened(false),
            opened(true)
        );
        match &self.breaker {
            Some(b) => {
                let _ = writeln!(
                    w,
                    "consumer-wide breaker: {}, opened {}; it opens only when the failures span {} endpoints or more",
                    b.state,
                    plural(
                        usize::try_from(b.opened).unwrap_or(usize::MAX),
                        "time",
                        "times"
                    ),
                    s.min_failing_endpoints
                );
            }
            None => {
                let _ = writeln!(w, "consumer-wide breaker: none");
            }
        }
        if self.earlier_calls > 0 || self.earlier_letters > 0 {
            let _ = writeln!(
                w,
                "\nalso handled: {} call(s) and {} dead letter(s) for webhooks published before this run (left unconsumed in {} by group {})",
                self.earlier_calls, self.earlier_letters, s.topic, s.group
            );
        }

        let surprises = self.surprises();
        if surprises.is_empty() {
            let _ = writeln!(w, "\nevery webhook ended as intended.");
        } else {
            let _ = writeln!(w, "\nUNEXPECTED:");
            for line in surprises {
                let _ = writeln!(w, "  {line}");
            }
        }
        out
    }

    /// Per endpoint kind: webhooks, delivered, dead-lettered, calls and what failed.
    fn kinds_table(&self, w: &mut String) {
        let _ = writeln!(
            w,
            "\n{:<14} {:>9} {:>8} {:>9} {:>13} {:>6}  failed calls",
            "endpoint kind", "endpoints", "webhooks", "delivered", "dead-lettered", "calls"
        );
        for b in Behaviour::ALL {
            let endpoints = self.endpoints_of(b);
            if endpoints.is_empty() {
                continue;
            }
            let of_kind = |id: &str| behaviour(id) == Some(b);
            let (mut webhooks, mut delivered, mut dead) = (0, 0, 0);
            for (p, fate) in self.published.iter().zip(&self.fates) {
                if of_kind(&p.event.endpoint_id) {
                    webhooks += 1;
                    match fate {
                        Fate::Delivered(_) => delivered += 1,
                        Fate::DeadLettered(_) => dead += 1,
                        Fate::Unsettled => {}
                    }
                }
            }
            let calls: Vec<&Call> = (self.calls.iter())
                .filter(|c| of_kind(&c.endpoint_id))
                .collect();
            let mut failed: BTreeMap<String, usize> = BTreeMap::new();
            for c in (self.server_calls.iter()).filter(|c| of_kind(&c.endpoint_id)) {
                if !(200..300).contains(&c.status) {
                    *failed.entry(c.status.to_string()).or_default() += 1;
                }
            }
            let refused = (calls.iter())
                .filter(|c| matches!(&c.outcome, Outcome::Unavailable(e) if e.contains("cannot connect")))
                .count();
            if refused > 0 {
                failed.insert("refused".to_owned(), refused);
            }
            let failed: Vec<String> = (failed.iter())
                .map(|(what, n)| format!("{what} ×{n}"))
                .collect();
            let _ = writeln!(
                w,
                "{:<14} {:>9} {:>8} {:>9} {:>13} {:>6}  {}",
                b.prefix(),
                endpoints.len(),
                webhooks,
                delivered,
                dead,
                calls.len(),
                if failed.is_empty() {
                    "-".to_owned()
                } else {
                    failed.join(", ")
                }
            );
        }
    }

    /// This run's dead letters by reason: failure kind and error.
    fn dead_letter_lines(&self, w: &mut String) {
        let s = &self.config.settings;
        let _ = writeln!(
            w,
            "\ndead-lettered: {} (read back from {}), by reason",
            self.dead_letters.len(),
            s.dead_letter_topic()
        );
        let mut reasons: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
        for d in &self.dead_letters {
            *reasons
                .entry((
                    d.failure_kind.as_str(),
                    d.attempts.as_str(),
                    d.error.as_str(),
                ))
                .or_default() += 1;
        }
        for ((kind, attempts, error), n) in reasons {
            let _ = writeln!(w, "  {kind} ×{n} (attempts {attempts}): {error}");
        }
    }

    /// What the misbehaving endpoints saw: the down, gone, rate-limited and flaky ones.
    fn endpoint_lines(&self, w: &mut String) {
        let calls_to = |b: Behaviour| -> Vec<&Call> {
            (self.calls.iter())
                .filter(|c| behaviour(&c.endpoint_id) == Some(b))
                .collect()
        };
        let down = self.endpoints_of(Behaviour::Down);
        if let (Some(back), false) = (self.back_at, down.is_empty()) {
            let calls = calls_to(Behaviour::Down);
            let refused: Vec<&&Call> = (calls.iter())
                .filter(|c| matches!(c.outcome, Outcome::Unavailable(_)))
                .collect();
            let webhooks = (self.published.iter())
                .filter(|p| behaviour(&p.event.endpoint_id) == Some(Behaviour::Down))
                .count();
            let last = (calls.iter())
                .filter(|c| c.outcome == Outcome::Delivered)
                .map(|c| self.since_start(c.at))
                .max();
            let healthy_meanwhile = (self.server_calls.iter())
                .filter(|c| behaviour(&c.endpoint_id) == Some(Behaviour::Healthy))
                .filter(|c| (200..300).contains(&c.status) && self.since_start(c.at) < back)
                .count();
            let healthy = (self.published.iter())
                .filter(|p| behaviour(&p.event.endpoint_id) == Some(Behaviour::Healthy))
                .count();
            let _ = writeln!(
                w,
                "\ndown ({}): refused connections for {} after publishing; {} made while down (one probe per open interval each), none used an attempt or was dead-lettered",
                down.join(", "),
                secs(back.saturating_sub(self.published_at)),
                plural(refused.len(), "call was", "calls were"),
            );
            let _ = writeln!(
                w,
                "  their {webhooks} webhooks were delivered once they were back (the last {} after); meanwhile {healthy_meanwhile} of the {healthy} healthy webhooks were delivered",
                last.map_or_else(|| "-".to_owned(), |t| secs(t.saturating_sub(back)))
            );
        }
        for gone in self.endpoints_of(Behaviour::Gone) {
            let called = (self.server_calls.iter())
                .filter(|c| c.endpoint_id == gone)
                .count();
            let letters = (self.dead_letters.iter())
                .filter(|d| d.endpoint_id.as_deref() == Some(gone.as_str()))
                .count();
            let _ = writeln!(
                w,
                "gone ({gone}): called {}; {letters} webhooks dead-lettered, {} of them without a call",
                plural(called, "time", "times"),
                letters.saturating_sub(called)
            );
        }
        for limited in self.endpoints_of(Behaviour::RateLimited) {
            let ours: Vec<ServerCall> = (self.server_calls.iter())
                .filter(|c| c.endpoint_id == limited)
                .cloned()
                .collect();
            let pauses = calls_inside_pauses(&ours);
            let inside: usize = pauses.iter().map(|(_, inside)| inside.len()).sum();
            let hints: BTreeSet<u64> = (pauses.iter()).filter_map(|(p, _)| p.retry_after).collect();
            let hints: Vec<String> = hints.iter().map(|s| format!("{s}s")).collect();
            let _ = writeln!(
                w,
                "rate-limited ({limited}): {} calls, {} answered 429 (Retry-After {}); calls within a pause it asked for: {inside}",
                ours.len(),
                pauses.len(),
                if hints.is_empty() {
                    "-".to_owned()
                } else {
                    hints.join(", ")
                }
            );
        }
        let flaky = calls_to(Behaviour::Flaky);
        if !flaky.is_empty() {
            let source = &self.config.settings.topic;
            let retried_in_place = (flaky.iter())
                .filter(|c| c.attempt > 1 && c.outcome == Outcome::Delivered)
                .count();
            let exhausted: BTreeSet<&str> = (flaky.iter())
                .filter(|c| c.topic == *source && matches!(c.outcome, Outcome::Transient(_)))
                .filter(|c| c.attempt >= crate::sender::retry_policy().max_attempts())
                .map(|c| c.event_id.as_str())
                .collect();
            let from_tiers = (flaky.iter())
                .filter(|c| c.topic != *source && c.outcome == Outcome::Delivered)
                .count();
            let forwarded: u64 = self.forwarded.iter().sum();
            let _ = writeln!(
                w,
                "flaky ({}): {retried_in_place} delivered on an in-place retry; {} used their in-place attempts and went to a retry tier, {} more followed them there to keep their endpoint's order; {from_tiers} delivered from a tier",
                self.endpoints_of(Behaviour::Flaky).join(", "),
                exhausted.len(),
                usize::try_from(forwarded)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(exhausted.len()),
            );
        }
    }
}

fn fate_name(fate: &Fate) -> String {
    match fate {
        Fate::Delivered(1) => "delivered".to_owned(),
        Fate::Delivered(n) => format!("delivered {n} times"),
        Fate::DeadLettered(d) => format!("dead-lettered ({}): {}", d.failure_kind, d.error),
        Fate::Unsettled => "not settled".to_owned(),
    }
}
