//! Reading a dead-letter topic and redriving selected letters: [`DeadLetterTopic`].
//!
//! Blocking (rdkafka's `BaseConsumer` and `BaseProducer`, every wait bounded by the
//! topic's timeout): call it from a thread that may block — in async code, from
//! `tokio::task::spawn_blocking`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::headers::{self, Provenance};
use super::redrive::RedriveRecord;
use super::select::LetterSelector;
use crate::log_throttle::ThrottledLogContext;
use crate::record::RawRecord;

/// How often one persisting librdkafka warning or error is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// What a resumable redrive's commits carry before the selector's fingerprint.
const RESUME_TAG: &str = "kourier-redrive/1";

/// One dead-letter topic on a Kafka cluster: read its letters ([`read`](Self::read)) or
/// publish selected letters again ([`redrive`](Self::redrive)). The `kourier-dlt` tool
/// (feature `cli`) is built on it.
///
/// **Blocking:** both calls wait on Kafka (each single wait bounded by
/// [`timeout`](Self::timeout), 10 s by default): in async code, call them from
/// `tokio::task::spawn_blocking`.
///
/// ```no_run
/// use kourier::dead_letter::{DeadLetterTopic, LetterRange, LetterSelector, Redrive};
///
/// let dlt = DeadLetterTopic::new("127.0.0.1:9092", "notify.v1.dlt");
/// // The letter at partition 0, offset 42, and every letter of event e-7.
/// let report = dlt.redrive(
///     &Redrive::new(LetterSelector::new().at(LetterRange::new(0, 42, 42))),
///     |_progress| {},
/// )?;
/// for r in &report.redriven {
///     println!("{r}"); // notify.v1.dlt/0@42 (notify.v1/3@1017) -> notify.v1/3@2210
/// }
/// let report = dlt.redrive(&Redrive::new(LetterSelector::new().header("event-id", "e-7")), |_| {})?;
/// assert!(report.refused.is_empty(), "{:?}", report.refused);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct DeadLetterTopic {
    topic: String,
    bootstrap: String,
    timeout: Duration,
    config: Vec<(String, String)>,
}

/// Reading or redriving a dead-letter topic failed (the whole call, not one letter: a letter
/// that cannot be redriven is [`Refused`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterTopicError {
    /// The brokers did not answer a request within the timeout.
    #[error("kafka at {bootstrap} did not answer within {after:?}; is it running?")]
    Unreachable {
        /// The bootstrap servers asked.
        bootstrap: String,
        /// The timeout.
        after: Duration,
        /// What the client reported.
        #[source]
        source: KafkaError,
    },
    /// The dead-letter topic does not exist.
    #[error("topic {topic} does not exist")]
    MissingTopic {
        /// The topic.
        topic: String,
    },
    /// The broker answered with an error for the topic (e.g. not authorized).
    #[error("topic {topic}: {code}")]
    TopicUnavailable {
        /// The topic.
        topic: String,
        /// The broker's error.
        code: String,
    },
    /// Records were expected but none came within the timeout (the broker went away).
    #[error(
        "no record from {topic} for {after:?} while {expected} more were expected; is kafka up?"
    )]
    Stalled {
        /// The dead-letter topic.
        topic: String,
        /// The timeout.
        after: Duration,
        /// Records still expected.
        expected: u64,
    },
    /// A Kafka call failed.
    #[error("kafka error {operation}")]
    Kafka {
        /// What was being done.
        operation: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// A resumable redrive's group holds a position taken with another selector (or by
    /// another tool): resuming from it could pass over letters this selector selects.
    #[error(
        "group {group} holds a position in {topic} for another selection ({stored}); this run selects {wanted}: use another resume group for another selection"
    )]
    ResumeMismatch {
        /// The resume group.
        group: String,
        /// The dead-letter topic.
        topic: String,
        /// The selection the stored position was taken with (from its commit metadata),
        /// escaped and cut to 200 characters.
        stored: String,
        /// This run's selection.
        wanted: String,
    },
    /// The broker did not acknowledge a re-published letter (no answer in time, or an error
    /// that is not the letter's own): the redrive stopped there.
    #[error(
        "re-publishing letter {letter} to {topic} failed: {reason}; nothing after it was redriven"
    )]
    Republish {
        /// The letter, `topic/partition@offset` in the dead-letter topic.
        letter: String,
        /// The destination.
        topic: String,
        /// What went wrong.
        reason: String,
    },
    #[doc(hidden)]
    #[error("simulated crash")]
    SimulatedCrash,
}

