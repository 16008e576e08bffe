//! The command line: the runner's flags, and the internal `consume` subcommand the runner
//! starts its consumer processes with.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "fault_injection",
    about = "Kill the consumer, the broker and Redis while consuming; check nothing is lost",
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Sub>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Sub {
    /// Internal: the consumer child process the runner starts.
    Consume(ConsumeArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// Events to produce and consume.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) events: u64,
    /// Consumer kills (SIGKILL; SIGTERM with --clean-restarts), each followed by a restart.
    #[arg(long, default_value_t = 5)]
    pub(crate) kills: u32,
    /// Broker kills and restarts (default 1; 0 with --clean-restarts).
    #[arg(long)]
    pub(crate) broker_restarts: Option<u32>,
    /// Idempotency Redis outages (default 1; 0 with --clean-restarts or --no-idempotency).
    #[arg(long)]
    pub(crate) redis_outages: Option<u32>,
    /// Broker restarts under load (default 0): the broker is killed only once the consumer is
    /// saturated (at least half of `max_in_flight` in flight) and its commits are moving, so
    /// the kill meets commits in progress rather than an idle moment.
    #[arg(long, default_value_t = 0)]
    pub(crate) loaded_broker_restarts: u32,
    /// Zombie consumers (default 0; needs the idempotency store): a second consumer joins, the
    /// first is frozen with SIGSTOP past the session timeout and the idempotency lease while
    /// the second takes its partitions over, then resumed with SIGCONT and finally stopped
    /// with SIGTERM. Its duplicates are counted apart (`zombie_duplicates`).
    #[arg(long, default_value_t = 0)]
    pub(crate) zombies: u32,
    /// Seconds a zombie stays frozen at least (default: session timeout + lease + 3 s); it
    /// stays frozen until the other consumer holds every partition in any case.
    #[arg(long)]
    pub(crate) zombie_freeze_secs: Option<u64>,
    /// Downstream outages (default 0): every handler call that reaches the downstream (the
    /// events not injected to fail before it) fails transiently for `--outage-secs`. Records
    /// whose retries run out during the outage are dead-lettered: reported, not a failure.
    #[arg(long, default_value_t = 0)]
    pub(crate) outages: u32,
    /// Seconds each downstream outage lasts.
    #[arg(long, default_value_t = 10)]
    pub(crate) outage_secs: u64,
    /// Run the consumers with the outage breaker (`BreakerPolicy::default()` with a 1 s open
    /// interval doubling to 10 s, four probes per record): a downstream outage then
    /// dead-letters nothing.
    #[arg(long)]
    pub(crate) breaker: bool,
    /// Compose the features (see the module docs, "Compose mode"): the consumers run with
    /// retry tiers (1 s, 2 s) keeping key order (a Redis key-order ledger), the idempotency
    /// store and the outage breaker; injected failures make records go through the tiers.
    /// Checks at most one dead letter per event, no effect repeated once its key was marked
    /// done, and that the consumer caught up within `--caught-up-secs` of the last fault.
    #[arg(long)]
    pub(crate) compose: bool,
    /// Of the `--kills`, how many SIGKILL the consumer right after it reported a dead letter
    /// (within milliseconds; one from the last tier when one comes within 20 s). Default: 1
    /// with `--compose` (when there is a kill), else 0.
    #[arg(long)]
    pub(crate) dlt_kills: Option<u32>,
    /// `--compose`: seconds the consumer may take to catch up after the end of the last
    /// fault, on top of the time its remaining records need at the pace it had before the
    /// first fault.
    #[arg(long, default_value_t = 60)]
    pub(crate) caught_up_secs: u64,
    /// Stop the consumer with SIGTERM (graceful shutdown) instead of SIGKILL, without an
    /// idempotency store; expects 0 duplicates.
    #[arg(long)]
    pub(crate) clean_restarts: bool,
    /// Queue mode (see the module docs, "Queue mode"; needs the `queue` feature): the
    /// consumers are `QueueConsumer`s sharing one share group, `--members` at once. Faults:
    /// `--kills` and `--broker-restarts` only.
    #[arg(long)]
    pub(crate) queue: bool,
    /// `--queue`: consumer processes in the share group at once.
    #[arg(long, default_value_t = 2)]
    pub(crate) members: usize,
    /// `--queue`: the most records one member fetches and holds locked (`fetch_size`;
    /// default: `--max-in-flight`). The duplicate bound is counted in these.
    #[arg(long)]
    pub(crate) fetch_size: Option<usize>,
    /// What the consumers' offset commits carry in their metadata (`CommitMetadata`):
    /// `finished-offsets` (the default: a partition's next owner skips the records finished
    /// above the commit point), `none` (it delivers them all again), or `both`: the whole run
    /// twice with the same seed, first `none` (the "before" figure) then `finished-offsets`
    /// (the "after" figure), ending with one line that compares their replays (see the module
    /// docs, "Replays"). Replays are reported, never a failure.
    #[arg(long, value_enum, default_value_t = MetadataMode::FinishedOffsets)]
    pub(crate) commit_metadata: MetadataMode,
    /// Run the consumer without the idempotency store. With SIGKILLs the duplicate bound then
    /// does not hold (every uncommitted effect repeats): a check that the checker catches it.
    #[arg(long)]
    pub(crate) no_idempotency: bool,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 6)]
    pub(crate) partitions: i32,
    /// Partitions of the dead-letter topic (default: as many as the topic). Fewer than the
    /// topic: letters from a source partition the dead-letter topic lacks are placed by key.
    #[arg(long)]
    pub(crate) dlt_partitions: Option<i32>,
    /// Distinct record keys.
    #[arg(long, default_value_t = 200)]
    pub(crate) keys: u32,
    /// The consumer's max_in_flight (the duplicate bound per kill).
    #[arg(long, default_value_t = 32)]
    pub(crate) max_in_flight: usize,
    /// Simulated work per record, in ms: half before the side effect, half after it (so a
    /// kill can land between the effect and the handler's return). Default: paced so that
    /// consuming takes about 18 s per fault, 45 s per zombie (each fault needs a busy consumer to hit).
    #[arg(long)]
    pub(crate) work_ms: Option<u64>,
    /// Seconds the idempotency Redis stays down per outage.
    #[arg(long, default_value_t = 5)]
    pub(crate) redis_down_secs: u64,
    /// Seconds the broker stays down per restart (before it is started again).
    #[arg(long, default_value_t = 3)]
    pub(crate) broker_down_secs: u64,
    /// Seed of the key choice, fault moments and injected failures (default: from the clock).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Gives up waiting for the consumer after this many seconds in all.
    #[arg(long, default_value_t = 900)]
    pub(crate) timeout_secs: u64,
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub(crate) bootstrap: String,
    /// The `scripts/services` that runs the broker, for broker restarts. Unset: broker
    /// restarts are skipped.
    #[arg(long, env = "KOURIER_FAULT_BROKER_CONTROL")]
    pub(crate) broker_control: Option<PathBuf>,
    /// Directory for the ledgers and logs (default: a new temporary directory, removed after
    /// a passing run).
    #[arg(long)]
    pub(crate) work_dir: Option<PathBuf>,
    /// Keep the topics and the work directory after a passing run.
    #[arg(long)]
    pub(crate) keep: bool,
}

