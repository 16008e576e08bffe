//! The hot-destination scenarios: half the records go to one destination whose deliveries are
//! slow, the other half spread over 500 fast ones, sent at a fixed rate; a key per record, the
//! destination in a header, `ProcessingOrder::Unordered`, so that the hot destination spans
//! every lane. dest-hot: no cap per destination; dest-hot-capped: at most 8 calls to one
//! destination at once; dest-hot-retry: capped, with the first attempt of 10 % of the other
//! destinations' records failing transiently.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use kourier::{
    ConsumerSnapshot, Destinations, HandlerError, ProcessingOrder, RetryPolicy, async_trait,
};

use crate::args::{Args, ChildArgs};
use crate::consumers::{Behaviour, BenchHandler, Deliver, Progress, kourier_builder, runtime};
use crate::destinations::{
    run_sampled, stop_and_check, wait_assigned, wait_delivered, wait_for, wait_idle,
};
use crate::latency::{Keys, paced_producer};
use crate::measure::{
    HotOutcome, LatencyRecorder, Outcome, epoch_micros, peak_rss_kib, process_cpu_secs,
};
use crate::scenario::Scenario;
use crate::{
    BoxResult, DEFAULT_MAX_IN_FLIGHT, DELIVERY, DEST_HEADER, HOT_CAP, HOT_DELIVERY, HOT_EVERY,
    HOT_MAX_SECS, HOT_NAME, HOT_OTHERS, HOT_RETRY_BACKOFF, HOT_RETRY_EVERY,
};

/// Whether record `id` goes to the hot destination (half of them).
pub(crate) fn is_hot(id: u64) -> bool {
    id.is_multiple_of(HOT_EVERY)
}

/// Record `id`'s destination, sent in header [`DEST_HEADER`]: `hot`, or one of 500 others.
fn destination_of(id: u64) -> String {
    if is_hot(id) {
        HOT_NAME.to_owned()
    } else {
        format!("dest-{}", (id / HOT_EVERY) % HOT_OTHERS)
    }
}

/// Whether dest-hot-retry fails the first attempt of record `id`: one in
/// [`HOT_RETRY_EVERY`] of the other destinations' records, picked by a hash of the id.
fn fails_first(id: u64) -> bool {
    !is_hot(id) && (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40).is_multiple_of(HOT_RETRY_EVERY)
}

/// The simulated destinations, and what the handler did.
#[derive(Debug)]
pub(crate) struct HotEndpoints {
    /// dest-hot-retry: fail the first attempt of the records [`fails_first`] picks.
    fail_first: bool,
    /// Latency (send → entry of the call that delivers): the other destinations' records
    /// delivered at their first attempt, the hot destination's, and the other destinations'
    /// delivered by a retry.
    others: Arc<LatencyRecorder>,
    hot: Arc<LatencyRecorder>,
    retried: Arc<LatencyRecorder>,
    /// The measured phase's length (it starts at the end of the warm-up), µs.
    measured_us: u64,
    /// From then on (µs since the epoch) the hot destination answers as fast as the others.
    fast_from_us: AtomicU64,
    /// Successful deliveries per record id.
    delivered: Vec<AtomicU8>,
    /// Records delivered at least once: all, and of the other destinations.
    delivered_records: AtomicU64,
    delivered_others: AtomicU64,
    duplicates: AtomicU64,
    failed_first: AtomicU64,
    /// Calls to the hot destination running now, and the most at once.
    hot_running: AtomicU64,
    hot_at_once: AtomicU64,
    /// Calls that delivered, started within the measured phase: the other destinations' and
    /// the hot one's.
    others_in_phase: AtomicU64,
    hot_in_phase: AtomicU64,
}

impl HotEndpoints {
    fn new(fail_first: bool, measured: Duration, records: u64) -> Self {
        HotEndpoints {
            fail_first,
            others: Arc::new(LatencyRecorder::new()),
            hot: Arc::new(LatencyRecorder::new()),
            retried: Arc::new(LatencyRecorder::new()),
            measured_us: measured.as_micros() as u64,
            fast_from_us: AtomicU64::new(u64::MAX),
            delivered: (0..records).map(|_| AtomicU8::new(0)).collect(),
            delivered_records: AtomicU64::new(0),
            delivered_others: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            failed_first: AtomicU64::new(0),
            hot_running: AtomicU64::new(0),
            hot_at_once: AtomicU64::new(0),
            others_in_phase: AtomicU64::new(0),
            hot_in_phase: AtomicU64::new(0),
        }
    }

    /// Whether a call that started at `entry_us` started within the measured phase.
    fn in_phase(&self, entry_us: u64) -> bool {
        let from = self.others.measured_after_us.load(AtomicOrdering::Relaxed);
        from != u64::MAX && (from..from + self.measured_us).contains(&entry_us)
    }
}

