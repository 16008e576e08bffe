//! The destination scenarios: 1,000 destinations (the record key), a breaker per destination
//! and the consumer-wide breaker, records sent at a fixed rate. dest-up: none down; dest-down:
//! 20 down from the end of the warm-up to the end of the run; dest-all-down: every one down
//! for 3 s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kourier::tiers::{InMemoryKeyOrderLedger, RetryTiers};
use kourier::{
    BreakerPolicy, BreakerState, ConsumerMonitor, ConsumerSnapshot, Destinations, HandlerError,
    MissingTopics, ProcessingOrder, async_trait,
};

use crate::args::{Args, ChildArgs};
use crate::consumers::{
    Behaviour, BenchHandler, Deliver, Progress, Running, kourier_builder, runtime,
};
use crate::drain::check_committed;
use crate::latency::{Keys, paced_producer};
use crate::measure::{
    DestinationsOutcome, LatencyRecorder, Outcome, epoch_micros, peak_rss_kib, process_cpu_secs,
};
use crate::scenario::Scenario;
use crate::services::log_end;
use crate::{
    BoxResult, DELIVERY, DEST_OPEN, DESTINATIONS, DOWN_EVERY, OUTAGE, OUTAGE_MAX_SECS, PARTITIONS,
};

/// How long the scenario waits for records after the last send, and again after the
/// destinations come back, before it calls them lost.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether dest-down takes `dest-{index}` down (20 of 1,000).
pub(crate) fn down_in_dest_down(index: u64) -> bool {
    index.is_multiple_of(DOWN_EVERY)
}

/// The simulated destinations: which are down, and what the handler did.
#[derive(Debug)]
pub(crate) struct Endpoints {
    scenario: Scenario,
    /// Latency of the destinations dest-down keeps up, at the entry of the call that
    /// delivers (the same records in every scenario).
    recorder: Arc<LatencyRecorder>,
    /// dest-down: the destinations are down from the end of the warm-up, or from the start.
    down_at_start: bool,
    /// dest-down: when the destinations that are down come back (µs since the epoch).
    back_at_us: AtomicU64,
    /// Successful deliveries per record id.
    delivered: Vec<AtomicU8>,
    /// Records delivered at least once: all, and of the destinations dest-down keeps up.
    delivered_records: AtomicU64,
    delivered_up: AtomicU64,
    duplicates: AtomicU64,
    /// Calls to a destination that was down, and the first one (µs since the epoch).
    calls_down: AtomicU64,
    first_down_call_us: AtomicU64,
}

impl Endpoints {
    fn new(
        scenario: Scenario,
        recorder: Arc<LatencyRecorder>,
        down_at_start: bool,
        records: u64,
    ) -> Self {
        Endpoints {
            scenario,
            recorder,
            down_at_start,
            back_at_us: AtomicU64::new(u64::MAX),
            delivered: (0..records).map(|_| AtomicU8::new(0)).collect(),
            delivered_records: AtomicU64::new(0),
            delivered_up: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            calls_down: AtomicU64::new(0),
            first_down_call_us: AtomicU64::new(u64::MAX),
        }
    }

    /// The end of the warm-up (µs since the epoch; `u64::MAX` before the producer starts).
    fn measured_from_us(&self) -> u64 {
        self.recorder
            .measured_after_us
            .load(AtomicOrdering::Relaxed)
    }

    /// dest-all-down's outage, µs since the epoch: the first seconds of the measured phase.
    fn outage_us(&self) -> (u64, u64) {
        let from = self.measured_from_us();
        (from, from.saturating_add(OUTAGE.as_micros() as u64))
    }

    fn is_down(&self, index: u64, now_us: u64) -> bool {
        match self.scenario {
            Scenario::DestDown => {
                let from = if self.down_at_start {
                    0
                } else {
                    self.measured_from_us()
                };
                let until = self.back_at_us.load(AtomicOrdering::Relaxed);
                down_in_dest_down(index) && (from..until).contains(&now_us)
            }
            Scenario::DestAllDown => {
                let (from, until) = self.outage_us();
                (from..until).contains(&now_us)
            }
            _ => false,
        }
    }
}