/// `--commit-metadata`: what the consumers' commits carry, or both one after the other.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetadataMode {
    /// `CommitMetadata::FinishedOffsets`, the consumer's default.
    FinishedOffsets,
    /// `CommitMetadata::None`.
    None,
    /// Two runs with the same seed: `none`, then `finished-offsets`.
    Both,
}

impl MetadataMode {
    /// The name in the output (`commit_metadata=...`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MetadataMode::FinishedOffsets => "finished-offsets",
            MetadataMode::None => "none",
            MetadataMode::Both => "both",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ConsumeArgs {
    #[arg(long)]
    pub(crate) bootstrap: String,
    #[arg(long)]
    pub(crate) topic: String,
    #[arg(long)]
    pub(crate) group: String,
    /// The idempotency Redis; none: no idempotency store.
    #[arg(long)]
    pub(crate) redis_url: Option<String>,
    #[arg(long)]
    pub(crate) ledger: PathBuf,
    #[arg(long)]
    pub(crate) seed: u64,
    #[arg(long)]
    pub(crate) max_in_flight: usize,
    #[arg(long)]
    pub(crate) work_ms: u64,
    /// While this file exists, every handler call that reaches the downstream fails
    /// transiently (a downstream outage).
    #[arg(long)]
    pub(crate) outage_flag: Option<PathBuf>,
    /// Run with the outage breaker.
    #[arg(long)]
    pub(crate) breaker: bool,
    /// Where to note each record's outcome (`on_outcome`), one line each.
    #[arg(long)]
    pub(crate) outcomes: PathBuf,
    /// Run with retry tiers keeping key order (`--compose`), the key-order ledger in the
    /// Redis at `--ledger-url`.
    #[arg(long)]
    pub(crate) compose: bool,
    /// The key-order ledger's Redis (`--compose`).
    #[arg(long)]
    pub(crate) ledger_url: Option<String>,
    /// Commit without metadata (`CommitMetadata::None`): a partition's next owner delivers
    /// again every record from the commit point on.
    #[arg(long)]
    pub(crate) no_commit_metadata: bool,
    /// Run a `QueueConsumer` over the share group `--group` (feature `queue`), fetching at
    /// most this many records at once.
    #[arg(long)]
    pub(crate) queue_fetch_size: Option<usize>,
}