type Result<T, E = DeadLetterTopicError> = std::result::Result<T, E>;

/// A redrive stopped before it reached the end of the selection: what it did until then
/// (every letter in [`report`](Self::report)'s `redriven` was acknowledged by the broker)
/// and why it stopped.
#[derive(Debug, thiserror::Error)]
#[error("redrive of {} stopped after redriving {} letter(s)", report.dlt, report.redriven.len())]
pub struct RedriveStopped {
    /// What the run did before it stopped.
    pub report: Box<RedriveReport>,
    /// Why it stopped.
    #[source]
    pub error: Box<DeadLetterTopicError>,
}

/// What a [`DeadLetterTopic::redrive`] does.
///
/// **Stateless by default:** the run reads the dead-letter topic with `assign` and seeks (no
/// consumer group joins, nothing is committed), from the beginning (or the lowest place
/// selected) to the end the topic had when the run started. A rerun sees the same letters
/// again, so the report of each run says exactly what it republished.
///
/// **Resumable** ([`resume_group`](Self::resume_group)), for large replays that may be cut
/// short: the run commits its position in the dead-letter topic for that group, per
/// partition, right after the broker acknowledged each republished letter (and, at the end,
/// past the letters it passed over), and a rerun starts there; a crash redrives again at
/// most the one letter in flight. The position stands for "every letter below it was
/// considered *by this selector*": the commits carry the selector
/// ([`LetterSelector`]'s `Display`) in their metadata, and a run with another selector
/// refuses to start from them ([`DeadLetterTopicError::ResumeMismatch`]) instead of
/// passing over letters the other selector filtered out. One selector, one group. Time
/// bounds are part of the selector: give them as absolute times to resume a run. Letters
/// refused (see [`Refused`]) are passed over too, and reported with their places: redrive
/// them by place once fixed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Redrive {
    /// Which letters.
    pub selector: LetterSelector,
    /// Publish every letter to this topic instead of its original topic.
    pub to: Option<String>,
    /// Report what would be redriven; publish and commit nothing. Destinations are checked
    /// as in a real run.
    pub dry_run: bool,
    /// Refuse letters already redriven this many times (default 3)...
    pub max_redrives: u32,
    /// ...unless forced, which also redrives metadata-only letters with a null value.
    pub force: bool,
    /// Resumable mode: the consumer group whose committed position the run starts from and
    /// moves; `None` (the default): stateless.
    pub resume_group: Option<String>,
    #[doc(hidden)]
    pub crash_after: Option<u64>,
}

impl Redrive {
    /// Redrives the letters `selector` selects: stateless, to their original topics, at most
    /// 3 redrives per letter.
    pub fn new(selector: LetterSelector) -> Self {
        Redrive {
            selector,
            to: None,
            dry_run: false,
            max_redrives: 3,
            force: false,
            resume_group: None,
            crash_after: None,
        }
    }

    /// Publishes to `topic` instead of each letter's original topic.
    #[must_use]
    pub fn to(mut self, topic: impl Into<String>) -> Self {
        self.to = Some(topic.into());
        self
    }

    /// Only reports what would be redriven.
    #[must_use]
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Refuses letters already redriven `max` times (unless [`force`](Self::force)).
    #[must_use]
    pub fn max_redrives(mut self, max: u32) -> Self {
        self.max_redrives = max;
        self
    }

    /// Redrives letters redriven too often and metadata-only letters too.
    #[must_use]
    pub fn force(mut self, force: bool) -> Self {
        self.force = force;
        self
    }

