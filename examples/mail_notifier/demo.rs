//! The demo: sample traffic through the real notifier, to a real (loopback) SMTP server, and a
//! report of what became of every record — built from evidence, not from expectations: the
//! handler's calls, the mails the server accepted, and the dead letters read back from Kafka.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use kourier::dead_letter::headers;
use kourier::rdkafka::Message as _;
use kourier::rdkafka::message::OwnedMessage;
use kourier::{BreakerState, BreakerStatus, ConsumerMonitor, ShutdownReport};

use crate::kafka::{CommittedOffsets, end_offsets, read_from};
use crate::mailer::{Attempt, BulkCall, BulkMailer, Journal, Mailer, Outcome};
use crate::notifier::{self, Settings};
use crate::ops_server::Probes;
use crate::samples::{self, Expect, Published};
use crate::smtp_server::{ReceivedMail, SmtpServer};

/// A demo run's settings.
#[derive(Debug, Clone)]
pub(crate) struct DemoConfig {
    pub(crate) settings: Settings,
    /// Mails are written to `<outbox>/<run id>/`.
    pub(crate) outbox: PathBuf,
    /// Prefix of this run's event ids.
    pub(crate) run_id: String,
    /// How long to wait for every sample record to be settled.
    pub(crate) settle_timeout: Duration,
    /// Told when the consumer runs and stops (for `/livez` and `/readyz`).
    pub(crate) probes: Probes,
    /// The outage sample: once the regular samples are settled, the SMTP server refuses
    /// connections this long while the outage samples are published. `None`: no outage.
    pub(crate) outage: Option<Duration>,
    /// Queue mode (`--queue`, feature `queue`): the mailer over a share group
    /// ([`notifier::queue_consumer`]); a record is settled once kourier reports its outcome.
    pub(crate) queue: bool,
    /// Batch mode (`--batch`): the bulk mailer, one SMTP session per batch of mails.
    pub(crate) batch: bool,
}

/// A dead letter read back from the dead-letter topic.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetterRecord {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) original_topic: String,
    pub(crate) original_partition: i32,
    pub(crate) original_offset: i64,
    pub(crate) event_id: Option<String>,
    pub(crate) failure_kind: String,
    pub(crate) error: String,
    pub(crate) attempts: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
}

/// What became of one published sample record.
#[derive(Debug, Clone)]
pub(crate) enum Fate {
    /// Mailed; the handler's calls for this record, the successful one last.
    Sent(Vec<Attempt>),
    /// Settled without a handler call or a dead letter: the store said "done already".
    SkippedDuplicate,
    DeadLettered(DeadLetterRecord, Vec<Attempt>),
    /// Not settled when the demo stopped waiting.
    Unsettled(Vec<Attempt>),
}

/// Everything a demo run did.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) config: DemoConfig,
    pub(crate) partitions: i32,
    pub(crate) published: Vec<Published>,
    pub(crate) fates: Vec<Fate>,
    /// The mails the SMTP server accepted during the run.
    pub(crate) mails: Vec<ReceivedMail>,
    /// In batch mode, every bulk call (mails given, SMTP sessions opened).
    pub(crate) bulk_calls: Vec<BulkCall>,
    /// Every dead letter written to the dead-letter topic during the run.
    pub(crate) dead_letters: Vec<DeadLetterRecord>,
    /// Handler calls for records published before this run (left over in the topic).
    pub(crate) earlier: Vec<Attempt>,
    pub(crate) settled: bool,
    pub(crate) interrupted: bool,
    pub(crate) elapsed: Duration,
    /// When the SMTP server refused connections (the outage sample), if it did.
    pub(crate) outage: Option<(SystemTime, SystemTime)>,
    /// The consumer's breaker at the end of the run.
    pub(crate) breaker: Option<BreakerStatus>,
}

