//! # kourier — reliable Kafka consumers
//!
//! Teams move slow work (mail, push notifications, webhooks) off their synchronous APIs onto
//! Kafka. kourier is the consumer side of that pattern as a library: implement a
//! [`Handler`] for your event type, and a [`RetryingConsumer`] runs it for every record with
//! retries, a dead-letter topic, optional idempotency and at-least-once commits. A typed,
//! keyed [`Publisher`] is the producer side.
//!
//! ## Quick start
//!
//! ```no_run
//! use kourier::{async_trait, Handler, HandlerError, Message, ProcessingOrder, RetryingConsumer};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct NotifyEvent { event_id: String, user_id: String, to: String }
//!
//! struct Mailer;
//!
//! #[async_trait]
//! impl Handler for Mailer {
//!     type Event = NotifyEvent;
//!     async fn handle(&self, message: &Message<NotifyEvent>) -> Result<(), HandlerError> {
//!         let event = message.event();
//!         if !event.to.contains('@') {
//!             return Err(HandlerError::permanent("invalid address")); // dead-lettered now
//!         }
//!         // send the mail; `?` on an error makes it a transient failure (retried)
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> kourier::Result<()> {
//!     RetryingConsumer::builder(Mailer)
//!         .bootstrap_servers("127.0.0.1:9092")
//!         .group_id("notifier")
//!         .topic("notify.v1") // and its dead-letter topic notify.v1.dlt must exist
//!         .ordering(ProcessingOrder::Key)
//!         .build()?
//!         .run_until_signal()
//!         .await? // a dead cluster or a missing topic is an error here, within 30 s
//!         .into_result() // records abandoned at shutdown are an error too
//! }
//! ```
//!
//! ## Delivery semantics
//!
//! These are the contract; tests against a real broker and Redis hold kourier to them.
//!
//! 1. **At-least-once.** A record's offset is committed only when it and every lower record
//!    of its partition are *settled*: handled successfully, dead-lettered with the broker's
//!    acknowledgement, or skipped as a duplicate. Records completing out of order (key mode)
//!    commit only the contiguous prefix; offsets are never assumed dense.
//! 2. **Ordering** ([`ProcessingOrder`]). `Partition` (default): one record per partition at a time,
//!    in offset order, retries included (once a record's outcome is decided, writing it down —
//!    marking its key done, its dead letter's acknowledgement — overlaps the next record; its
//!    offset waits for it). `Key`: one record per key at a time, in order;
//!    different keys of a partition run in parallel; null keys fall back to partition order.
//!    `Unordered`: none. `max_in_flight` bounds every mode. A [batch
//!    handler](crate::batch) is handed a lane's next records after the one whose turn it is,
//!    in order, in one call; those after a failure in that call run again, after the failed
//!    record's outcome.
//! 3. **Retries are explicit** ([`RetryPolicy`]): attempts include the first try; fixed or
//!    exponential with jitter, with a maximum elapsed time. Waiting is an async timer while
//!    polling continues on a dedicated thread, so a long back-off never makes the consumer
//!    leave its group.
//! 4. **Classification** ([`HandlerError`]): transient → retried, then dead-lettered as
//!    `retries-exhausted`; permanent → dead-lettered at once. A record the [`Codec`] cannot
//!    decode (bad JSON, wrong schema, null value) is a poison pill: dead-lettered at once as
//!    `decode`, the handler is never called. A panicking handler is a failure of its own
//!    kind, [`FailureKind::Panic`]: retried by default, dead-lettered as `panic`.
//! 5. **Dead letters keep everything**: same key, same value bytes (null stays null), the
//!    original headers (names and values byte for byte: a [`Header`] name is bytes, not
//!    necessarily UTF-8), plus provenance headers ([`dead_letter::headers`]). The default sink
//!    writes to `<topic>.dlt`, to the source partition when the dead-letter topic has it,
//!    else by key.
//! 6. **A failed dead-letter write is never dropped**: it is retried with back-off, logged,
//!    and the partition's offset does not move past it meanwhile (the partition's next
//!    records run, up to the limit of records received past the commit point).
//! 7. **Idempotency is claim → work → complete** ([`idempotency`]): a key is marked done only
//!    after the handler succeeded, or once the record's dead letter or retry-tier forward was
//!    acknowledged (its delivery settled: see 18); a failed attempt that is retried releases
//!    its claim so the retry runs; a key held by another worker is waited for, never
//!    skipped; a store outage makes records wait (or, opted in, run without dedup).
//!    A claim lives as long as its work: it is renewed every third of the lease while the
//!    handler runs, renewal stops when the partition's assignment is lost, an attempt whose
//!    claim was lost is cancelled, and the handler can read its claim
//!    ([`Message::claim_token`]) to fence its effect downstream. In partition and key order
//!    a claim also claims the next records of its lane in the same round trip; such a claim
//!    is used only while fresh and released if its record does not take it.
//! 8. **Graceful shutdown**: stop taking records, let in-flight records finish within the
//!    shutdown timeout, commit synchronously (retried until the shutdown deadline; a commit
//!    that still fails is reported), leave the group. After a clean shutdown and a restart
//!    no record is handled twice.
//! 9. **Rebalance**: on revoke, dispatching stops for the revoked partitions, their in-flight
//!    records are waited for (bounded), their settled offsets are committed synchronously and
//!    their buffered records dropped; late completions from an old assignment are ignored.
//!    Each commit names, in its metadata, the offsets finished above its commit point, and
//!    a partition's next owner skips them ([`CommitMetadata`]): what settled out of order
//!    above a slow record is not handled again after a rebalance or restart.
//! 10. **Bounded memory**: buffered records are bounded by count and bytes; above the limits
//!     partitions are paused (polling continues) and resumed below half.
//! 11. **Bad input never crashes the consumer**: malformed payloads, null keys and values,
//!     empty payloads, binary or non-UTF-8 headers end as handled records or dead letters.
//! 12. **Bad configuration is an error from `build()`** ([`ConfigError`]), never a panic.
//! 13. **A wrong world is an answer, not a hang**: unreachable brokers and missing topics are
//!     typed errors from `run()` within the startup timeout; records abandoned at shutdown
//!     are listed in its [`ShutdownReport`]; a condition that persists is logged once per
//!     interval with a count.
//! 14. **Every record settles**: whatever panics on a record's path (codec, dedup-key
//!     function, handler, store, sink), the record ends in a defined state and its slot and
//!     lane are released; work running ahead of the commit point is bounded. A record
//!     waiting for its claim, the key-order ledger or the breaker holds no slot, and a
//!     revoke or shutdown gives it up at once (nothing of it ran); a tier record waiting for
//!     its due time is left for later. A panic that escapes kourier's guards gives its record
//!     up unsettled: its partition is then reset to its commit point (read again from
//!     there), never left frozen.
//! 15. **A lease lives as long as its work**: see 7 — a held claim is renewed while its
//!     handler runs and given up when the partition is lost; the handler sees its claim.
//! 16. **An outage is not a failure of the record** (opt-in [`BreakerPolicy`], through
//!     [`RetryingConsumerBuilder::breaker`]): when transient failures cross a threshold the
//!     breaker opens, nothing new is dispatched (polling goes on), and records that fail
//!     meanwhile wait in order — no attempt used, never dead-lettered for it, their claims
//!     released, a revoke or shutdown gives them up at once — until one probe record gets
//!     through. [`HandlerError::unavailable`] says so explicitly, with or without a breaker.
//!     Permanent failures and poison pills are dead-lettered as always. Waits do not hold
//!     capacity: a record in a retry back-off (or held for an outage) gives its in-flight
//!     slot to records of other keys or partitions, and takes the next free one back.
//!     Records failing on their own cannot keep it open: other records probe first, and
//!     after [`probes_per_record`](BreakerPolicy::with_probes_per_record) failed probes in a
//!     row by records that failed in the outage already it closes and they take their
//!     normal path.
//! 17. **Everything a record carries is untrusted**: headers kourier reads back (a tier's due
//!     time, attempts, stages, provenance, the redrive count) are validated and clamped by
//!     written rules ([`tiers`](tiers#headers-are-untrusted),
//!     [`dead_letter::headers`](dead_letter::headers#reading-them-back-every-value-is-untrusted));
//!     every duration, from a setting or a handler's hint, is bounded where it enters. A
//!     hostile or malformed value never panics, never wraps, never parks a partition, never
//!     moves another record off its placement.
//! 18. **One event, one outcome** ([`idempotency`](idempotency#deliveries-of-one-event-delivery-rule-18)):
//!     with an idempotency store, each delivery of an event — its source record, each retry
//!     tier copy, each redrive — settles once: handled, dead-lettered or forwarded on, then
//!     marked done, so a redelivery after a crash or a stale copy is skipped; an event is
//!     dead-lettered at most once as far as the store can tell. Copies of one event count as
//!     one record for the outage breaker.
//! 19. **One bad destination is not an outage** (opt-in [`Destinations`], through
//!     [`RetryingConsumerBuilder::destinations`]): each record names its destination (its key,
//!     a header, or a function of the message) and failures are attributed to it. A
//!     destination's breaker opens on its own failures only; its records wait without a slot
//!     (no attempt used, never dead-lettered for it, order within the key kept), one probe
//!     per open interval, while other destinations run at full speed. The consumer-wide
//!     breaker then opens only when failures span several destinations
//!     ([`min_destinations`](BreakerPolicy::with_min_destinations)). A handler can say a
//!     destination is [gone](HandlerError::destination_gone) (its records dead-lettered
//!     without calling it) or pause it ([`unavailable`](HandlerError::unavailable) with a
//!     [`retry_after`](HandlerError::retry_after)); a cap and a rate limit per destination
//!     keep a hot one to its share. Per-destination state is bounded
//!     ([`with_max_tracked`](Destinations::with_max_tracked)). Freed slots go to retries and
//!     first attempts in turns. With retry tiers, a record that waited
//!     [`park_after`](Destinations::with_park_after) for its open destination is parked in a
//!     tier (a deferred forward: no attempt used), so its partition's commit point moves on.
//! 20. **Transactional output is exactly-once for Kafka** (opt-in
//!     [`transactional`], through [`RetryingConsumerBuilder::transactional`]):
//!     a handler stages output records on its message ([`Message::send_output`]); a record's
//!     outputs are produced into the transaction open when it finishes, and it counts as
//!     finished only under the same guard, so each transaction — one per commit interval,
//!     also at a revoke and at shutdown — carries exactly the outputs of the records whose
//!     offsets it commits: the commit point *and* the offsets finished above it (the same
//!     commit metadata as 9). Records that finished out of order above a slow one have their
//!     outputs and their finished mark in one transaction, so a partition's next owner skips
//!     exactly the records whose outputs committed. A `read_committed` reader sees each
//!     input's outputs once across crashes, restarts and rebalances. A transaction that
//!     fails is aborted and the consumer stops with [`Error::Transaction`] (nothing more is
//!     committed; a restart handles its records again); so does a zombie — a consumer whose
//!     assignment was lost, or whose commit the broker refuses for a stale group generation
//!     (KIP-447) or a newer producer with its transactional id. A record given up is
//!     dead-lettered in the transaction too, with the default [`KafkaDeadLetterSink`] (or one
//!     given to [`RetryingConsumerBuilder::dead_letter_sink`]): its letter — the record the
//!     sink would write, same topic, partition, key, value and headers — is produced when
//!     the record finishes, like outputs, so a `read_committed` reader of the dead-letter
//!     topic sees one letter per record given up, never one for a record whose transaction
//!     aborted. Any other [`DeadLetterSink`] (a wrapper of the Kafka sink included) writes
//!     its letters itself, outside the transaction: at-least-once. A record given up to a
//!     retry tier is forwarded in the transaction too: its forward — the record the tiers
//!     would write, same tier topic, partition, key, value and headers — is produced when the
//!     record finishes, so the forward and the record's offset commit are atomic and the
//!     consumer, reading its tier topics `read_committed`, sees one forward per record given
//!     up to a tier. Effects outside Kafka stay at-least-once; with an idempotency store
//!     (rule 7) a record's key is marked done only once the transaction carrying its
//!     outputs, letter or forward and its offset committed (its claim is held and renewed
//!     until then, and released if that transaction aborts), so the store never skips a
//!     record whose outputs did not commit. Retry tiers that keep key order (their ledger is
//!     outside the transaction and settles a record before it commits) are refused with it
//!     by `build()`.
//!
//! **Retry tiers** (opt-in, [`RetryingConsumerBuilder::retry_tiers`], see [`tiers`]): after
//! the in-place attempts, a transient failure is forwarded to a delayed tier topic instead of
//! the dead-letter topic, committed only after the broker acknowledged the forward, and runs
//! again there once due — without holding a slot or the group session meanwhile. With
//! `with_key_order`, later records of a key wait behind it in the tiers (a shared ledger in
//! Redis), so per-key order holds across tiers too.
//!
//! Duplicates remain possible (that is what at-least-once means) for records in flight when
//! a consumer crashes or loses its partitions past the revoke timeout; an [`IdempotencyStore`]
//! turns most of those into skips.
//!
//! ## When things are wrong
//!
//! | situation | what kourier does | when |
//! |---|---|---|
//! | bootstrap servers unreachable at start | `run()` returns `Error::BrokersUnreachable` naming the servers, whatever step met it (the startup checks, or creating missing topics with `MissingTopics::create`; a broker that answers and refuses to create a topic is `Error::Topic`); one warning per `error_log_interval` while it tries, and librdkafka's own lines from every client kourier creates once per distinct line per interval | within `startup_timeout` (default 30 s) |
//! | a subscribed topic is missing at start | `Error::MissingTopics` naming every missing topic, and the settings that would help (`MissingTopics::create`, `MissingTopics::Wait`, which waits for them instead) | at the first metadata answer |
//! | the dead-letter topic is missing at start | `Error::MissingTopics` naming `<topic>.dlt` (every sink declares its topics through `DeadLetterSink::topics_for`, which has no default: a sink wrapping the Kafka sink forwards it and keeps the check) | at the first metadata answer |
//! | a retry-tier topic is missing at start | `Error::MissingTopics` naming it (`<topic>.retry.<n>`); `MissingTopics::create` creates tier topics with their source's partition count | at the first metadata answer |
//! | the cluster goes away while running | records wait, nothing is committed past them; `connection` in the snapshot and `kourier_connection_state` turn `Disconnected` / `0`; each distinct error is logged once per interval with a count | until it is back; with `max_broker_outage(d)`, `run()` returns `Error::BrokersUnreachable` after `d` |
//! | a subscribed topic is deleted while consuming | its partitions leave the assignment with one warning; if it is re-created, its records are tracked again | once librdkafka reports it gone (it waits `topic.metadata.propagation.max.ms`, 30 s by default; measured 30.0 s) |
//! | a codec, dedup-key function, handler, store or sink panics | the record ends in a defined state: codec → dead letter `decode`; dedup-key function → dead letter `panic`; handler → failure kind `panic`, retried, then dead letter `panic`; store / sink → a failure of that store / sink, retried, the partition waits; counted in `kourier_handler_panics_total` | at once |
//! | a record is stuck (a hung call) | logged once with its coordinates after `stall_threshold`, counted in `kourier_records_stalled_total`; its partition pauses when `max_uncommitted_per_partition` records have been started past the commit point behind it for half a second, or at once at twice that | after `stall_threshold` (60 s) |
//! | shutdown with records still running | `run()` returns a `ShutdownReport` listing the records given up (not committed, delivered again after a restart): a record only waiting out a retry back-off, for its claim or for the breaker is given up at once, a handler still running at the deadline is dropped at its next `.await` (one blocking its thread is counted); a tier record waiting for its due time is counted as *left for later* (not a sign of trouble: the report stays clean) | at once / after `shutdown_timeout` (30 s) |
//! | the final commit fails at shutdown (coordinator refusing or unreachable) | retried with a short back-off (100 ms doubling to 1 s), the consumer polling meanwhile so it stays in its group; one warning per `error_log_interval`; a commit still failing at the deadline is logged as an error and reported: `ShutdownReport::commit_error` and `uncommitted` (`topic/partition@offset`), `is_clean()` false, `into_result()` is `Error::Commit`; those partitions' records settled since their last commit are delivered again after a restart | until `shutdown_timeout` (at least one try) |
//! | a panic escapes kourier's guards (a bug, or a value whose `Drop` panics) | the record is given up unsettled; its partition is drained like a revoke, its settled offsets committed, and it is read again from its commit point (one warning): the record and the ones after it run again instead of the partition freezing | at once (bounded by `revoke_timeout`) |
//! | one destination of many is down (with [`Destinations`]) | its breaker opens (one warning per destination, throttled); its records wait without a slot, using no attempts and reaching no dead-letter topic, one probe per open interval; the other destinations' records run; `destinations` in the snapshot, `kourier_destination*` metrics | opens at once on an `unavailable` failure, else after 3 transient failures in a row of two records at least; probes after 5 s, then 10, 20, 40, 60 s |
//! | the handlers' downstream is down (with a [`BreakerPolicy`]) | the breaker opens (one warning), dispatch is held, failing records wait without using attempts or reaching the dead-letter topic; one probe record per open interval (doubling to its maximum); closes on a successful probe (one line); `breaker` in the snapshot, `kourier_breaker_*` metrics | opens at the threshold (default: at least half of the last 20 calls failed, counted from 3 calls, failures of two records at least, each `unavailable` failure counting as a record of its own; no consecutive-failures trigger unless set with `with_consecutive_failures`); probes after 5 s, then 10, 20, 40, 60 s |
//! | bad configuration | a typed `Error::Config` from `build()`, never a panic | at `build()` |
//!
//! ## Architecture
//!
//! Data flows one way: **poll → schedule → work → settle → commit**. A dedicated poll
//! thread owns the rdkafka consumer: it polls, feeds a scheduler that buffers records per
//! partition and lane (partition, key or record, by ordering mode), pauses and resumes
//! partitions, commits settled offsets and serves rebalances. Workers are Tokio tasks on your
//! runtime: each runs decode → claim → handler → retry → dead-letter → complete/release, then
//! reports the record settled and takes the next one. In Key and Partition order a worker
//! takes a *run*: a record and the next ones of its lane (up to 32), each run after the
//! previous one settled, without the scheduler's lock, for at most 2 ms; what ran is reported
//! at the run's end, when a record does not end at once, or when one parks for a back-off.
//!
//! The modules form layers; imports only point down (no file imports one above it, and no
//! import circle):
//!
//! | layer | files | what |
//! |---|---|---|
//! | top | `lib.rs`, `consumer/builder.rs` | the public surface; `build()` assembles the engine |
//! | engine | `consumer/`, in rooms from the top down: `retrying_consumer.rs` (run, workers) · `poll/` (the poll thread: loop, callbacks, flow control, rebalances and resets, commits, startup, shutdown) · `observe/` (monitor, statistics) · `work/` (a record's life: worker, retry-tier steps, outcomes) · `schedule/` (the shared state: scheduler, watermarks, hub, health) · `dedup/` (dedup keys and positions, claims fetched ahead, batched store calls, leases) · `breaker/` (outage breaker) · `stop.rs`; each room's module docs say what it owns and what it may call | the consumer at work |
//! | parts | `handler.rs`, `codec.rs`, `retry.rs`, `idempotency/`, `dead_letter/` (`headers.rs` is the header format), `tiers/` (retry tiers: `runtime.rs` forwarding, `ledger.rs` / `redis.rs` key order), `producer.rs`, `publisher.rs`, `topics.rs`, `metrics.rs` | what the engine plugs together |
//! | bottom | `error.rs`, `record.rs` (records and headers, read from librdkafka), `message.rs`, `trace_context.rs`, `topic_name.rs` | data types every layer uses |
//!
//! ## Observability
//!
//! **Metrics** go through the [`metrics`](https://docs.rs/metrics/0.24) facade
//! ([`mod@metrics`] has the details); install the exporter you want before the consumer
//! runs (the `mail_notifier` example serves them to Prometheus with `--metrics-addr`).
//! Every metric carries the consumer `group`:
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `kourier_records_consumed_total` | counter | `topic` | records received from Kafka |
//! | `kourier_records_handled_total` | counter | `topic` | records whose handler succeeded |
//! | `kourier_records_retried_total` | counter | `topic`, `attempt` | transient failures retried, by failed attempt (`1`…`9`, `10+`) |
//! | `kourier_records_dead_lettered_total` | counter | `topic`, `kind` | dead letters written: `decode`, `permanent`, `retries-exhausted`, `panic` |
//! | `kourier_duplicates_skipped_total` | counter | `topic` | records skipped as already done |
//! | `kourier_idempotency_store_errors_total` | counter | `topic`, `operation` | failed store calls: `claim`, `complete`, `release`, `renew` |
//! | `kourier_dead_letter_write_failures_total` | counter | `topic` | failed dead-letter writes (retried) |
//! | `kourier_handler_duration_seconds` | histogram | `topic` | each handler attempt |
//! | `kourier_commit_duration_seconds` | histogram | | each synchronous offset commit |
//! | `kourier_commit_failures_total` | counter | | failed offset commits |
//! | `kourier_records_in_flight` | gauge | | records being handled |
//! | `kourier_consumer_lag` | gauge | `topic`, `partition` | end offset − committed offset of each assigned partition (from librdkafka's statistics) |
//! | `kourier_partition_paused` | gauge | `topic`, `partition` | `1` while flow control pauses the partition |
//! | `kourier_handler_panics_total` | counter | `topic` | panics caught on records' paths (handler, codec, dedup-key function, outcome observer) |
//! | `kourier_records_stalled_total` | counter | `topic` | records in flight longer than the stall threshold, once each |
//! | `kourier_records_abandoned_total` | counter | `topic` | records given up unsettled at a revoke or shutdown |
//! | `kourier_records_forwarded_total` | counter | `topic`, `tier` | records forwarded to a retry tier |
//! | `kourier_forward_failures_total` | counter | `topic` | failed forwards to a retry tier (retried) |
//! | `kourier_connection_state` | gauge | | `1` while the cluster answers, `0` while it does not |
//! | `kourier_breaker_state` | gauge | | the outage breaker: `0` closed, `1` open, `2` half-open |
//! | `kourier_breaker_transitions_total` | counter | `state` | breaker transitions by the state entered (`open`, `half-open`, `closed`) |
//! | `kourier_breaker_held_failures_total` | counter | | failed calls the open breaker absorbed (no attempt used, nothing dead-lettered) |
//! | `kourier_destinations_open` | gauge | | destinations whose breaker is open or half-open now (with `destinations`) |
//! | `kourier_destination_transitions_total` | counter | `state` | destination breaker transitions by the state entered (`open`, `half-open`, `closed`; no destination label: the snapshot names the top ones) |
//! | `kourier_destinations_untracked_total` | counter | | failures or admissions of destinations that could not be tracked (the cap was reached): not isolated |
//!
//! A queue-mode consumer (feature `queue`) records a subset of these under the same names
//! and labels: no lag, paused-partition, commit, connection, stall, retry-tier or
//! destination metrics (the `kourier::queue` module docs list them).
//!
//! Per record, [`RetryingConsumerBuilder::on_outcome`] calls an observer with the record and
//! its [`RecordOutcome`] (handled, duplicate, dead-lettered with its kind, forwarded to a
//! retry tier, abandoned, left for later), so an
//! application or a test learns what became of each record without wrapping the sink.
//!
//! [`ConsumerMonitor::snapshot`] gives the same outcome counts in-process (`handled`,
//! `retried`, `dead_lettered` by kind, `duplicates`, `forwarded` by tier, `abandoned`, and
//! `panics`, `stalled`) next to the in-flight and buffer figures; records left for later are
//! in the [`ShutdownReport`].
//!
//! **Tracing**: each record runs in a `kourier.record` span (target
//! `kourier::consumer::work::worker`) with `topic`, `partition`, `offset`, `key`, `attempt`,
//! `outcome` (`handled`, `duplicate`, `dead-lettered`, `forwarded`, `abandoned` or
//! `left-for-later`) and `trace_id`; log
//! lines carry the record's `topic/partition@offset`. librdkafka's own logs arrive under the
//! target `librdkafka`.
//!
//! **Trace context**: a W3C `traceparent` / `tracestate` header travels with the record
//! untouched — to the handler ([`Message::trace_context`]), into the dead letter, and through
//! a redrive — and the record span records its trace id. With the `opentelemetry` feature the
//! [`Publisher`] writes the current span's context into records that have none, and the
//! record span becomes a child of the record's context, so publish → handle → dead letter is
//! one trace. See [`TraceContext`].
//!
//! **Health endpoints**: with the `health` feature, `kourier::health` serves liveness and
//! readiness probes, the snapshot as JSON and the Prometheus metrics over HTTP, mounted in
//! the application's axum router or on their own port; they read the snapshot's
//! [`RunState`] (starting, running, stopping, stopped, failed) and how long ago the poll loop
//! last went round ([`ConsumerSnapshot::since_last_poll`]).
//!
//! ## Dead letters: inspect and redrive
//!
//! [`dead_letter::Provenance`] reads a dead letter's headers back (original topic, partition
//! and offset, failure kind, error, attempts, failure times, redrive count);
//! [`dead_letter::RedriveRecord`] rebuilds the original record to publish it again.
//! [`dead_letter::DeadLetterTopic`] reads the letters a [`dead_letter::LetterSelector`]
//! selects (by place in the dead-letter topic, header value such as an event id, key, kind,
//! time) and redrives them: stateless by default, the report listing each letter republished
//! with its place and where it landed; resumable with a consumer group tied to the selection;
//! a letter whose destination does not exist refused with the reason while the others go on.
//! The `kourier-dlt` command-line tool is built on it (`cargo install kourier --features
//! cli`): `inspect <dlt-topic>` lists letters as a table or JSON lines, filtered, or grouped
//! by event (`--group-by`); `redrive <dlt-topic>` re-publishes a selection.
//!
//! ## Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `testing` | off | `kourier::idempotency::testing`: a conformance suite that checks an `IdempotencyStore` implementation against the documented contract, for store implementers' tests, and `HookedStore`, a store with faults, delays or counters added, for handler and consumer tests |
//! | `cli` | off | the `kourier-dlt` binary (inspect and redrive dead-letter topics; `cargo install kourier --features cli`); no library API, pulls `clap`, `humantime`, `anyhow` and `tracing-subscriber` |
//! | `console` | off | `kourier-dlt console` (implies `cli`): one web page with consumers' status (from their health routes' JSON), a dead-letter browser with the redrive filters, a letter's headers and value, and redrive after a confirmation; no library API, pulls `axum`, `maud`, `form_urlencoded` and `reqwest` |
//! | `redis` | **on** | `RedisIdempotencyStore` and the `kourier::redis` re-export (`redis` 1.x with Tokio). Turn it off (`default-features = false`) when you use [`InMemoryIdempotencyStore`] or your own [`IdempotencyStore`]: kourier then has no Redis dependency. |
//! | `health` | off | `kourier::health`: liveness (`/livez`), readiness (`/readyz`), a JSON status (`/status`) and the Prometheus metrics (`/metrics`) of a running consumer, as an `axum` 0.8 `Router` to mount in your server or served on their own (`kourier::health::serve`) |
//! | `queue` | off | **experimental**: `kourier::queue`, a `QueueConsumer` running the same handler over a Kafka share group (KIP-932), through the pure-Rust client `krafka` 0.28; needs Rust 1.95 |
//! | `opentelemetry` | off | trace context to and from OpenTelemetry (`opentelemetry` 0.33 API crate and `tracing-opentelemetry` 0.34): publishers inject the current span's context, record spans are parented on the record's context. The application installs the SDK, exporter and `tracing-opentelemetry` layer. |
//!
//! kourier's own micro-benchmarks and fuzz targets reach crate-private parts through
//! `--cfg kourier_bench` (`RUSTFLAGS="--cfg kourier_bench" cargo bench --bench micro`), not
//! a feature: it is no API, has no semver promise, and a dependent cannot turn it on through
//! Cargo features.
//!
//! ## Why not `backoff`
//!
//! The design card named the `backoff` crate; it is unmaintained (RUSTSEC-2025-0012) and pulls
//! `instant` (RUSTSEC-2024-0384). kourier's [`RetryPolicy`] is its own small public type the
//! consumer drives (so it can be tested with paused time and keeps third-party types out of
//! the API); the Redis store's few bounded infrastructure retries are a short loop of its own.
//!
//! ## Where things are
//!
//! Each public item has one path. What a consumer or publisher needs is at the crate root
//! (`kourier::{Handler, RetryingConsumer, DeadLetterSink, IdempotencyStore, ...}`). Five areas
//! have a public module for what only some users need: [`dead_letter`] (header names,
//! reading letters back, redrive), [`idempotency`] (the store contract, the one-by-one batch
//! helpers, and for tests the conformance suite and a store with hooks), [`mod@metrics`] (metric names and counts) and [`topics`] (checking and creating
//! topics, key partitioning), and [`batch`] (handlers that take many records in one call);
//! with the `health` feature, `kourier::health` (the health routes) is a sixth. [`rdkafka`] and [`async_trait`](macro@async_trait) are re-exported so that an
//! application names the same versions kourier uses.
//!
//! ## Minimum supported Rust version
//!
//! Rust 1.88 (`rust-version` in Cargo.toml), set by the `redis` 1.x dependency. The
//! experimental `queue` feature needs Rust 1.95 (its client, `krafka` 0.28).

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use async_trait::async_trait;
pub use rdkafka;
/// The `redis` crate kourier's [`RedisIdempotencyStore`] is built on, so a
/// [`redis::Client`] you pass to it is of the same version (feature `redis`).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis;

pub mod batch;
mod blocking;
mod clock;
mod codec;
mod consumer;
pub mod dead_letter;
mod error;
mod guard;
mod handler;
#[cfg(feature = "health")]
#[cfg_attr(docsrs, doc(cfg(feature = "health")))]
pub mod health;
pub mod idempotency;
mod log_throttle;
mod message;
pub mod metrics;
mod producer;
mod publisher;
#[cfg(feature = "queue")]
#[cfg_attr(docsrs, doc(cfg(feature = "queue")))]
pub mod queue;
mod record;
mod retry;
pub mod tiers;
mod topic_name;
pub mod topics;
mod trace_context;
pub mod transactional;

pub use crate::blocking::{Blocking, BlockingHandler, blocking};
pub use crate::codec::{BytesCodec, Codec, CodecFn, DecodeError, JsonCodec, codec_fn};
// Not an API: kourier's own benches and fuzz targets, built with `--cfg kourier_bench`.
#[cfg(kourier_bench)]
#[doc(hidden)]
pub use crate::consumer::bench_support as __bench;
pub use crate::consumer::{
    BreakerPolicy, BreakerState, BreakerStatus, BreakerTransition, CommitMetadata, ConnectionState,
    ConsumerMonitor, ConsumerSnapshot, DedupKey, DestinationStatus, Destinations,
    DestinationsStatus, GoneRecords, Idempotency, MissingTopics, PanicPolicy, PartitionStatus,
    ProcessingOrder, RecordOutcome, RetryingConsumer, RetryingConsumerBuilder, RunState,
    ShutdownReport, StoreOutage, shutdown_signal,
};
pub use crate::dead_letter::kafka::{KafkaDeadLetterSink, KafkaDeadLetterSinkBuilder};
pub use crate::dead_letter::letter::{
    DeadLetter, DeadLetterReason, DeadLetterReceipt, DeadLetterSink, PendingLetter,
};
pub use crate::error::{
    BoxError, ConfigError, DeadLetterError, Error, PollThreadError, Result, StoreError,
};
pub use crate::handler::{FailureKind, Handler, HandlerError, HandlerFn, handler_fn};
pub use crate::idempotency::memory::InMemoryIdempotencyStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::idempotency::redis::{RedisIdempotencyStore, RedisIdempotencyStoreBuilder};
pub use crate::idempotency::store::{Claim, ClaimToken, IdempotencyStore};
pub use crate::log_throttle::ThrottledLogContext;
pub use crate::message::Message;
pub use crate::producer::Delivery;
pub use crate::publisher::{Publisher, PublisherBuilder};
pub use crate::record::{Header, Headers, RawRecord, RawRecordBuilder, RecordBytes};
pub use crate::retry::{RetryDecision, RetryPolicy};
pub use crate::trace_context::TraceContext;