    /// Resumable mode with the consumer group `group` (see [`Redrive`]).
    #[must_use]
    pub fn resume_group(mut self, group: impl Into<String>) -> Self {
        self.resume_group = Some(group.into());
        self
    }
}

/// What a redrive did (with [`Redrive::dry_run`], would do).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RedriveReport {
    /// The dead-letter topic.
    pub dlt: String,
    /// Records in the range the run read (from its start to the topic's end at the start).
    pub total: u64,
    /// Records read so far.
    pub read: u64,
    /// Letters the selector left out.
    pub filtered_out: u64,
    /// Letters republished (acknowledged by the broker), in the order they were read.
    pub redriven: Vec<Redriven>,
    /// Letters selected but not republished, each with the reason.
    pub refused: Vec<Refused>,
    /// Nothing was published or committed.
    pub dry_run: bool,
}

/// A letter's place in its dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LetterPlace {
    /// The dead-letter topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

impl LetterPlace {
    fn of(letter: &RawRecord) -> Self {
        LetterPlace {
            topic: letter.topic.to_string(),
            partition: letter.partition,
            offset: letter.offset,
        }
    }
}

impl fmt::Display for LetterPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// One letter republished.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Redriven {
    /// Where the letter is in the dead-letter topic.
    pub letter: LetterPlace,
    /// The original record's coordinates, from the letter's provenance
    /// ([`Provenance::original_coordinates`]).
    pub original: String,
    /// The letter's key.
    pub key: Option<Vec<u8>>,
    /// Where it was published.
    pub topic: String,
    /// The partition it was written to (`None` in a dry run).
    pub partition: Option<i32>,
    /// The offset it was written at (`None` in a dry run).
    pub offset: Option<i64>,
    /// The redrive count it carries.
    pub redrive_count: u32,
}

/// `letter (original) -> topic/partition@offset` (the destination topic alone in a dry run).
impl fmt::Display for Redriven {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}) -> {}", self.letter, self.original, self.topic)?;
        if let (Some(p), Some(o)) = (self.partition, self.offset) {
            write!(f, "/{p}@{o}")?;
        }
        Ok(())
    }
}

/// One selected letter that was not republished.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refused {
    /// Where the letter is in the dead-letter topic.
    pub letter: LetterPlace,
    /// The original record's coordinates.
    pub original: String,
    /// Why: its destination does not exist or is not a valid name, it was redriven
    /// [`Redrive::max_redrives`] times already, it is a metadata-only letter, or the broker
    /// refused the record itself (too large for the destination, not allowed there).
    pub reason: String,
}

/// The letters [`DeadLetterTopic::read`] returns.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Letters {
    /// The selected letters, in offset order per partition.
    pub letters: Vec<RawRecord>,
    /// Records read.
    pub read: u64,
    /// Whether the read stopped at a limit of [`DeadLetterTopic::read_at_most`] before the
    /// topic's end: more letters may follow.
    pub more: bool,
}