/// Runs the demo: topics, SMTP server, consumer, sample traffic; waits until every sample
/// record is settled (its offset committed by the group), `settle_timeout` passes or
/// `interrupt` resolves; then shuts the consumer down gracefully and collects the report.
pub(crate) async fn run_demo(
    config: DemoConfig,
    interrupt: impl Future<Output = ()>,
) -> Result<Report> {
    let started = Instant::now();
    let settings = &config.settings;
    let (partitions, dlt_partitions) = notifier::ensure_topics(settings).await?;
    let dlt = settings.dead_letter_topic();
    let dlt_start = blocking({
        let (bootstrap, dlt) = (settings.bootstrap.clone(), dlt.clone());
        move || end_offsets(&bootstrap, &dlt, dlt_partitions)
    })
    .await?;

    let server = SmtpServer::start("127.0.0.1:0", config.outbox.join(&config.run_id))
        .context("starting the SMTP server")?;
    tracing::info!(addr = %server.addr(), outbox = %server.outbox().display(), "smtp server listening");

    let journal = Journal::default();
    let port = server.addr().port();
    let mailer = Mailer::plaintext("127.0.0.1", port, journal.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    let running = if config.queue {
        Running::queue(settings, mailer, stop).await?
    } else {
        let (monitor, task) = if config.batch {
            let bulk = BulkMailer::plaintext("127.0.0.1", port, journal.clone());
            let consumer = notifier::consumer(settings, notifier::bulk(bulk)).await?;
            let monitor = consumer.monitor();
            (
                monitor,
                tokio::spawn(config.probes.clone().run(consumer, stop)),
            )
        } else {
            let consumer = notifier::consumer(settings, mailer).await?;
            let monitor = consumer.monitor();
            (
                monitor,
                tokio::spawn(config.probes.clone().run(consumer, stop)),
            )
        };
        let probe = {
            let (b, g, t) = (
                settings.bootstrap.clone(),
                settings.group.clone(),
                settings.topic.clone(),
            );
            blocking(move || CommittedOffsets::new(&b, &g, &t, partitions)).await?
        };
        Running::Group {
            monitor,
            task,
            probe: std::sync::Arc::new(probe),
            committed: BTreeMap::new(),
        }
    };

    let publisher = samples::publisher(&settings.bootstrap, &settings.topic)?;
    let mut published = samples::publish(&publisher, samples::samples(&config.run_id)).await?;
    tracing::info!(records = published.len(), "sample records published");

    let mut waiter = Settling {
        running,
        deadline: tokio::time::Instant::now() + config.settle_timeout,
    };
    tokio::pin!(interrupt);
    let mut settled = waiter.wait(&published, &mut interrupt).await?;
    let mut outage = None;
    if let (Some(down_for), Settled::All) = (config.outage, settled) {
        // The outage sample: the SMTP server refuses connections while more mails come in.
        server.set_refusing(true);
        let began = SystemTime::now();
        tracing::info!(?down_for, "smtp server down: refusing connections");
        let more = samples::publish(&publisher, samples::outage_samples(&config.run_id)).await?;
        tracing::info!(records = more.len(), "outage sample records published");
        published.extend(more);
        tokio::time::sleep(down_for).await;
        server.set_refusing(false);
        tracing::info!("smtp server back: accepting connections");
        outage = Some((began, SystemTime::now()));
        settled = waiter.wait(&published, &mut interrupt).await?;
    }
    let breaker = waiter.running.breaker();
    let (settled, interrupted) = (settled == Settled::All, settled == Settled::Interrupted);

    let _ = stop_tx.send(());
    let done = waiter.running.stop().await?;

    let dead_letters = blocking({
        let (bootstrap, dlt) = (settings.bootstrap.clone(), dlt.clone());
        move || read_from(&bootstrap, &dlt, dlt_partitions, &dlt_start)
    })
    .await?
    .iter()
    .map(parse_dead_letter)
    .filter(|d| d.original_topic == settings.topic)
    .collect::<Vec<_>>();

    let attempts = journal.attempts();
    let mut by_record: HashMap<(i32, i64), Vec<Attempt>> = HashMap::new();
    for a in &attempts {
        by_record
            .entry((a.partition, a.offset))
            .or_default()
            .push(a.clone());
    }
    let fates = published
        .iter()
        .map(|p| {
            let calls = by_record
                .remove(&(p.partition, p.offset))
                .unwrap_or_default();
            let letter = dead_letters
                .iter()
                .find(|d| d.original_partition == p.partition && d.original_offset == p.offset);
            let done = done.settled(p.partition, p.offset);
            match letter {
                Some(d) => Fate::DeadLettered(d.clone(), calls),
                None if calls.last().is_some_and(|a| a.outcome == Outcome::Sent) => {
                    Fate::Sent(calls)
                }
                None if done && calls.is_empty() => Fate::SkippedDuplicate,
                None => Fate::Unsettled(calls),
            }
        })
        .collect();

    Ok(Report {
        partitions,
        published,
        fates,
        mails: server.received(),
        bulk_calls: journal.bulk_calls(),
        dead_letters,
        earlier: {
            let mut earlier: Vec<Attempt> = by_record.into_values().flatten().collect();
            earlier.sort_by_key(|a| (a.partition, a.offset, a.attempt));
            earlier
        },
        settled,
        interrupted,
        elapsed: started.elapsed(),
        outage,
        breaker,
        config,
    })
}

/// How waiting for the sample records ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    All,
    TimedOut,
    Interrupted,
}

