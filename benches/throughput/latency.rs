//! The latency scenarios: a paced producer thread stamps each record with its send time, the
//! consumer (raw, or kourier with a no-op handler) records `now − sent` at handler entry.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use kourier::rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use kourier::rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

use crate::args::{Args, ChildArgs};
use crate::consumers::{
    Behaviour, BenchHandler, Progress, Running, consumer_config, kourier_builder, runtime,
};
use crate::drain::raw_commit;
use crate::measure::{LatencyRecorder, Outcome, epoch_micros, peak_rss_kib, process_cpu_secs};
use crate::produce::{DeliveryCounter, fill_payload, send_blocking};
use crate::scenario::Scenario;
use crate::services::client_config;
use crate::{
    BoxResult, DEST_HEADER, LATENCY_LINGER_MS, PARTITIONS, SCENARIO_TIMEOUT, SENT_AT_HEADER,
};

/// How the paced producer keys its records.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Keys {
    /// `key-{id % 10000}`, round-robin over the partitions (the latency scenarios).
    RoundRobin,
    /// `dest-{id % n}`, the partition chosen by the producer's partitioner from the key, so
    /// that each destination is on one partition (the destination scenarios).
    Destinations(u64),
    /// `rec-{id}` (a key per record), the partition chosen by the producer's partitioner
    /// from the key, and the record's destination, `destination(id)`, in header
    /// [`DEST_HEADER`]: a destination spans every partition (the hot-destination scenarios).
    PerRecord { destination: fn(u64) -> String },
}

/// Sends records at `rate`/s for `warmup + secs`, each stamped with the time it is handed to
/// the producer (µs since the epoch, in a header). The consumer never holds the producer back
/// (no coordinated omission); how far the producer thread itself fell behind its schedule is
/// returned so a starved producer shows. `recorders` (and `acks`) are told when the producer
/// starts and when the warm-up ends. Returns (records sent, measured-phase send rate, worst
/// lag behind schedule in µs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn paced_producer(
    topic: &str,
    rate: u64,
    warmup: Duration,
    secs: Duration,
    size: usize,
    keys: Keys,
    recorders: &[&LatencyRecorder],
    acks: &Arc<LatencyRecorder>,
) -> BoxResult<(u64, f64, u64)> {
    let producer: BaseProducer<DeliveryCounter> = client_config()
        // librdkafka's default linger (5 ms): 1 ms makes ~1,000 produce requests/s, more than
        // a busy single broker acknowledges in time (acks then take seconds, measured).
        .set("linger.ms", LATENCY_LINGER_MS.to_string())
        .set("acks", "1")
        .set("enable.idempotence", "false")
        .create_with_context(DeliveryCounter {
            acks: Some(acks.clone()),
            ..DeliveryCounter::default()
        })?;
    let total = rate * (warmup + secs).as_secs();
    let warm = rate * warmup.as_secs();
    let started = Instant::now();
    let start_us = epoch_micros();
    for r in recorders.iter().copied().chain([&**acks]) {
        r.start_us.store(start_us, AtomicOrdering::Relaxed);
        r.measured_after_us.store(
            start_us + warmup.as_micros() as u64,
            AtomicOrdering::Relaxed,
        );
    }
    let mut payload = Vec::with_capacity(size + 32);
    let mut key = String::new();
    let mut max_lag = 0u64;
    let mut measured_from = None;
    for id in 0..total {
        let due = Duration::from_micros(id * 1_000_000 / rate);
        let now = started.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            max_lag = max_lag.max((now - due).as_micros() as u64);
        }
        if id == warm {
            measured_from = Some(Instant::now());
        }
        fill_payload(&mut payload, id, size);
        key.clear();
        let mut destination = None;
        let partition = match keys {
            Keys::RoundRobin => {
                let _ = write!(key, "key-{}", id % 10_000);
                Some((id % PARTITIONS as u64) as i32)
            }
            Keys::Destinations(n) => {
                let _ = write!(key, "dest-{}", id % n);
                None
            }
            Keys::PerRecord { destination: of } => {
                let _ = write!(key, "rec-{id}");
                destination = Some(of(id));
                None
            }
        };
        let sent_at = epoch_micros().to_string();
        let mut headers = OwnedHeaders::new_with_capacity(2).insert(Header {
            key: SENT_AT_HEADER,
            value: Some(sent_at.as_bytes()),
        });
        if let Some(d) = &destination {
            headers = headers.insert(Header {
                key: DEST_HEADER,
                value: Some(d.as_bytes()),
            });
        }
        let mut record = BaseRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload.as_slice())
            .headers(headers);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        send_blocking(&producer, record)?;
        producer.poll(Duration::ZERO);
    }
    let send_secs = measured_from.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    producer.flush(Duration::from_secs(60))?;
    let failed = producer.context().failed.load(AtomicOrdering::Relaxed);
    if failed > 0 {
        return Err(format!("{failed} latency records failed to produce").into());
    }
    Ok((total, (total - warm) as f64 / send_secs, max_lag))
}