impl DeadLetterTopic {
    /// The dead-letter topic `topic` on the brokers `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>, topic: impl Into<String>) -> Self {
        DeadLetterTopic {
            topic: topic.into(),
            bootstrap: bootstrap_servers.into(),
            timeout: Duration::from_secs(10),
            config: Vec::new(),
        }
    }

    /// How long any single wait on Kafka may take (10 s by default): a missing topic or an
    /// unreachable broker is an error within about that long, never a hang.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A librdkafka setting for the clients (security settings, for instance).
    #[must_use]
    pub fn kafka_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.push((key.into(), value.into()));
        self
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.topic
    }

    /// Every letter `selector` selects, from the beginning (or the lowest place selected) to
    /// the topic's end when the call started. `progress(read, total)` is called after each
    /// record. Stateless: nothing is committed.
    ///
    /// # Errors
    /// A missing topic, an unreachable broker, a broker that stops answering.
    pub fn read(
        &self,
        selector: &LetterSelector,
        progress: impl FnMut(u64, u64),
    ) -> Result<Letters> {
        self.read_at_most(selector, usize::MAX, u64::MAX, progress)
    }

    /// [`read`](Self::read), stopping once `max_letters` letters are selected or `max_read`
    /// records are read, whichever comes first; [`Letters::more`] says whether it stopped
    /// before the end. A page of a topic too large to read whole: its first letters in
    /// offset order per partition (give [`LetterSelector::at`] places or a time bound to see
    /// others).
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_at_most(
        &self,
        selector: &LetterSelector,
        max_letters: usize,
        max_read: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Letters> {
        let mut reader = Reader::open(self, selector, None)?;
        let mut out = Letters::default();
        while out.letters.len() < max_letters && reader.read < max_read {
            let Some(record) = reader.next()? else {
                out.read = reader.read;
                return Ok(out);
            };
            if selector.matches(&record) {
                out.letters.push(record);
            }
            progress(reader.read, reader.total);
        }
        out.read = reader.read;
        out.more = !reader.pending.is_empty();
        Ok(out)
    }

    /// Republishes the letters `redrive` selects, each to its original topic (or
    /// [`Redrive::to`]) as [`RedriveRecord::from_dead_letter`] rebuilds it, one at a time,
    /// each acknowledged by the broker (`acks=all`, idempotent producer) before the next.
    /// `progress` is called with the report so far after each letter.
    ///
    /// A selected letter that cannot be redriven — its destination topic does not exist or
    /// is not a valid name, it was redriven [`Redrive::max_redrives`] times already, its value
    /// was dropped — is [`Refused`] with the reason and the run goes on (a dry run too); so is
    /// one the broker refuses for itself (too large for its destination, not authorized
    /// there, refused by a policy), which a dry run cannot know.
    ///
    /// # Errors
    /// [`RedriveStopped`], with the report of what was done, when the run cannot go on: the
    /// dead-letter topic is missing, the broker stops answering, a republish is not
    /// acknowledged, or a resumable run's group holds a position for another selector.
    pub fn redrive(
        &self,
        redrive: &Redrive,
        mut progress: impl FnMut(&RedriveReport),
    ) -> std::result::Result<RedriveReport, RedriveStopped> {
        let mut report = RedriveReport {
            dlt: self.topic.clone(),
            dry_run: redrive.dry_run,
            ..RedriveReport::default()
        };
        match self.run_redrive(redrive, &mut report, &mut progress) {
            Ok(()) => Ok(report),
            Err(error) => Err(RedriveStopped {
                report: Box::new(report),
                error: Box::new(error),
            }),
        }
    }

    fn run_redrive(
        &self,
        redrive: &Redrive,
        report: &mut RedriveReport,
        progress: &mut dyn FnMut(&RedriveReport),
    ) -> Result<()> {
        let resume = redrive
            .resume_group
            .as_deref()
            .map(|group| (group, resume_metadata(&redrive.selector)));
        let mut reader = Reader::open(self, &redrive.selector, resume.as_ref())?;
        report.total = reader.total;
        let producer = if redrive.dry_run {
            None
        } else {
            Some(RedriveProducer::new(self)?)
        };
        let commits = resume.as_ref().filter(|_| !redrive.dry_run);
        // Destination → why it cannot be used (`None`: it exists).
        let mut destinations: HashMap<String, Option<String>> = HashMap::new();
        // Partition → next offset to commit at the end (letters passed over).
        let mut uncommitted: BTreeMap<i32, i64> = BTreeMap::new();
        while let Some(letter) = reader.next()? {
            report.read = reader.read;
            let (partition, next) = (letter.partition, letter.offset + 1);
            if !redrive.selector.matches(&letter) {
                report.filtered_out += 1;
                uncommitted.insert(partition, next);
                progress(report);
                continue;
            }
            let provenance = Provenance::from_headers(&letter.headers);
            let refuse = |reason: String| Refused {
                letter: LetterPlace::of(&letter),
                original: provenance.original_coordinates(),
                reason,
            };
            let record = match refusal(redrive, &provenance) {
                Some(reason) => Err(reason),
                None => RedriveRecord::from_dead_letter(&letter, redrive.to.as_deref())
                    .map_err(|e| e.to_string()),
            };
            let record = match record {
                Ok(record) => match self.destination(&mut destinations, &record.topic)? {
                    None => record,
                    Some(reason) => {
                        report.refused.push(refuse(reason));
                        uncommitted.insert(partition, next);
                        progress(report);
                        continue;
                    }
                },
                Err(reason) => {
                    report.refused.push(refuse(reason));
                    uncommitted.insert(partition, next);
                    progress(report);
                    continue;
                }
            };
            let at = match producer.as_ref().map(|p| p.send(&record)) {
                None => None,
                Some(Ok(at)) => Some(at),
                Some(Err(failure)) if failure.letter_only => {
                    report.refused.push(refuse(failure.reason));
                    uncommitted.insert(partition, next);
                    progress(report);
                    continue;
                }
                Some(Err(failure)) => {
                    return Err(DeadLetterTopicError::Republish {
                        letter: letter.coordinates(),
                        topic: record.topic.clone(),
                        reason: failure.reason,
                    });
                }
            };
            report.redriven.push(Redriven {
                letter: LetterPlace::of(&letter),
                original: provenance.original_coordinates(),
                key: letter.key.as_deref().map(<[u8]>::to_vec),
                topic: record.topic,
                partition: at.map(|(p, _)| p),
                offset: at.map(|(_, o)| o),
                redrive_count: record.redrive_count,
            });
            if !redrive.dry_run
                && redrive
                    .crash_after
                    .is_some_and(|n| report.redriven.len() as u64 >= n)
            {
                return Err(DeadLetterTopicError::SimulatedCrash);
            }
            if let Some((_, metadata)) = commits {
                reader.commit(partition, next, metadata)?;
                uncommitted.remove(&partition);
            }
            progress(report);
        }
        if let Some((_, metadata)) = commits {
            for (partition, next) in uncommitted {
                reader.commit(partition, next, metadata)?;
            }
        }
        Ok(())
    }

    /// Whether `topic` can be redriven to (`None`) or why not, asked once per topic.
    fn destination(
        &self,
        known: &mut HashMap<String, Option<String>>,
        topic: &str,
    ) -> Result<Option<String>> {
        if let Some(answer) = known.get(topic) {
            return Ok(answer.clone());
        }
        let client: BaseConsumer<ThrottledLogContext> = self
            .config()
            .create_with_context(ThrottledLogContext::new(LOG_INTERVAL))
            .map_err(|source| kafka("creating a metadata client", source))?;
        let answer = match self.partitions(&client, topic) {
            Ok(_) => None,
            Err(
                e @ (DeadLetterTopicError::MissingTopic { .. }
                | DeadLetterTopicError::TopicUnavailable { .. }),
            ) => Some(e.to_string()),
            Err(e) => return Err(e),
        };
        known.insert(topic.to_owned(), answer.clone());
        Ok(answer)
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "kourier-redrive")
            // Fail a metadata request to an unreachable broker within the timeout.
            .set("socket.connection.setup.timeout.ms", ms(self.timeout))
            .set("topic.metadata.refresh.interval.ms", "-1");
        for (k, v) in &self.config {
            config.set(k, v);
        }
        config
    }

    fn unreachable(&self, source: KafkaError) -> DeadLetterTopicError {
        DeadLetterTopicError::Unreachable {
            bootstrap: self.bootstrap.clone(),
            after: self.timeout,
            source,
        }
    }

    /// The topic's partitions, or why there are none.
    fn partitions(
        &self,
        client: &BaseConsumer<ThrottledLogContext>,
        topic: &str,
    ) -> Result<Vec<i32>> {
        let metadata = client
            .fetch_metadata(Some(topic), self.timeout)
            .map_err(|e| self.unreachable(e))?;
        let missing = || DeadLetterTopicError::MissingTopic {
            topic: topic.to_owned(),
        };
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(missing)?;
        match t.error() {
            None if !t.partitions().is_empty() => {}
            None => return Err(missing()),
            Some(e) => {
                return Err(match RDKafkaErrorCode::from(e) {
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                        missing()
                    }
                    code => DeadLetterTopicError::TopicUnavailable {
                        topic: topic.to_owned(),
                        code: code.to_string(),
                    },
                });
            }
        }
        let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        Ok(ids)
    }
}