#[async_trait]
impl Deliver for Endpoints {
    /// The handler's work for record `id`, sent at `sent` (the header's text): refused at
    /// once when its destination is down, else a short sleep (the delivery).
    async fn deliver(
        &self,
        id: u64,
        _attempt: u32,
        sent: Option<&[u8]>,
    ) -> Result<(), HandlerError> {
        let entry_us = epoch_micros();
        let index = id % DESTINATIONS;
        if self.is_down(index, entry_us) {
            self.calls_down.fetch_add(1, AtomicOrdering::Relaxed);
            self.first_down_call_us
                .fetch_min(entry_us, AtomicOrdering::Relaxed);
            return Err(HandlerError::unavailable("connection refused"));
        }
        tokio::time::sleep(DELIVERY).await;
        let Some(count) = self.delivered.get(id as usize) else {
            return Ok(());
        };
        if count.fetch_add(1, AtomicOrdering::Relaxed) > 0 {
            self.duplicates.fetch_add(1, AtomicOrdering::Relaxed);
            return Ok(());
        }
        self.delivered_records.fetch_add(1, AtomicOrdering::Relaxed);
        if !down_in_dest_down(index) {
            self.recorder.record(sent, entry_us);
            self.delivered_up.fetch_add(1, AtomicOrdering::Relaxed);
        }
        Ok(())
    }
}

/// The most seen at once, from snapshots every 100 ms.
#[derive(Debug, Default)]
struct Peaks {
    /// Destinations open or half-open.
    open: AtomicUsize,
    /// Partitions paused by flow control.
    paused: AtomicUsize,
    /// A partition's lag behind its commit point (end offset − committed).
    lag: AtomicU64,
}

impl Peaks {
    fn sample(&self, s: &ConsumerSnapshot) {
        let open = s.destinations.as_ref().map_or(0, |d| d.open);
        self.open.fetch_max(open, AtomicOrdering::Relaxed);
        self.paused
            .fetch_max(s.paused.len(), AtomicOrdering::Relaxed);
        let lag = s.partitions.iter().filter_map(|p| p.lag).max().unwrap_or(0);
        self.lag
            .fetch_max(lag.max(0) as u64, AtomicOrdering::Relaxed);
    }
}

/// What a snapshot says about a scenario that got stuck.
pub(crate) fn state(s: &ConsumerSnapshot) -> String {
    format!(
        "in flight {} (waiting {}), buffered {}, paused partitions {}, consumer-wide breaker {}, \
         destinations open {}",
        s.in_flight,
        s.waiting_retry,
        s.buffered_records,
        s.paused.len(),
        s.breaker.as_ref().map_or("none".into(), |b| format!(
            "{} (opened {}×)",
            b.state, b.opened
        )),
        s.destinations.as_ref().map_or(0, |d| d.open)
    )
}

