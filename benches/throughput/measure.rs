//! Measuring a scenario: the process's CPU time and peak RSS, latencies in an HDR histogram,
//! and what a scenario reports to the parent (one JSON line on stdout).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// librdkafka's `/proc/<pid>/stat` ticks: USER_HZ, 100 on every mainstream Linux ABI.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// User+sys CPU seconds of this whole process (every thread, exited ones included).
pub(crate) fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start at "state" (field 3).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(utime), Some(stime)) => (utime + stime) as f64 / CLOCK_TICKS_PER_SEC,
        _ => f64::NAN,
    }
}

/// Peak resident set size of this process so far (`VmHWM`), KiB.
pub(crate) fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A drain's clock: the process CPU and the wall clock when its consumer was created.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DrainClock {
    pub(crate) created: Instant,
    cpu0: f64,
}

impl DrainClock {
    /// Call just before creating the consumer.
    pub(crate) fn start() -> Self {
        let cpu0 = process_cpu_secs();
        DrainClock {
            created: Instant::now(),
            cpu0,
        }
    }

    /// The outcome of a drain of `records` records of `size` value bytes, all settled at
    /// `end`: timed from `first` (the first record handed to user code; `end` if none came),
    /// with the process CPU and the peak RSS read now.
    pub(crate) fn stop(
        &self,
        records: u64,
        size: usize,
        first: Option<Instant>,
        end: Instant,
    ) -> Outcome {
        let cpu_secs = process_cpu_secs() - self.cpu0;
        let peak_rss_kib = peak_rss_kib();
        let first = first.unwrap_or(end);
        Outcome {
            records,
            payload_bytes: records * size as u64,
            secs: (end - first).as_secs_f64(),
            join_secs: (first - self.created).as_secs_f64(),
            cpu_secs,
            peak_rss_kib,
            ..Outcome::default()
        }
    }
}

pub(crate) fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// Records measured.
    pub(crate) records: u64,
    /// Value bytes of those records.
    pub(crate) payload_bytes: u64,
    /// First record handed to user code → all measured records settled.
    pub(crate) secs: f64,
    /// Consumer created → first record (group join, first fetch).
    pub(crate) join_secs: f64,
    /// Process user+sys CPU from consumer creation to the end of the measurement.
    pub(crate) cpu_secs: f64,
    /// `VmHWM` at the end of the measurement.
    pub(crate) peak_rss_kib: u64,
    /// Dead letters in `<topic>.dlt` afterwards (scenario d).
    pub(crate) dead_letters: u64,
    /// CPU seconds the Redis server used over the same span (scenario c; Redis's
    /// `INFO cpu`, user+sys): it runs on the same cores.
    #[serde(default)]
    pub(crate) store_cpu_secs: f64,
    pub(crate) latency: Option<LatencyOutcome>,
    /// The destination scenarios' own figures.
    #[serde(default)]
    pub(crate) destinations: Option<DestinationsOutcome>,
    /// The hot-destination scenarios' own figures.
    #[serde(default)]
    pub(crate) hot: Option<HotOutcome>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LatencyOutcome {
    pub(crate) samples: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    pub(crate) max_us: u64,
    pub(crate) offered_rate: u64,
    /// Records sent per second over the measured phase (the producer kept the schedule?).
    pub(crate) send_rate: f64,
    /// How far the producer fell behind its schedule at worst, µs.
    pub(crate) max_send_lag_us: u64,
    /// Send → broker acknowledgement (acks=1), measured phase: the broker's share.
    pub(crate) ack_p50_us: u64,
    pub(crate) ack_p99_us: u64,
}

/// What a destination scenario saw besides the latency of the destinations that stayed up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DestinationsOutcome {
    /// Destinations that were down (none, 20, or all).
    pub(crate) down: u64,
    /// Handler calls to a destination while it was down.
    pub(crate) calls_down: u64,
    /// From the first such call until the destinations came back, seconds.
    pub(crate) down_secs: f64,
    /// The most destinations open (or half-open) at once, from snapshots every 100 ms.
    pub(crate) open_max: usize,
    /// The most partitions paused at once, from the same snapshots.
    pub(crate) paused_max: usize,
    /// The longest a partition's lag behind its commit point got, records, from the same
    /// snapshots (records waiting for their destination hold the commit point).
    pub(crate) lag_max: u64,
    /// The consumer-wide breaker: times it opened by the time the destinations that stayed
    /// up had every record delivered (dest-down: while the others were still down).
    pub(crate) breaker_opened: u64,
    /// Its state at that moment.
    pub(crate) breaker_state: String,
    /// Failed calls it held.
    pub(crate) breaker_held: u64,
    /// From the destinations going down to the breaker's first opening, seconds (`None`:
    /// it never opened).
    pub(crate) breaker_opened_after_secs: Option<f64>,
    /// From the destinations going down to the breaker's last closing, seconds.
    pub(crate) breaker_closed_after_secs: Option<f64>,
    /// From the destinations coming back to every record delivered, seconds.
    pub(crate) recovered_secs: f64,
    /// Records delivered more than once (no record may be lost; none should be twice).
    pub(crate) duplicates: u64,
}