fn kafka(operation: &str, source: KafkaError) -> DeadLetterTopicError {
    DeadLetterTopicError::Kafka {
        operation: operation.to_owned(),
        source,
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// Why a selected letter is not redriven, if it is not: redriven too often already, or a
/// metadata-only letter (both overridden by `force`).
fn refusal(redrive: &Redrive, p: &Provenance) -> Option<String> {
    if !redrive.force && p.redrive_count >= redrive.max_redrives {
        Some(format!(
            "already redriven {} time(s) (max redrives {}; force overrides)",
            p.redrive_count, redrive.max_redrives
        ))
    } else if !redrive.force
        && let Some(bytes) = p.value_dropped_bytes
    {
        Some(format!(
            "metadata-only letter: its {bytes}-byte value was dropped (force redrives it with a null value)"
        ))
    } else {
        None
    }
}

/// The commit metadata of a resumable redrive with `selector`: a tag, a stable hash of the
/// selector's description (what is compared) and the description's start (for people).
fn resume_metadata(selector: &LetterSelector) -> String {
    let text = selector.to_string();
    // FNV-1a, 64 bits: stable across Rust versions (std's hasher is not).
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let shown: String = text.chars().take(200).collect();
    format!("{RESUME_TAG} {hash:016x} {shown}")
}

/// The part of resume metadata that is compared: the tag and the hash.
fn resume_identity(metadata: &str) -> &str {
    match metadata.match_indices(' ').nth(1) {
        Some((end, _)) => &metadata[..end],
        None => metadata,
    }
}

// ───────────── reading a topic to its end ─────────────

/// Reads a topic's partitions from a start offset up to an end (the end they had when it
/// was opened, or the last place selected), in offset order per partition.
struct Reader {
    consumer: BaseConsumer<ThrottledLogContext>,
    topic: String,
    /// Partition → end offset (exclusive) still to reach.
    pending: BTreeMap<i32, i64>,
    /// Records between the start and end offsets, gaps (compaction, transactions) included.
    total: u64,
    read: u64,
    timeout: Duration,
}

impl Reader {
    /// Opens `dlt` where `selector` can select letters; with `resume` (a group and its commit
    /// metadata), from the group's committed position when it was taken with that metadata.
    fn open(
        dlt: &DeadLetterTopic,
        selector: &LetterSelector,
        resume: Option<&(&str, String)>,
    ) -> Result<Self> {
        let unused_group = format!("kourier-redrive-reader-{}", std::process::id());
        let consumer: BaseConsumer<ThrottledLogContext> = dlt
            .config()
            .set("group.id", resume.map_or(unused_group.as_str(), |r| r.0))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create_with_context(ThrottledLogContext::new(LOG_INTERVAL))
            .map_err(|source| kafka("creating the consumer", source))?;
        let topic = dlt.topic.as_str();
        let partitions = dlt.partitions(&consumer, topic)?;
        let committed = match resume {
            Some((group, metadata)) => {
                resumed_offsets(&consumer, dlt, group, &partitions, metadata, selector)?
            }
            None => HashMap::new(),
        };
        let mut pending = BTreeMap::new();
        let mut total = 0u64;
        {
            // The list stays in this scope (rust-rdkafka #453).
            let mut assignment = TopicPartitionList::new();
            for &p in &partitions {
                let (low, high) = match selector.bounds(p) {
                    Some(None) => continue,
                    _ => consumer
                        .fetch_watermarks(topic, p, dlt.timeout)
                        .map_err(|e| dlt.unreachable(e))?,
                };
                let (mut from, mut to) = (low, high);
                if let Some(Some((first, last))) = selector.bounds(p) {
                    from = from.max(first);
                    to = to.min(last.saturating_add(1));
                }
                if let Some(&c) = committed.get(&p) {
                    from = from.max(c);
                }
                if from < to {
                    assignment
                        .add_partition_offset(topic, p, Offset::Offset(from))
                        .map_err(|source| kafka("assigning partitions", source))?;
                    pending.insert(p, to);
                    total += (to - from) as u64;
                }
            }
            if !pending.is_empty() {
                consumer
                    .assign(&assignment)
                    .map_err(|source| kafka("assigning partitions", source))?;
            }
        }
        Ok(Reader {
            consumer,
            topic: topic.to_owned(),
            pending,
            total,
            read: 0,
            timeout: dlt.timeout,
        })
    }

    /// The next record, or `None` once every partition reached its end.
    fn next(&mut self) -> Result<Option<RawRecord>> {
        let mut idle_since = Instant::now();
        while !self.pending.is_empty() {
            match self.consumer.poll(Duration::from_millis(100)) {
                None => {
                    if idle_since.elapsed() >= self.timeout {
                        return Err(DeadLetterTopicError::Stalled {
                            topic: self.topic.clone(),
                            after: self.timeout,
                            expected: self.total.saturating_sub(self.read),
                        });
                    }
                }
                Some(Ok(m)) => {
                    idle_since = Instant::now();
                    let Some(&end) = self.pending.get(&m.partition()) else {
                        continue; // a partition already read to its end
                    };
                    if m.offset() >= end {
                        self.pending.remove(&m.partition());
                        continue;
                    }
                    if m.offset() + 1 >= end {
                        self.pending.remove(&m.partition());
                    }
                    self.read += 1;
                    return Ok(Some(RawRecord::from_message(&m)));
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.pending.remove(&p);
                }
                Some(Err(e)) => return Err(kafka(&format!("reading {}", self.topic), e)),
            }
        }
        Ok(None)
    }

    /// Commits `next_offset` (the offset of the next record to read) for `partition`, with
    /// `metadata`, synchronously.
    fn commit(&self, partition: i32, next_offset: i64, metadata: &str) -> Result<()> {
        let operation = || format!("committing {}/{partition}={next_offset}", self.topic);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next_offset))
            .map_err(|e| kafka(&operation(), e))?;
        if let Some(mut elem) = tpl.find_partition(&self.topic, partition) {
            elem.set_metadata(metadata);
        }
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| kafka(&operation(), e))
    }
}