#[async_trait]
impl Deliver for HotEndpoints {
    /// The handler's work for record `id`: a slow sleep for the hot destination (counted
    /// while it runs), a short one for the others, whose first attempt may fail at once.
    async fn deliver(
        &self,
        id: u64,
        attempt: u32,
        sent: Option<&[u8]>,
    ) -> Result<(), HandlerError> {
        let entry_us = epoch_micros();
        let hot = is_hot(id);
        if hot {
            let running = self.hot_running.fetch_add(1, AtomicOrdering::Relaxed) + 1;
            self.hot_at_once.fetch_max(running, AtomicOrdering::Relaxed);
            let slow = entry_us < self.fast_from_us.load(AtomicOrdering::Relaxed);
            tokio::time::sleep(if slow { HOT_DELIVERY } else { DELIVERY }).await;
            self.hot_running.fetch_sub(1, AtomicOrdering::Relaxed);
        } else {
            if self.fail_first && attempt == 1 && fails_first(id) {
                self.failed_first.fetch_add(1, AtomicOrdering::Relaxed);
                return Err(HandlerError::transient("benchmark: transient failure"));
            }
            tokio::time::sleep(DELIVERY).await;
        }
        let Some(count) = self.delivered.get(id as usize) else {
            return Ok(());
        };
        if count.fetch_add(1, AtomicOrdering::Relaxed) > 0 {
            self.duplicates.fetch_add(1, AtomicOrdering::Relaxed);
            return Ok(());
        }
        let in_phase = self.in_phase(entry_us);
        if hot {
            self.hot.record(sent, entry_us);
            if in_phase {
                self.hot_in_phase.fetch_add(1, AtomicOrdering::Relaxed);
            }
        } else {
            let recorder = if attempt == 1 {
                &self.others
            } else {
                &self.retried
            };
            recorder.record(sent, entry_us);
            if in_phase {
                self.others_in_phase.fetch_add(1, AtomicOrdering::Relaxed);
            }
            self.delivered_others.fetch_add(1, AtomicOrdering::Relaxed);
        }
        self.delivered_records.fetch_add(1, AtomicOrdering::Relaxed);
        Ok(())
    }
}

/// The most seen at once, from snapshots every 100 ms.
#[derive(Debug, Default)]
struct Peaks {
    /// Slots taken: in flight, less the records waiting without one.
    running: AtomicUsize,
    /// Records waiting without a slot (for their destination's cap, or a retry back-off).
    waiting: AtomicUsize,
    paused: AtomicUsize,
    open: AtomicUsize,
}

impl Peaks {
    fn sample(&self, s: &ConsumerSnapshot) {
        let max = |peak: &AtomicUsize, v: usize| {
            peak.fetch_max(v, AtomicOrdering::Relaxed);
        };
        max(&self.running, s.in_flight.saturating_sub(s.waiting_retry));
        max(&self.waiting, s.waiting_retry);
        max(&self.paused, s.paused.len());
        max(&self.open, s.destinations.as_ref().map_or(0, |d| d.open));
    }
}

/// What the run measured before the consumer stops.
struct Measured {
    send_rate: f64,
    max_lag_us: u64,
    first: Instant,
    others_done: Instant,
    others_done_secs: f64,
    cpu_secs: f64,
    rss_kib: u64,
    drain_secs: f64,
    drain_cpu_secs: f64,
    dead_lettered: u64,
}