/// latency-raw and latency: a paced producer thread, a consumer taking the time at entry.
pub(crate) fn latency(args: &Args, child: &ChildArgs, group: &str) -> BoxResult<Outcome> {
    let rate = args.latency_rate;
    // A fresh topic's first seconds are slow on a busy broker (seen with both consumers).
    let warmup = Duration::from_secs(if args.quick { 1 } else { 5 });
    let secs = Duration::from_secs(args.latency_secs);
    let total = rate * (warmup + secs).as_secs();
    let recorder = Arc::new(LatencyRecorder::new());
    let acks = Arc::new(LatencyRecorder::new());
    let progress = Arc::new(Progress::default());
    let assigned = Arc::new(AtomicBool::new(false));
    let cpu0 = process_cpu_secs();
    let created = Instant::now();

    // The consumer side: raw on a thread, or kourier on a runtime.
    let rt = runtime()?;
    let mut raw_thread = None;
    let mut running = None;
    if child.scenario == Scenario::LatencyRaw {
        let consumer: BaseConsumer = consumer_config(args, group).create()?;
        consumer.subscribe(&[child.topic.as_str()])?;
        let (recorder, progress, assigned) = (recorder.clone(), progress.clone(), assigned.clone());
        let topic = child.topic.clone();
        raw_thread = Some(std::thread::spawn(move || -> BoxResult<()> {
            let mut next = vec![-1i64; PARTITIONS as usize];
            let mut last_commit = Instant::now();
            while progress.handled.load(AtomicOrdering::Relaxed) < total {
                if created.elapsed() > SCENARIO_TIMEOUT {
                    return Err("raw latency consumer timed out".into());
                }
                if !assigned.load(AtomicOrdering::Relaxed) {
                    let count = consumer.assignment().map_or(0, |a| a.count());
                    assigned.store(count == PARTITIONS as usize, AtomicOrdering::Relaxed);
                }
                if last_commit.elapsed() >= Duration::from_secs(1) {
                    raw_commit(&consumer, &topic, &next)?;
                    last_commit = Instant::now();
                }
                let Some(m) = consumer.poll(Duration::from_millis(10)) else {
                    continue;
                };
                let m = m?;
                let now = epoch_micros();
                let sent = m.headers().and_then(|hs| {
                    hs.iter()
                        .find(|h| h.key == SENT_AT_HEADER)
                        .and_then(|h| h.value)
                });
                recorder.record(sent, now);
                if let Some(slot) = next.get_mut(m.partition() as usize) {
                    *slot = m.offset() + 1;
                }
                progress.first.get_or_init(Instant::now);
                progress.handled.fetch_add(1, AtomicOrdering::Relaxed);
            }
            raw_commit(&consumer, &topic, &next)?;
            Ok(())
        }));
    } else {
        let _guard = rt.enter();
        let handler = BenchHandler {
            progress: progress.clone(),
            behaviour: Behaviour::Latency(recorder.clone()),
        };
        let consumer = kourier_builder(args, handler, group, &child.topic).build()?;
        running = Some(Running::spawn(consumer));
    }

    // Wait for the assignment, so the measured phase does not include the group join.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = match &running {
            Some(r) => r.monitor.snapshot().assigned.len() == PARTITIONS as usize,
            None => assigned.load(AtomicOrdering::Relaxed),
        };
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err("no partitions assigned after 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let (sent, send_rate, max_lag) = paced_producer(
        &child.topic,
        rate,
        warmup,
        secs,
        args.size,
        Keys::RoundRobin,
        &[&recorder],
        &acks,
    )
    .map_err(|e| format!("latency producer: {e}"))?;
    debug_assert_eq!(sent, total);

    let end = Instant::now();
    loop {
        if progress.handled.load(AtomicOrdering::Relaxed) >= total {
            break;
        }
        if end.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "latency: {} of {total} records consumed 60 s after the last send",
                progress.handled.load(AtomicOrdering::Relaxed)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let cpu1 = process_cpu_secs();
    let rss = peak_rss_kib();
    if let Some(t) = raw_thread {
        t.join().map_err(|_| "raw latency consumer panicked")??;
    }
    if let Some(r) = running {
        rt.block_on(r.stop())?;
    }
    if args.timeline {
        recorder.print_timeline(child.scenario.name());
    }
    let first = progress.first.get().copied().unwrap_or(end);
    Ok(Outcome {
        records: total,
        payload_bytes: total * args.size as u64,
        secs: (Instant::now() - first).as_secs_f64(),
        join_secs: (first - created).as_secs_f64(),
        cpu_secs: cpu1 - cpu0,
        peak_rss_kib: rss,
        latency: Some(recorder.outcome(&acks, rate, send_rate, max_lag)),
        ..Outcome::default()
    })
}