/// The group's committed offsets in `dlt`, refused when one was taken with other metadata.
fn resumed_offsets(
    consumer: &BaseConsumer<ThrottledLogContext>,
    dlt: &DeadLetterTopic,
    group: &str,
    partitions: &[i32],
    metadata: &str,
    selector: &LetterSelector,
) -> Result<HashMap<i32, i64>> {
    // The lists stay inside this function (rust-rdkafka #453).
    let mut wanted = TopicPartitionList::new();
    for &p in partitions {
        wanted.add_partition(&dlt.topic, p);
    }
    let committed = consumer
        .committed_offsets(wanted, dlt.timeout)
        .map_err(|e| dlt.unreachable(e))?;
    let mut out = HashMap::new();
    for e in committed.elements_for_topic(&dlt.topic) {
        if let Offset::Offset(o) = e.offset() {
            if resume_identity(e.metadata()) != resume_identity(metadata) {
                let stored = match e.metadata() {
                    "" => "none recorded".to_owned(),
                    m => headers::shown(m.as_bytes()),
                };
                return Err(DeadLetterTopicError::ResumeMismatch {
                    group: group.to_owned(),
                    topic: dlt.topic.clone(),
                    stored: stored.chars().take(200).collect(),
                    wanted: selector.to_string(),
                });
            }
            out.insert(e.partition(), o);
        }
    }
    Ok(out)
}