/// dest-hot, dest-hot-capped and dest-hot-retry.
pub(crate) fn hot(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let scenario = child.scenario;
    let rate = args.hot_rate;
    let warmup = Duration::from_secs(if args.quick { 1 } else { 5 });
    let secs = Duration::from_secs(args.latency_secs.min(HOT_MAX_SECS));
    let total = rate * (warmup + secs).as_secs();
    let cap = (scenario != Scenario::DestHot).then_some(HOT_CAP);
    let max_in_flight = args.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
    let endpoints = Arc::new(HotEndpoints::new(
        scenario == Scenario::DestHotRetry,
        secs,
        total,
    ));
    let acks = Arc::new(LatencyRecorder::new());
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
        let mut destinations = Destinations::header(DEST_HEADER);
        if let Some(n) = cap {
            destinations = destinations.with_max_in_flight(n);
        }
        // Records waiting for the hot destination hold their partition's commit point:
        // unless told otherwise, allow the whole run past it.
        let uncommitted = args.uncommitted_per_partition.unwrap_or(total.max(10_000));
        let mut builder = kourier_builder(args, handler, group, &child.topic)
            .ordering(ProcessingOrder::Unordered)
            .max_in_flight(max_in_flight as usize)
            .destinations(destinations)
            .max_uncommitted_per_partition(uncommitted as usize);
        if scenario == Scenario::DestHotRetry {
            builder = builder.retry_policy(RetryPolicy::fixed(HOT_RETRY_BACKOFF, 3));
        }
        let peaks = peaks.clone();
        run_sampled(&rt, builder.build()?, move |s| peaks.sample(s))
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
            Keys::PerRecord {
                destination: destination_of,
            },
            &[&endpoints.others, &endpoints.hot, &endpoints.retried],
            &acks,
        )
        .map_err(|e| format!("hot-destination producer: {e}"))?;
        debug_assert_eq!(sent, total);
        let last_send = Instant::now();

        // Every record of the other destinations, while the hot one is slow.
        let total_others = (0..total).filter(|&id| !is_hot(id)).count() as u64;
        let delivered_others = || endpoints.delivered_others.load(AtomicOrdering::Relaxed);
        wait_for(
            monitor,
            || {
                format!(
                    "{} of {total_others} records of the other destinations delivered",
                    delivered_others()
                )
            },
            || delivered_others() >= total_others,
        )?;
        let others_done = Instant::now();
        let cpu_secs = process_cpu_secs() - cpu0;
        let rss_kib = peak_rss_kib();

        // The hot destination answers at once from now on: its backlog drains.
        endpoints
            .fast_from_us
            .store(epoch_micros(), AtomicOrdering::Relaxed);
        let delivered = || endpoints.delivered_records.load(AtomicOrdering::Relaxed);
        wait_delivered(monitor, delivered, total)?;
        let drain_secs = others_done.elapsed().as_secs_f64();
        let drain_cpu_secs = process_cpu_secs() - cpu0 - cpu_secs;
        wait_idle(monitor)?;
        Ok(Measured {
            send_rate,
            max_lag_us,
            first: progress.first.get().copied().unwrap_or(others_done),
            others_done,
            others_done_secs: (others_done - last_send).as_secs_f64(),
            cpu_secs,
            rss_kib,
            drain_secs,
            drain_cpu_secs,
            dead_lettered: monitor.snapshot().dead_lettered.total(),
        })
    };
    let measured = run();
    let acknowledged = |m: &Measured| m.dead_lettered;
    let m = stop_and_check(
        &rt,
        running,
        measured,
        acknowledged,
        (group, &child.topic, total),
    )?;
    if args.timeline {
        endpoints
            .others
            .print_timeline(&format!("{}, other destinations", scenario.name()));
        endpoints
            .hot
            .print_timeline(&format!("{}, hot destination", scenario.name()));
    }

    let hot_at_once = endpoints.hot_at_once.load(AtomicOrdering::Relaxed);
    if let Some(n) = cap
        && hot_at_once > u64::from(n)
    {
        return Err(format!(
            "{hot_at_once} calls to the hot destination ran at once, above its cap of {n}"
        )
        .into());
    }
    let phase_secs = secs.as_secs_f64();
    let per_sec = |n: &AtomicU64| n.load(AtomicOrdering::Relaxed) as f64 / phase_secs;
    let (hot_h, retried_h) = (
        endpoints
            .hot
            .outcome(&acks, rate, m.send_rate, m.max_lag_us),
        endpoints
            .retried
            .outcome(&acks, rate, m.send_rate, m.max_lag_us),
    );
    let hot_offered = rate as f64 / HOT_EVERY as f64;
    Ok(Outcome {
        records: total,
        payload_bytes: total * args.size as u64,
        secs: (m.others_done - m.first).as_secs_f64(),
        join_secs: (m.first - created).as_secs_f64(),
        cpu_secs: m.cpu_secs,
        peak_rss_kib: m.rss_kib,
        latency: Some(
            endpoints
                .others
                .outcome(&acks, rate, m.send_rate, m.max_lag_us),
        ),
        hot: Some(HotOutcome {
            cap,
            max_in_flight,
            hot_at_once,
            others_offered: rate as f64 - hot_offered,
            hot_offered,
            others_rate: per_sec(&endpoints.others_in_phase),
            hot_rate: per_sec(&endpoints.hot_in_phase),
            hot_p50_us: hot_h.p50_us,
            hot_p99_us: hot_h.p99_us,
            retried_samples: retried_h.samples,
            retried_p50_us: retried_h.p50_us,
            retried_p99_us: retried_h.p99_us,
            failed_first: endpoints.failed_first.load(AtomicOrdering::Relaxed),
            others_done_secs: m.others_done_secs,
            drain_secs: m.drain_secs,
            drain_cpu_secs: m.drain_cpu_secs,
            running_max: peaks.running.load(AtomicOrdering::Relaxed),
            waiting_max: peaks.waiting.load(AtomicOrdering::Relaxed),
            paused_max: peaks.paused.load(AtomicOrdering::Relaxed),
            open_max: peaks.open.load(AtomicOrdering::Relaxed),
            duplicates: endpoints.duplicates.load(AtomicOrdering::Relaxed),
        }),
        ..Outcome::default()
    })
}