/// The consumer the demo runs: a consumer group (the default) or, with `--queue`, a share
/// group.
enum Running {
    Group {
        monitor: ConsumerMonitor,
        task: tokio::task::JoinHandle<kourier::Result<ShutdownReport>>,
        probe: std::sync::Arc<CommittedOffsets>,
        /// The group's committed offsets, as last read.
        committed: BTreeMap<i32, i64>,
    },
    #[cfg(feature = "queue")]
    Queue {
        task: tokio::task::JoinHandle<
            Result<kourier::queue::QueueReport, kourier::queue::QueueError>,
        >,
        /// Each record's outcome as kourier reported it, by (partition, offset).
        outcomes: Outcomes,
    },
}

/// Queue mode's settled records: (partition, offset) → outcome, from the consumer's observer.
#[cfg(feature = "queue")]
type Outcomes = std::sync::Arc<std::sync::Mutex<HashMap<(i32, i64), kourier::RecordOutcome>>>;

/// Which records were settled when the consumer stopped.
enum Done {
    /// The consumer group's committed offsets.
    Committed(BTreeMap<i32, i64>),
    /// Queue mode: the records whose outcome was handled, duplicate or dead-lettered.
    #[cfg(feature = "queue")]
    Outcomes(HashMap<(i32, i64), kourier::RecordOutcome>),
}

impl Done {
    fn settled(&self, partition: i32, offset: i64) -> bool {
        match self {
            Done::Committed(committed) => committed.get(&partition).is_some_and(|c| *c > offset),
            #[cfg(feature = "queue")]
            Done::Outcomes(outcomes) => outcomes
                .get(&(partition, offset))
                .is_some_and(|o| queue_settled(*o)),
        }
    }
}

/// A queue-mode record is settled (ACCEPTed) once handled, skipped or dead-lettered.
#[cfg(feature = "queue")]
fn queue_settled(outcome: kourier::RecordOutcome) -> bool {
    matches!(
        outcome,
        kourier::RecordOutcome::Handled
            | kourier::RecordOutcome::Duplicate
            | kourier::RecordOutcome::DeadLettered(_)
    )
}