// ───────────── republishing ─────────────

/// Remembers the outcome of the one record in flight; logs through the throttle.
struct LastDelivery(
    Mutex<Option<std::result::Result<(i32, i64), KafkaError>>>,
    ThrottledLogContext,
);

impl ClientContext for LastDelivery {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.1.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.1.error(error, reason);
    }
}

impl ProducerContext for LastDelivery {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }
}

/// An idempotent, `acks=all` producer sending one record at a time and waiting for its
/// acknowledgement. Keys are partitioned as a Java producer (and kourier's `Publisher`) would.
struct RedriveProducer {
    producer: BaseProducer<LastDelivery>,
    timeout: Duration,
}

impl RedriveProducer {
    fn new(dlt: &DeadLetterTopic) -> Result<Self> {
        // The broker must acknowledge within 3 timeouts (librdkafka retries meanwhile).
        let timeout = dlt.timeout.saturating_mul(3);
        let producer = dlt
            .config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", ms(timeout))
            .create_with_context(LastDelivery(
                Mutex::default(),
                ThrottledLogContext::new(LOG_INTERVAL),
            ))
            .map_err(|source| kafka("creating the producer", source))?;
        Ok(RedriveProducer { producer, timeout })
    }

    /// Sends and waits for the acknowledgement: `(partition, offset)`, or why not.
    fn send(&self, r: &RedriveRecord) -> std::result::Result<(i32, i64), SendFailure> {
        // Names byte for byte: rdkafka's `OwnedHeaders::insert` would need them as `&str`.
        let mut record = BaseRecord::<[u8], [u8]>::to(&r.topic).headers(r.headers.to_rdkafka());
        if let Some(key) = &r.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &r.value {
            record = record.payload(value.as_slice());
        }
        self.producer
            .send(record)
            .map_err(|(e, _)| SendFailure::of("the producer refused the record", &e))?;
        // flush() serves the delivery callback; it ends by message.timeout.ms at the latest.
        let flushed = self
            .producer
            .flush(self.timeout.saturating_add(Duration::from_secs(5)));
        let outcome = self
            .producer
            .context()
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let stop = |reason: String| SendFailure {
            reason,
            letter_only: false,
        };
        match (outcome, flushed) {
            (Some(Ok(at)), _) => Ok(at),
            (Some(Err(e)), _) => Err(SendFailure::of("the broker refused it", &e)),
            (None, Err(e)) => Err(stop(format!("no acknowledgement in time: {e}"))),
            (None, Ok(())) => Err(stop("no delivery report".to_owned())),
        }
    }
}