/// What a hot-destination scenario saw besides the other destinations' latency (that of
/// their records delivered at the first attempt: [`Outcome::latency`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct HotOutcome {
    /// `Destinations::with_max_in_flight`, if set.
    pub(crate) cap: Option<u32>,
    /// The consumer's `max_in_flight`.
    pub(crate) max_in_flight: u64,
    /// The most calls to the hot destination running at once (counted in the handler).
    pub(crate) hot_at_once: u64,
    /// Records sent per second to the other destinations and to the hot one (offered).
    pub(crate) others_offered: f64,
    pub(crate) hot_offered: f64,
    /// Calls that delivered, started within the measured phase, per second: the other
    /// destinations and the hot one.
    pub(crate) others_rate: f64,
    pub(crate) hot_rate: f64,
    /// The hot destination's latency (send → entry of the call that delivers), measured
    /// phase.
    pub(crate) hot_p50_us: u64,
    pub(crate) hot_p99_us: u64,
    /// The other destinations' records delivered by a retry (their first attempt failed):
    /// how many (measured phase) and their latency (send → entry of the retry).
    pub(crate) retried_samples: u64,
    pub(crate) retried_p50_us: u64,
    pub(crate) retried_p99_us: u64,
    /// First attempts that failed (all of the run).
    pub(crate) failed_first: u64,
    /// From the last send to every record of the other destinations delivered, seconds.
    pub(crate) others_done_secs: f64,
    /// From then (the hot destination answering at once from that moment) to every record
    /// delivered, seconds, and the process's CPU seconds meanwhile.
    pub(crate) drain_secs: f64,
    pub(crate) drain_cpu_secs: f64,
    /// The most seen at once, from snapshots every 100 ms: slots taken (in flight, less
    /// the waiting), records waiting without a slot (for the cap, or a retry back-off),
    /// partitions paused, destinations open.
    pub(crate) running_max: usize,
    pub(crate) waiting_max: usize,
    pub(crate) paused_max: usize,
    pub(crate) open_max: usize,
    /// Records delivered more than once.
    pub(crate) duplicates: u64,
}

/// End-to-end latencies: an HDR histogram of the measured phase, plus a per-second timeline
/// (by send second, warm-up included) for `--timeline`.
#[derive(Debug)]
pub(crate) struct LatencyRecorder {
    /// Records scheduled before this (µs since the epoch) are warm-up: not in the histogram.
    pub(crate) measured_after_us: AtomicU64,
    /// When the producer started (µs since the epoch).
    pub(crate) start_us: AtomicU64,
    pub(crate) histogram: Mutex<Histogram<u64>>,
    /// Per scheduled second: (records, sum µs, max µs).
    pub(crate) timeline: Mutex<Vec<(u64, u64, u64)>>,
}

impl LatencyRecorder {
    pub(crate) fn new() -> Self {
        LatencyRecorder {
            measured_after_us: AtomicU64::new(u64::MAX),
            start_us: AtomicU64::new(u64::MAX),
            histogram: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            ),
            timeline: Mutex::new(Vec::new()),
        }
    }

    /// The measured phase's figures, with the producer's (`acks`: its send → acknowledgement
    /// recorder; `rate`, `send_rate`, `max_lag_us`: what `paced_producer` returned).
    pub(crate) fn outcome(
        &self,
        acks: &LatencyRecorder,
        rate: u64,
        send_rate: f64,
        max_lag_us: u64,
    ) -> LatencyOutcome {
        let h = self.histogram.lock().expect("not poisoned");
        let a = acks.histogram.lock().expect("not poisoned");
        LatencyOutcome {
            samples: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            offered_rate: rate,
            send_rate,
            max_send_lag_us: max_lag_us,
            ack_p50_us: a.value_at_quantile(0.50),
            ack_p99_us: a.value_at_quantile(0.99),
        }
    }

    /// `--timeline`: the mean and max latency per send second (stderr).
    pub(crate) fn print_timeline(&self, scenario: &str) {
        let t = self.timeline.lock().expect("not poisoned");
        eprintln!("latency timeline ({scenario}), by send second:");
        for (second, (n, sum, max)) in t.iter().enumerate() {
            eprintln!(
                "  {second:>3} s  {n:>6} records  mean {:>9.2} ms  max {:>9.2} ms",
                *sum as f64 / (*n).max(1) as f64 / 1000.0,
                *max as f64 / 1000.0
            );
        }
    }

    /// Records a record whose `sent-at` header holds `sent` (text µs), received at `now_us`.
    pub(crate) fn record(&self, sent: Option<&[u8]>, now_us: u64) {
        let Some(sent) = sent
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        let latency = now_us.saturating_sub(sent).max(1);
        if sent >= self.measured_after_us.load(AtomicOrdering::Relaxed) {
            let mut h = self.histogram.lock().expect("not poisoned");
            let _ = h.record(latency);
        }
        let start = self.start_us.load(AtomicOrdering::Relaxed);
        if sent >= start {
            let second = ((sent - start) / 1_000_000) as usize;
            let mut t = self.timeline.lock().expect("not poisoned");
            if t.len() <= second {
                t.resize(second + 1, (0, 0, 0));
            }
            let slot = &mut t[second];
            slot.0 += 1;
            slot.1 += latency;
            slot.2 = slot.2.max(latency);
        }
    }
}

/// Every scenario run, with what it measured.
pub(crate) type Results = Vec<(crate::scenario::Scenario, Outcome)>;

/// The load average (1, 5, 15 min), for the report.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The machine the benchmark ran on, for the report.
pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / (1024.0 * 1024.0));
    let (_, librdkafka) = kourier::rdkafka::util::get_rdkafka_version();
    format!("{cpus} CPUs ({model}), {mem_gib:.0} GiB RAM, librdkafka {librdkafka}")
}