impl Running {
    /// Queue mode: starts the mailer over the share group, its outcomes recorded.
    #[cfg(feature = "queue")]
    async fn queue(
        settings: &Settings,
        mailer: Mailer,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Running> {
        let outcomes = Outcomes::default();
        let seen = outcomes.clone();
        let consumer = notifier::queue_consumer(settings, mailer, move |record, outcome| {
            if let Ok(mut seen) = seen.lock() {
                seen.insert((record.partition, record.offset), outcome);
            }
        })
        .await?;
        Ok(Running::Queue {
            task: tokio::spawn(consumer.run(stop)),
            outcomes,
        })
    }

    #[cfg(not(feature = "queue"))]
    async fn queue(
        _settings: &Settings,
        _mailer: Mailer,
        _stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Running> {
        bail!("queue mode needs kourier's `queue` feature (cargo run --features queue ...)")
    }

    /// Whether every published record is settled and nothing runs.
    fn all_settled(&self, published: &[Published]) -> bool {
        match self {
            Running::Group {
                monitor, committed, ..
            } => {
                let mut last_offset: BTreeMap<i32, i64> = BTreeMap::new();
                for p in published {
                    let o = last_offset.entry(p.partition).or_insert(p.offset);
                    *o = (*o).max(p.offset);
                }
                let all = last_offset
                    .iter()
                    .all(|(p, last)| committed.get(p).is_some_and(|c| c > last));
                all && monitor.snapshot().in_flight == 0
            }
            #[cfg(feature = "queue")]
            Running::Queue { outcomes, .. } => outcomes.lock().is_ok_and(|seen| {
                published.iter().all(|p| {
                    seen.get(&(p.partition, p.offset))
                        .is_some_and(|o| queue_settled(*o))
                })
            }),
        }
    }

    /// Reads the group's committed offsets again (queue mode: outcomes arrive by themselves).
    async fn refresh(&mut self) {
        match self {
            Running::Group {
                probe, committed, ..
            } => {
                let probe = probe.clone();
                match blocking(move || probe.get()).await {
                    Ok(now) => *committed = now,
                    // The broker may be restarting: keep waiting (the consumer rides it out, too).
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot read committed offsets yet")
                    }
                }
            }
            #[cfg(feature = "queue")]
            Running::Queue { .. } => {}
        }
    }

    /// Resolves when the consumer stopped on its own (it should not): why.
    async fn ended(&mut self) -> anyhow::Error {
        match self {
            Running::Group { task, .. } => match task.await {
                Ok(Ok(_)) => anyhow::anyhow!("the consumer stopped on its own"),
                Ok(Err(e)) => anyhow::Error::new(e).context("the consumer stopped"),
                Err(e) => anyhow::Error::new(e).context("the consumer task panicked"),
            },
            #[cfg(feature = "queue")]
            Running::Queue { task, .. } => match task.await {
                Ok(Ok(_)) => anyhow::anyhow!("the queue consumer stopped on its own"),
                Ok(Err(e)) => anyhow::Error::new(e).context("the queue consumer stopped"),
                Err(e) => anyhow::Error::new(e).context("the queue consumer task panicked"),
            },
        }
    }

    /// The outage breaker (consumer group only).
    fn breaker(&self) -> Option<BreakerStatus> {
        match self {
            Running::Group { monitor, .. } => monitor.snapshot().breaker,
            #[cfg(feature = "queue")]
            Running::Queue { .. } => None,
        }
    }

    /// Waits for the consumer's graceful shutdown (already signalled): what was settled then.
    async fn stop(self) -> Result<Done> {
        match self {
            Running::Group {
                task,
                probe,
                committed,
                ..
            } => {
                let report = task
                    .await
                    .context("the consumer task panicked")?
                    .context("the consumer failed while shutting down")?;
                if !report.is_clean() {
                    bail!("the shutdown abandoned {} records", report.abandoned);
                }
                // The shutdown committed what settled meanwhile.
                let committed = blocking(move || probe.get()).await.unwrap_or(committed);
                Ok(Done::Committed(committed))
            }
            #[cfg(feature = "queue")]
            Running::Queue { task, outcomes } => {
                let report = task
                    .await
                    .context("the queue consumer task panicked")?
                    .context("the queue consumer failed")?;
                if report.abandoned > 0 {
                    bail!("the shutdown abandoned {} records", report.abandoned);
                }
                if report.acknowledgement_failures > 0 {
                    tracing::warn!(
                        refused = report.acknowledgement_failures,
                        "the broker refused acknowledgements: a record may have been mailed twice"
                    );
                }
                let outcomes = outcomes.lock().map(|o| o.clone()).unwrap_or_default();
                Ok(Done::Outcomes(outcomes))
            }
        }
    }
}

/// Waits for records to be settled: committed by the group (kourier commits an offset only
/// once that record and every lower one of its partition are mailed, dead-lettered
/// (acknowledged) or skipped as duplicates) and nothing in flight; in queue mode, each
/// record's outcome reported (mailed, dead-lettered or skipped, then ACCEPTed).
struct Settling {
    running: Running,
    deadline: tokio::time::Instant,
}

impl Settling {
    async fn wait(
        &mut self,
        published: &[Published],
        interrupt: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Settled> {
        loop {
            if self.running.all_settled(published) {
                return Ok(Settled::All);
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = interrupt.as_mut() => return Ok(Settled::Interrupted),
                e = self.running.ended() => return Err(e),
            }
            if tokio::time::Instant::now() >= self.deadline {
                return Ok(Settled::TimedOut);
            }
            self.running.refresh().await;
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking Kafka call panicked")?
}

fn parse_dead_letter(m: &OwnedMessage) -> DeadLetterRecord {
    // Read through kourier: header names are bytes, and rdkafka's own getters panic on a
    // name that is not UTF-8 (which a dead letter keeps as it came).
    let own = m.headers().map(kourier::Headers::from).unwrap_or_default();
    let header = |name: &str| own.get(name).map(<[u8]>::to_vec);
    let text = |name: &str| header(name).map(|v| String::from_utf8_lossy(&v).into_owned());
    let int = |name: &str| {
        header(name).map_or(-1, |v| match v.len() {
            4 => i64::from(i32::from_be_bytes(v.try_into().unwrap_or_default())),
            8 => i64::from_be_bytes(v.try_into().unwrap_or_default()),
            _ => -1,
        })
    };
    DeadLetterRecord {
        partition: m.partition(),
        offset: m.offset(),
        original_topic: text(headers::ORIGINAL_TOPIC).unwrap_or_default(),
        original_partition: i32::try_from(int(headers::ORIGINAL_PARTITION)).unwrap_or(-1),
        original_offset: int(headers::ORIGINAL_OFFSET),
        event_id: text(crate::event::EVENT_ID_HEADER),
        failure_kind: text(headers::FAILURE_KIND).unwrap_or_default(),
        error: text(headers::EXCEPTION_MESSAGE).unwrap_or_default(),
        attempts: text(headers::ATTEMPTS).unwrap_or_default(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
    }
}

impl Report {
    /// Sample records whose fate is not the one they were written to show.
    pub(crate) fn surprises(&self) -> Vec<String> {
        self.published
            .iter()
            .zip(&self.fates)
            .filter_map(|(p, fate)| {
                let ok = match (p.sample.expect, fate) {
                    // Queue mode has no order: either copy of the duplicated event may be the
                    // one mailed, the other skipped.
                    (Expect::Mail | Expect::Duplicate, Fate::Sent(_) | Fate::SkippedDuplicate)
                        if self.config.queue && self.copies(&p.sample.event_id) > 1 =>
                    {
                        self.mailed_once(&p.sample.event_id)
                    }
                    (Expect::Mail, Fate::Sent(calls)) => calls.len() == 1,
                    (Expect::MailAfterRetry, Fate::Sent(calls)) => calls.len() > 1,
                    (Expect::Duplicate, Fate::SkippedDuplicate) => true,
                    (Expect::Malformed, Fate::DeadLettered(d, _)) => d.failure_kind == "decode",
                    (Expect::Rejected | Expect::InvalidAddress, Fate::DeadLettered(d, _)) => {
                        d.failure_kind == "permanent"
                    }
                    (Expect::MailAfterOutage, Fate::Sent(_)) => true,
                    _ => false,
                };
                (!ok).then(|| {
                    format!(
                        "{} ({}/{}@{}): expected {:?}, got {}",
                        p.sample.event_id,
                        self.config.settings.topic,
                        p.partition,
                        p.offset,
                        p.sample.expect,
                        fate_name(fate)
                    )
                })
            })
            .collect()
    }

    /// How many sample records carry event id `id`.
    fn copies(&self, id: &str) -> usize {
        self.published
            .iter()
            .filter(|p| p.sample.event_id == id)
            .count()
    }

    /// Whether exactly one record of event id `id` was mailed (on its first call) and every
    /// other copy skipped as a duplicate.
    fn mailed_once(&self, id: &str) -> bool {
        let fates: Vec<&Fate> = self
            .published
            .iter()
            .zip(&self.fates)
            .filter(|(p, _)| p.sample.event_id == id)
            .map(|(_, f)| f)
            .collect();
        let sent = fates
            .iter()
            .filter(|f| matches!(f, Fate::Sent(calls) if calls.len() == 1))
            .count();
        let skipped = fates
            .iter()
            .filter(|f| matches!(f, Fate::SkippedDuplicate))
            .count();
        sent == 1 && sent + skipped == fates.len()
    }

    /// The human summary the demo prints.
    pub(crate) fn summary(&self) -> String {
        let s = &self.config.settings;
        let mut out = String::new();
        let w = &mut out;
        let at = |p: &Published| format!("{}/{}@{}", s.topic, p.partition, p.offset);
        let _ = writeln!(w, "\n== mail_notifier demo: run {} ==", self.config.run_id);
        let _ = writeln!(
            w,
            "topic {} ({} partitions), dead letters to {}, group {}, redis {}",
            s.topic,
            self.partitions,
            s.dead_letter_topic(),
            s.group,
            without_password(&s.redis_url)
        );
        if self.config.queue {
            let _ = writeln!(
                w,
                "queue mode: share group {}-queue, records shared one by one (no per-user order)",
                s.group
            );
        }
        let _ = writeln!(
            w,
            "published {} records; {} after {:.1}s",
            self.published.len(),
            if self.settled {
                "all settled"
            } else if self.interrupted {
                "INTERRUPTED, stopped waiting"
            } else {
                "TIMED OUT waiting for all to settle"
            },
            self.elapsed.as_secs_f64(),
        );

        let sent: Vec<_> = self
            .published
            .iter()
            .zip(&self.fates)
            .filter_map(|(p, f)| match f {
                Fate::Sent(calls) => Some((p, calls)),
                _ => None,
            })
            .collect();
        let _ = writeln!(w, "\nsent: {} mails", sent.len());
        for (p, calls) in &sent {
            let last = calls.last().expect("a sent record has a call");
            let _ = writeln!(
                w,
                "  {:<16} {:<6} {:<34} {:?}{}",
                p.sample.event_id,
                p.sample.user_id,
                last.to,
                last.subject,
                if calls.len() > 1 {
                    format!("  (attempt {})", last.attempt)
                } else {
                    String::new()
                }
            );
        }

        let skipped: Vec<_> = self
            .published
            .iter()
            .zip(&self.fates)
            .filter(|(_, f)| matches!(f, Fate::SkippedDuplicate))
            .collect();
        let _ = writeln!(w, "\nduplicates skipped: {}", skipped.len());
        for (p, _) in &skipped {
            let _ = writeln!(
                w,
                "  {:<16} {:<6} second copy at {}: already mailed (Redis said done), not sent again",
                p.sample.event_id,
                p.sample.user_id,
                at(p)
            );
        }

        let retried: Vec<_> = self
            .published
            .iter()
            .zip(&self.fates)
            .filter_map(|(p, f)| match f {
                Fate::Sent(calls) | Fate::DeadLettered(_, calls) | Fate::Unsettled(calls)
                    if calls.len() > 1 =>
                {
                    Some((p, calls, f))
                }
                _ => None,
            })
            .collect();
        let _ = writeln!(w, "\nretried: {}", retried.len());
        for (p, calls, fate) in &retried {
            let _ = writeln!(
                w,
                "  {:<16} {:<6} {} calls, then {}",
                p.sample.event_id,
                p.sample.user_id,
                calls.len(),
                fate_name(fate)
            );
            for c in calls.iter() {
                let what = match &c.outcome {
                    Outcome::Sent => "sent".to_owned(),
                    Outcome::Transient(e) | Outcome::Permanent(e) => e.clone(),
                    Outcome::Unavailable(e) => {
                        format!("relay unavailable (attempt not counted): {e}")
                    }
                };
                let _ = writeln!(w, "      attempt {}: {what}", c.attempt);
            }
        }

        let dead: Vec<_> = self
            .published
            .iter()
            .zip(&self.fates)
            .filter_map(|(p, f)| match f {
                Fate::DeadLettered(d, _) => Some((p, d)),
                _ => None,
            })
            .collect();
        let _ = writeln!(
            w,
            "\ndead-lettered: {} (read back from {})",
            dead.len(),
            s.dead_letter_topic()
        );
        for (p, d) in &dead {
            let _ = writeln!(
                w,
                "  {:<16} {:<6} {} -> {}/{}@{}  kind={} attempts={}",
                p.sample.event_id,
                p.sample.user_id,
                at(p),
                s.dead_letter_topic(),
                d.partition,
                d.offset,
                d.failure_kind,
                d.attempts
            );
            let _ = writeln!(w, "      error: {}", d.error);
            let _ = writeln!(
                w,
                "      kept: key {:?}, {} value bytes, header event-id {:?}",
                d.key
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default(),
                d.value.as_ref().map_or(0, Vec::len),
                d.event_id.as_deref().unwrap_or("-")
            );
        }

        let unsettled: Vec<_> = self
            .published
            .iter()
            .zip(&self.fates)
            .filter(|(_, f)| matches!(f, Fate::Unsettled(_)))
            .collect();
        if !unsettled.is_empty() {
            let _ = writeln!(w, "\nnot settled yet: {}", unsettled.len());
            for (p, _) in &unsettled {
                let _ = writeln!(
                    w,
                    "  {:<16} {:<6} at {}",
                    p.sample.event_id,
                    p.sample.user_id,
                    at(p)
                );
            }
        }
        if !self.earlier.is_empty() {
            let _ = writeln!(
                w,
                "\nalso handled: {} call(s) for records published before this run (left unconsumed in {} by group {})",
                self.earlier.len(),
                s.topic,
                s.group
            );
            for a in &self.earlier {
                let _ = writeln!(
                    w,
                    "  {:<16} {:<6} {}/{}@{} attempt {}: {}",
                    a.event_id,
                    a.user_id,
                    s.topic,
                    a.partition,
                    a.offset,
                    a.attempt,
                    match &a.outcome {
                        Outcome::Sent => "sent",
                        Outcome::Transient(_) => "transient failure",
                        Outcome::Unavailable(_) => "relay unavailable",
                        Outcome::Permanent(_) => "permanent failure",
                    }
                );
            }
        }
        let other_letters = self.dead_letters.len().saturating_sub(dead.len());
        if other_letters > 0 {
            let _ = writeln!(
                w,
                "\nalso dead-lettered: {other_letters} record(s) published before this run"
            );
        }

        if let Some((began, ended)) = self.outage {
            self.outage_summary(w, began, ended);
        }

        if self.config.batch {
            let mails: usize = self.bulk_calls.iter().map(|c| c.mails).sum();
            let sessions: usize = self.bulk_calls.iter().map(|c| c.sessions).sum();
            let largest = self.bulk_calls.iter().map(|c| c.mails).max().unwrap_or(0);
            let _ = writeln!(
                w,
                "\nbatch mode: {} bulk call(s) for {mails} mail attempt(s) (largest {largest}), {sessions} SMTP session(s)",
                self.bulk_calls.len(),
            );
        }

        let folder = self.config.outbox.join(&self.config.run_id);
        let _ = writeln!(
            w,
            "\nmails: the SMTP server accepted {}; read them in {}/",
            self.mails.len(),
            folder.display()
        );
        for m in &self.mails {
            let name = m
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = writeln!(w, "  {name:<24} to {}", m.to.join(", "));
        }

        let surprises = self.surprises();
        if surprises.is_empty() {
            let _ = writeln!(w, "\nevery sample record ended as intended.");
        } else {
            let _ = writeln!(w, "\nUNEXPECTED:");
            for line in surprises {
                let _ = writeln!(w, "  {line}");
            }
        }
        out
    }
}

impl Report {
    /// The outage sample's part of the summary: what the breaker did and what became of the
    /// mails published while the SMTP server was down.
    fn outage_summary(&self, w: &mut String, began: SystemTime, ended: SystemTime) {
        let since = |t: SystemTime| {
            t.duration_since(began)
                .map_or_else(|e| -e.duration().as_secs_f64(), |d| d.as_secs_f64())
        };
        let samples: Vec<_> = self
            .published
            .iter()
            .zip(&self.fates)
            .filter(|(p, _)| p.sample.expect == Expect::MailAfterOutage)
            .collect();
        let _ = writeln!(
            w,
            "\noutage: the SMTP server refused connections for {:.1}s; {} mails were published meanwhile",
            since(ended),
            samples.len()
        );
        if let Some(b) = &self.breaker {
            let steps: Vec<String> = b
                .recent
                .iter()
                .filter(|t| t.at >= began)
                .map(|t| format!("{} +{:.1}s", t.to, since(t.at)))
                .collect();
            let _ = writeln!(w, "  breaker: {}", steps.join(", "));
            let _ = writeln!(
                w,
                "  breaker: now {}; opened {}x, {} probes, {} failed calls held (no attempt used)",
                b.state, b.opened, b.probes, b.held_failures
            );
            if let Some(closed) = b
                .recent
                .iter()
                .rev()
                .find(|t| t.to == BreakerState::Closed && t.at >= ended)
            {
                let _ = writeln!(
                    w,
                    "  breaker: closed {:.1}s after the server came back",
                    closed
                        .at
                        .duration_since(ended)
                        .unwrap_or_default()
                        .as_secs_f64()
                );
            }
        }
        let dead = samples
            .iter()
            .filter(|(_, f)| matches!(f, Fate::DeadLettered(..)))
            .count();
        let _ = writeln!(w, "  dead-lettered for the outage: {dead}");
        for (p, fate) in &samples {
            let calls = match fate {
                Fate::Sent(c) | Fate::DeadLettered(_, c) | Fate::Unsettled(c) => c.as_slice(),
                Fate::SkippedDuplicate => &[],
            };
            let refused = calls
                .iter()
                .filter(|c| matches!(c.outcome, Outcome::Unavailable(_)))
                .count();
            let _ = writeln!(
                w,
                "  {:<16} {:<6} {} after {refused} refused call(s); attempt number {}",
                p.sample.event_id,
                p.sample.user_id,
                fate_name(fate),
                calls.last().map_or(0, |c| c.attempt)
            );
        }
    }
}

/// `redis://user:secret@host/` → `redis://user:***@host/`.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn fate_name(fate: &Fate) -> &'static str {
    match fate {
        Fate::Sent(_) => "sent",
        Fate::SkippedDuplicate => "skipped as duplicate",
        Fate::DeadLettered(..) => "dead-lettered",
        Fate::Unsettled(_) => "not settled",
    }
}