/// Why a republish failed, and whether it is the letter's own fault (its size, its content,
/// its destination's policy or permissions: the next letter may go through) rather than the
/// cluster's (no answer: the run stops).
#[derive(Debug)]
struct SendFailure {
    reason: String,
    letter_only: bool,
}

impl SendFailure {
    fn of(what: &str, e: &KafkaError) -> Self {
        use RDKafkaErrorCode as C;
        let letter_only = matches!(
            e.rdkafka_error_code(),
            Some(
                C::MessageSizeTooLarge
                    | C::MessageBatchTooLarge
                    | C::InvalidMessage
                    | C::InvalidMessageSize
                    | C::InvalidRecord
                    | C::InvalidTopic
                    | C::TopicAuthorizationFailed
                    | C::PolicyViolation
            )
        );
        SendFailure {
            reason: format!("{what}: {e}"),
            letter_only,
        }
    }
}

impl Drop for RedriveProducer {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_metadata_is_tied_to_the_selection() {
        let a = resume_metadata(&LetterSelector::new().key("u1"));
        let b = resume_metadata(&LetterSelector::new().key("u2"));
        assert!(
            a.starts_with("kourier-redrive/1 ") && a.ends_with(" key=u1"),
            "{a}"
        );
        assert_ne!(resume_identity(&a), resume_identity(&b));
        assert_eq!(
            resume_identity(&a),
            resume_identity(&resume_metadata(&LetterSelector::new().key("u1")))
        );
        assert_eq!(resume_identity(""), "");
    }
}