/// Waits (on this thread) until `done`, or fails after [`SETTLE_TIMEOUT`] saying `what` and
/// the consumer's state.
pub(crate) fn wait_for(
    monitor: &ConsumerMonitor,
    what: impl Fn() -> String,
    done: impl Fn() -> bool,
) -> BoxResult<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!(
                "{} after {SETTLE_TIMEOUT:?}; {}",
                what(),
                state(&monitor.snapshot())
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Runs `consumer` (inside the runtime `rt` entered) and samples its snapshot every 100 ms
/// into `sample` (the scenario's peaks).
pub(crate) fn run_sampled(
    rt: &tokio::runtime::Runtime,
    consumer: kourier::RetryingConsumer<BenchHandler>,
    sample: impl Fn(&ConsumerSnapshot) + Send + 'static,
) -> Running {
    let _guard = rt.enter();
    let running = Running::spawn(consumer);
    let monitor = running.monitor.clone();
    rt.spawn(async move {
        loop {
            sample(&monitor.snapshot());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    running
}

/// Waits until every partition is assigned.
pub(crate) fn wait_assigned(monitor: &ConsumerMonitor) -> BoxResult<()> {
    wait_for(
        monitor,
        || "no partitions assigned".into(),
        // Those of the source topic (with --park the retry tier's are assigned too).
        || {
            let assigned = monitor.snapshot().assigned;
            let source = assigned.iter().filter(|(t, _)| !t.contains(".retry."));
            source.count() == PARTITIONS as usize
        },
    )
}

/// Waits until `delivered()` reaches `total` (else records were lost).
pub(crate) fn wait_delivered(
    monitor: &ConsumerMonitor,
    delivered: impl Fn() -> u64,
    total: u64,
) -> BoxResult<()> {
    wait_for(
        monitor,
        || format!("{} of {total} records delivered: records lost", delivered()),
        || delivered() >= total,
    )
}

/// Waits until nothing is in flight or buffered.
pub(crate) fn wait_idle(monitor: &ConsumerMonitor) -> BoxResult<()> {
    wait_for(
        monitor,
        || "records still in flight or buffered".into(),
        || {
            let s = monitor.snapshot();
            s.in_flight == 0 && s.buffered_records == 0
        },
    )
}

/// After a run: the consumer stopped (either way: a consumer dropped with its runtime
/// reports its tasks as lost), its offsets committed to the end, and no dead letter in the
/// topic nor acknowledged by the sink (`acknowledged`, read from the run's result).
pub(crate) fn stop_and_check<M>(
    rt: &tokio::runtime::Runtime,
    running: Running,
    measured: BoxResult<M>,
    acknowledged: impl Fn(&M) -> u64,
    (group, topic, total): (&str, &str, u64),
) -> BoxResult<M> {
    let stopped = rt.block_on(running.stop());
    let m = measured?;
    stopped?;
    check_committed(group, topic, PARTITIONS, total)?;
    let dlt = format!("{topic}.dlt");
    let dead_letters = log_end(&dlt, PARTITIONS)?;
    if dead_letters > 0 || acknowledged(&m) > 0 {
        return Err(format!(
            "{dead_letters} dead letters in {dlt} ({} acknowledged by the sink): none may be",
            acknowledged(&m)
        )
        .into());
    }
    Ok(m)
}

/// µs since the epoch.
fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the run measured before the consumer stops.
struct Measured {
    total: u64,
    send_rate: f64,
    max_lag_us: u64,
    first: Instant,
    up_done: Instant,
    cpu_secs: f64,
    rss_kib: u64,
    /// When the destinations that were down came back (µs since the epoch).
    back_us: u64,
    recovered_secs: f64,
    calls_down: u64,
    first_down_us: u64,
    /// The snapshot when every record of the destinations that stayed up was delivered.
    at_up_done: ConsumerSnapshot,
    /// The last one.
    end: ConsumerSnapshot,
}

/// dest-up, dest-down and dest-all-down.
pub(crate) fn destinations(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let scenario = child.scenario;
    let rate = args.latency_rate;
    let warmup = Duration::from_secs(if args.quick { 1 } else { 5 });
    let secs = Duration::from_secs(match scenario {
        Scenario::DestAllDown => args.latency_secs.min(OUTAGE_MAX_SECS),
        _ => args.latency_secs,
    });
    let total = rate * (warmup + secs).as_secs();
    let recorder = Arc::new(LatencyRecorder::new());
    let acks = Arc::new(LatencyRecorder::new());
    let endpoints = Arc::new(Endpoints::new(
        scenario,
        recorder.clone(),
        args.dest_down_at_start,
        total,
    ));
    let progress = Arc::new(Progress::default());
    let peaks = Arc::new(Peaks::default());
    let cpu0 = process_cpu_secs();
    let created = Instant::now();

    let rt = runtime()?;
    let running = {
        let handler = BenchHandler {
            progress: progress.clone(),
            behaviour: Behaviour::Deliver(endpoints.clone()),
        };
        // Records waiting for their destination in place hold their partition's commit
        // point: unless told otherwise (or parking them), allow the whole run past it.
        let uncommitted = args.uncommitted_per_partition.unwrap_or(if args.park {
            10_000
        } else {
            total.max(10_000)
        });
        let mut builder = kourier_builder(args, handler, group, &child.topic)
            .ordering(ProcessingOrder::Key)
            .destinations(Destinations::by_key().with_open_interval(DEST_OPEN, DEST_OPEN))
            .breaker(BreakerPolicy::default())
            .max_uncommitted_per_partition(uncommitted as usize);
        if args.park {
            builder = builder
                .retry_tiers(
                    RetryTiers::new([Duration::from_secs(1)])
                        .with_key_order(Arc::new(InMemoryKeyOrderLedger::new())),
                )
                .missing_topics(MissingTopics::create(PARTITIONS as u16));
        }
        let consumer = builder.build()?;
        let peaks = peaks.clone();
        run_sampled(&rt, consumer, move |s| peaks.sample(s))
    };

    let run = || -> BoxResult<Measured> {
        let monitor = &running.monitor;
        wait_assigned(monitor)?;
        let (sent, send_rate, max_lag_us) = paced_producer(
            &child.topic,
            rate,
            warmup,
            secs,
            args.size,
            Keys::Destinations(DESTINATIONS),
            &[&recorder],
            &acks,
        )
        .map_err(|e| format!("destinations producer: {e}"))?;
        debug_assert_eq!(sent, total);

        // Every record of the destinations dest-down keeps up, while the others are down.
        let total_up = (0..total)
            .filter(|id| !down_in_dest_down(id % DESTINATIONS))
            .count() as u64;
        let delivered_up = || endpoints.delivered_up.load(AtomicOrdering::Relaxed);
        wait_for(
            monitor,
            || {
                format!(
                    "{} of {total_up} records of the destinations that stay up delivered",
                    delivered_up()
                )
            },
            || delivered_up() >= total_up,
        )?;
        let up_done = Instant::now();
        let cpu_secs = process_cpu_secs() - cpu0;
        let rss_kib = peak_rss_kib();
        let at_up_done = monitor.snapshot();
        if args.park {
            eprintln!(
                "{}: parked {} times, forwarded {:?}, paused partitions {:?} when the others were delivered",
                scenario.name(),
                at_up_done.destinations.as_ref().map_or(0, |d| d.parked),
                at_up_done.forwarded,
                at_up_done.paused,
            );
        }
        let calls_down = endpoints.calls_down.load(AtomicOrdering::Relaxed);
        let first_down_us = endpoints.first_down_call_us.load(AtomicOrdering::Relaxed);

        // The destinations come back (dest-all-down's already have); each of their records
        // must follow.
        let back_us = match scenario {
            Scenario::DestAllDown => endpoints.outage_us().1,
            _ => epoch_micros(),
        };
        endpoints.back_at_us.store(back_us, AtomicOrdering::Relaxed);
        let delivered = || endpoints.delivered_records.load(AtomicOrdering::Relaxed);
        wait_delivered(monitor, delivered, total)?;
        let recovered_secs = epoch_micros().saturating_sub(back_us) as f64 / 1e6;
        wait_idle(monitor)?;
        Ok(Measured {
            total,
            send_rate,
            max_lag_us,
            first: progress.first.get().copied().unwrap_or(up_done),
            up_done,
            cpu_secs,
            rss_kib,
            back_us,
            recovered_secs,
            calls_down,
            first_down_us,
            at_up_done,
            end: monitor.snapshot(),
        })
    };
    let measured = run();
    let acknowledged = |m: &Measured| m.end.dead_lettered.total();
    let m = stop_and_check(
        &rt,
        running,
        measured,
        acknowledged,
        (group, &child.topic, total),
    )?;
    if args.timeline {
        recorder.print_timeline(scenario.name());
    }
    let breaker = m
        .at_up_done
        .breaker
        .clone()
        .ok_or("no consumer-wide breaker in the snapshot")?;
    if scenario == Scenario::DestAllDown && breaker.opened == 0 {
        return Err(format!(
            "every destination was down for {OUTAGE:?} and the consumer-wide breaker never \
             opened ({} calls to them)",
            m.calls_down
        )
        .into());
    }
    // The consumer-wide breaker's first opening and last closing, from the moment the
    // destinations went down.
    let down_from = match scenario {
        Scenario::DestAllDown => endpoints.outage_us().0,
        Scenario::DestDown if args.dest_down_at_start => {
            recorder.start_us.load(AtomicOrdering::Relaxed)
        }
        _ => endpoints.measured_from_us(),
    };
    let transitions = m.end.breaker.map(|b| b.recent).unwrap_or_default();
    let after_down =
        |t: &kourier::BreakerTransition| micros(t.at).saturating_sub(down_from) as f64 / 1e6;
    let opened_after_secs = transitions
        .iter()
        .find(|t| t.to == BreakerState::Open)
        .map(after_down);
    let closed_after_secs = transitions
        .iter()
        .rev()
        .find(|t| t.to == BreakerState::Closed)
        .map(after_down);
    let down = match scenario {
        Scenario::DestDown => (0..DESTINATIONS).filter(|&i| down_in_dest_down(i)).count() as u64,
        Scenario::DestAllDown => DESTINATIONS,
        _ => 0,
    };
    Ok(Outcome {
        records: m.total,
        payload_bytes: m.total * args.size as u64,
        secs: (m.up_done - m.first).as_secs_f64(),
        join_secs: (m.first - created).as_secs_f64(),
        cpu_secs: m.cpu_secs,
        peak_rss_kib: m.rss_kib,
        latency: Some(recorder.outcome(&acks, rate, m.send_rate, m.max_lag_us)),
        destinations: Some(DestinationsOutcome {
            down,
            calls_down: m.calls_down,
            down_secs: if m.calls_down == 0 {
                0.0
            } else {
                m.back_us.saturating_sub(m.first_down_us) as f64 / 1e6
            },
            open_max: peaks.open.load(AtomicOrdering::Relaxed),
            paused_max: peaks.paused.load(AtomicOrdering::Relaxed),
            lag_max: peaks.lag.load(AtomicOrdering::Relaxed),
            breaker_opened: breaker.opened,
            breaker_state: breaker.state.to_string(),
            breaker_held: breaker.held_failures,
            breaker_opened_after_secs: opened_after_secs,
            breaker_closed_after_secs: closed_after_secs,
            recovered_secs: m.recovered_secs,
            duplicates: endpoints.duplicates.load(AtomicOrdering::Relaxed),
        }),
        ..Outcome::default()
    })
}
