//! The table on stdout: every figure, its ratio to the raw baseline (a), and the targets
//! marked PASS/MISS (informational).

use std::fmt::Write as _;

use crate::args::Args;
use crate::measure::{DestinationsOutcome, Outcome, Results, load_average, machine};
use crate::produce::Produced;
use crate::scenario::Scenario;
use crate::{
    DEFAULT_MAX_IN_FLIGHT, DELIVERY, DEST_HEADER, DEST_OPEN, DESTINATIONS, DOWN_EVERY,
    EVENT_ID_HEADER, HOT_CAP, HOT_DELIVERY, HOT_EVERY, HOT_MAX_SECS, HOT_NAME, HOT_OTHERS,
    HOT_RETRY_BACKOFF, HOT_RETRY_EVERY, LATENCY_LINGER_MS, OUTAGE, OUTAGE_MAX_SECS, PARTITIONS,
    QUEUED_MAX_KBYTES, SLOW_HANDLER, SLOW_KEYS,
};

/// kourier's buffer defaults (builder.rs): records and bytes received but not started.
const MAX_BUFFERED_RECORDS: u64 = 10_000;
const MAX_BUFFERED_BYTES: u64 = 64 << 20;
/// What peak RSS may use beyond the configured buffers: the Tokio runtime, librdkafka's
/// threads and metadata, the dead-letter producer, allocator slack, code. Stated before
/// measuring; the raw baseline's own RSS shows how much of it any rdkafka consumer needs.
const RSS_CONSTANT_MIB: f64 = 72.0;
/// kourier's `fetch.max.bytes` default (builder.rs).
const FETCH_MAX_BYTES: u64 = 16 << 20;
/// Records settling per in-flight slot, and the state each holds besides its record
/// (`RetryingConsumerBuilder`'s *Memory*).
const SETTLING_PER_SLOT: u64 = 4;
const SETTLING_STATE_BYTES: u64 = 8 << 10;
/// Records the poll thread may hold read ahead of the buffer: the rest of one run of 64
/// taken from librdkafka (`RetryingConsumerBuilder`'s *Memory*).
const READ_AHEAD_RECORDS: u64 = 63;

/// 1234567 → "1,234,567".
pub(crate) fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn ratio(v: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 && v.is_finite() => format!("{:.2}×", v / b),
        _ => "—".into(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// The bytes kourier's buffer accounting charges one drain record (`RawRecord::byte_len`):
/// key + value + header names and values + topic + 64.
fn accounted_record_bytes(args: &Args, topic: &str, run_id: &str) -> u64 {
    let key = "key-0000".len() as u64;
    let header = (EVENT_ID_HEADER.len() + run_id.len() + 1 + args.records.to_string().len()) as u64;
    key + args.size as u64 + header + topic.len() as u64 + 64
}

pub(crate) fn print_table(
    args: &Args,
    run_id: &str,
    drain_topic: &str,
    produced: &Option<Produced>,
    results: &Results,
    load_start: &str,
) {
    let get = |s: Scenario| results.iter().find(|(x, _)| *x == s).map(|(_, o)| o);
    let rate = |o: &Outcome| o.records as f64 / o.secs;
    let cpu_per_m = |o: &Outcome| o.cpu_secs / o.records as f64 * 1e6;
    let rss_mib = |o: &Outcome| o.peak_rss_kib as f64 / 1024.0;
    // The columns a drain row and a slow-handler row start with.
    let lead = |s: Scenario, o: &Outcome| {
        format!(
            "{:<34} {:>9} {:>7.2} {:>10}",
            s.label(),
            thousands(o.records as f64),
            o.secs,
            thousands(rate(o))
        )
    };
    let base = get(Scenario::Raw);
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "kourier throughput benchmark{} — {} records × {} B, {PARTITIONS} partitions, compression {}",
        if args.smoke {
            " (smoke run: figures are meaningless)"
        } else if args.quick {
            " (--quick)"
        } else {
            ""
        },
        thousands(args.records as f64),
        args.size,
        args.compression
    );
    let _ = writeln!(w, "machine: {}", machine());
    if !args.consumer_config.is_empty()
        || args.buffer_records.is_some()
        || args.partition_buffer.is_some()
        || args.ordering.is_some()
        || args.max_in_flight.is_some()
        || args.uncommitted_per_partition.is_some()
        || args.dest_down_at_start
        || args.park
        || args.floor_claim_script
    {
        let overrides: Vec<String> = args
            .consumer_config
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(
                args.buffer_records
                    .map(|n| format!("kourier max_buffered_records={n}")),
            )
            .chain(
                args.partition_buffer
                    .map(|n| format!("kourier max_buffered_records_per_partition={n}")),
            )
            .chain(
                args.ordering
                    .as_ref()
                    .map(|o| format!("kourier ordering={o}")),
            )
            .chain(
                args.max_in_flight
                    .map(|n| format!("kourier max_in_flight={n}")),
            )
            .chain(
                args.uncommitted_per_partition
                    .map(|n| format!("kourier max_uncommitted_per_partition={n}")),
            )
            .chain(
                args.dest_down_at_start
                    .then(|| "dest-down: down from the consumer's start".to_owned()),
            )
            .chain(
                args.floor_claim_script
                    .then(|| "(c0) claims with kourier's claim script".to_owned()),
            )
            .chain(
                args.park
                    .then(|| "destinations: waiting records parked in a retry tier".to_owned()),
            )
            .collect();
        let _ = writeln!(w, "overrides: {}", overrides.join(", "));
    }
    let _ = writeln!(
        w,
        "load average (1/5/15 min): {load_start} at start, {} at end",
        load_average()
    );
    if let Some(p) = produced {
        let _ = writeln!(
            w,
            "pre-produce: {} records in {:.2} s = {} rec/s ({:.1} MB/s), linger.ms=50, acks=1; \
             all in the log before any consumer started",
            thousands(args.records as f64),
            p.secs,
            thousands(args.records as f64 / p.secs),
            args.records as f64 * args.size as f64 / p.secs / 1e6
        );
    }

    let drains: Vec<_> = results.iter().filter(|(s, _)| s.is_drain()).collect();
    if !drains.is_empty() {
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "Drain: first record handed to user code → every record settled; CPU = whole process \
             user+sys from consumer creation; MB/s counts values only"
        );
        let _ = writeln!(
            w,
            "{:<34} {:>9} {:>7} {:>10} {:>6} {:>7} {:>8} {:>6} {:>8} {:>6} {:>10} {:>6}",
            "scenario",
            "records",
            "secs",
            "rec/s",
            "×(a)",
            "MB/s",
            "CPU s/M",
            "×(a)",
            "RSS MiB",
            "×(a)",
            "µs/rec+(a)",
            "join s"
        );
        for (s, o) in &drains {
            let overhead = base.map_or(f64::NAN, |b| 1e6 / rate(o) - 1e6 / rate(b));
            let _ = writeln!(
                w,
                "{} {:>6} {:>7.1} {:>8.2} {:>6} {:>8.1} {:>6} {:>10.2} {:>6.1}",
                lead(*s, o),
                ratio(rate(o), base.map(rate)),
                o.payload_bytes as f64 / o.secs / 1e6,
                cpu_per_m(o),
                ratio(cpu_per_m(o), base.map(cpu_per_m)),
                rss_mib(o),
                ratio(rss_mib(o), base.map(rss_mib)),
                overhead,
                o.join_secs
            );
        }
        for (s, who) in [
            (Scenario::Redis, "kourier"),
            (Scenario::RedisFloor, "the loop"),
        ] {
            if let Some(c) = get(s) {
                let per_m = |secs: f64| secs / c.records as f64 * 1e6;
                let _ = writeln!(
                    w,
                    "{} the Redis server used {:.2} CPU s/M records meanwhile (INFO cpu), on the same cores: {who} + Redis = {:.2} CPU s/M",
                    s.label().split(' ').next().unwrap_or_default(),
                    per_m(c.store_cpu_secs),
                    per_m(c.store_cpu_secs + c.cpu_secs)
                );
            }
        }
        for s in [Scenario::DeadLetterFloor, Scenario::DeadLetter] {
            if let Some(d) = get(s) {
                let _ = writeln!(
                    w,
                    "{} wrote {} dead letters to {drain_topic}.dlt (acks=all, idempotent producer)",
                    s.label().split(' ').next().unwrap_or_default(),
                    thousands(d.dead_letters as f64)
                );
            }
        }
        print_floors(w, &get);
    }

    let slow_p = get(Scenario::SlowPartition);
    let slow_k = get(Scenario::SlowKey);
    let retry_base = get(Scenario::RetryBase);
    let retry = get(Scenario::Retry);
    if slow_p.is_some() || slow_k.is_some() || retry_base.is_some() || retry.is_some() {
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "Slow handler: each record awaits a {} ms tokio sleep; 1 partition, {} keys. \
             Partition runs only {} records (at 10 ms/record {} would take ~{:.0} s); rates compare",
            SLOW_HANDLER.as_millis(),
            SLOW_KEYS,
            thousands(args.slow_partition_records as f64),
            thousands(args.slow_records as f64),
            args.slow_records as f64 * SLOW_HANDLER.as_secs_f64()
        );
        let _ = writeln!(
            w,
            "{:<34} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8}",
            "scenario", "records", "secs", "rec/s", "CPU s/M", "RSS MiB", "join s"
        );
        for s in [
            Scenario::SlowPartition,
            Scenario::SlowKey,
            Scenario::RetryBase,
            Scenario::Retry,
        ] {
            if let Some(o) = get(s) {
                let _ = writeln!(
                    w,
                    "{} {:>8.1} {:>8.1} {:>8.1}",
                    lead(s, o),
                    cpu_per_m(o),
                    rss_mib(o),
                    o.join_secs
                );
            }
        }
    }

    let lat_raw = get(Scenario::LatencyRaw).and_then(|o| o.latency.clone());
    let lat = get(Scenario::Latency).and_then(|o| o.latency.clone());
    if lat_raw.is_some() || lat.is_some() {
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "End-to-end latency: send time (µs header, producer linger.ms={LATENCY_LINGER_MS}) → handler \
             entry; offered {} rec/s for {} s after a warm-up that is not recorded; {PARTITIONS} partitions; \
             consumer defaults (fetch.wait.max.ms=500); lag = producer behind schedule (worst), \
             ack = send → broker ack (acks=1)",
            thousands(args.latency_rate as f64),
            args.latency_secs
        );
        let _ = writeln!(
            w,
            "{:<34} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}",
            "scenario",
            "samples",
            "sent/s",
            "lag ms",
            "ack p50",
            "ack p99",
            "p50 ms",
            "p99 ms",
            "×raw",
            "p99.9 ms",
            "max ms",
            "RSS MiB"
        );
        for (s, l) in [(Scenario::LatencyRaw, &lat_raw), (Scenario::Latency, &lat)] {
            if let (Some(l), Some(o)) = (l, get(s)) {
                let ms = |us: u64| us as f64 / 1000.0;
                let _ = writeln!(
                    w,
                    "{:<34} {:>8} {:>9} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8} {:>8.2} {:>8.2} {:>8.1}",
                    s.label(),
                    thousands(l.samples as f64),
                    thousands(l.send_rate),
                    ms(l.max_send_lag_us),
                    ms(l.ack_p50_us),
                    ms(l.ack_p99_us),
                    ms(l.p50_us),
                    ms(l.p99_us),
                    ratio(l.p99_us as f64, lat_raw.as_ref().map(|r| r.p99_us as f64)),
                    ms(l.p999_us),
                    ms(l.max_us),
                    rss_mib(o)
                );
            }
        }
    }

    print_destinations(w, args, &get);
    print_hot(w, args, &get);

    // Targets.
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Targets (informational: the exit code does not depend on them)"
    );
    let mut target = |name: String, value: String, ok: Option<bool>| {
        let v = ok.map_or("—   ", verdict);
        let _ = writeln!(w, "  {v}  {name:<58} {value}");
    };
    // Each drain scenario against the same work at its floor: (b) against the raw loop (a),
    // (c) and (d) against the raw loop doing their Redis or dead-letter work by hand.
    let per_record = |secs: f64, o: &Outcome| secs / o.records as f64;
    for (s, floor, min_rate, max_cpu) in [
        (Scenario::Kourier, Scenario::Raw, 0.6, Some((2.5, "CPU"))),
        (
            Scenario::Redis,
            Scenario::RedisFloor,
            0.7,
            Some((1.5, "Redis CPU")),
        ),
        (Scenario::DeadLetter, Scenario::DeadLetterFloor, 0.8, None),
    ] {
        let Some(o) = get(s) else { continue };
        let f = get(floor);
        let vs = format!("({})", floor.name());
        let r = f.map(|f| rate(o) / rate(f));
        target(
            format!("{} ≥ {min_rate:.2} × {vs} throughput", s.label()),
            r.map_or("no floor in this run".into(), |r| format!("{r:.2} × {vs}")),
            r.map(|r| r >= min_rate),
        );
        if let Some((max, what)) = max_cpu {
            // The consumer's own CPU for (b), the Redis server's for (c).
            let cpu = |o: &Outcome| {
                let secs = if s == Scenario::Redis {
                    o.store_cpu_secs
                } else {
                    o.cpu_secs
                };
                per_record(secs, o)
            };
            // A floor too short to show CPU (tiny runs count it in 10 ms steps) gives no ratio.
            let r = f.filter(|f| cpu(f) > 0.0).map(|f| cpu(o) / cpu(f));
            target(
                format!("{} {what} per record ≤ {max:.1} × {vs}'s", s.label()),
                r.map_or("no floor CPU in this run".into(), |r| {
                    format!("{r:.2} × {vs}")
                }),
                r.map(|r| r <= max),
            );
        }
    }
    if let (Some(p), Some(k)) = (slow_p, slow_k) {
        let r = rate(k) / rate(p);
        target(
            "slow handler: Key ≥ 20 × Partition".into(),
            format!("{r:.0} ×"),
            Some(r >= 20.0),
        );
    }
    if let (Some(b), Some(e)) = (retry_base, retry) {
        let r = rate(e) / rate(b);
        target(
            "(e) 5% transient failures ≥ 0.80 × (e0) throughput".into(),
            format!("{r:.2} × (e0)"),
            Some(r >= 0.8),
        );
    }
    // The bound documented on `RetryingConsumerBuilder` (# Memory), with kourier's defaults.
    let record_bytes = accounted_record_bytes(args, drain_topic, run_id);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let buffer_mib = mib(
        (MAX_BUFFERED_RECORDS * record_bytes).min(MAX_BUFFERED_BYTES)
            + (1 + READ_AHEAD_RECORDS) * record_bytes,
    );
    let max_in_flight = args.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
    // Running or parked, plus settling: 4 per slot, each with its job's state (≤ 8 KiB).
    let in_flight_mib = mib(max_in_flight * record_bytes
        + SETTLING_PER_SLOT * max_in_flight * (record_bytes + SETTLING_STATE_BYTES));
    let librdkafka_mib = mib((QUEUED_MAX_KBYTES << 10) + FETCH_MAX_BYTES);
    let limit_mib = buffer_mib + in_flight_mib + librdkafka_mib + RSS_CONSTANT_MIB;
    for s in [Scenario::Kourier, Scenario::Redis, Scenario::DeadLetter] {
        if let Some(o) = get(s) {
            target(
                format!(
                    "{} peak RSS ≤ {:.1} + {:.1} + {:.0} + {:.0} MiB",
                    s.label(),
                    buffer_mib,
                    in_flight_mib,
                    librdkafka_mib,
                    RSS_CONSTANT_MIB
                ),
                format!("{:.1} MiB (limit {limit_mib:.1})", rss_mib(o)),
                Some(rss_mib(o) <= limit_mib),
            );
        }
    }
    if let Some(l) = &lat {
        target(
            format!(
                "kourier p99 latency at {} rec/s ≤ 20 ms",
                thousands(args.latency_rate as f64)
            ),
            format!("{:.2} ms", l.p99_us as f64 / 1000.0),
            Some(l.p99_us <= 20_000),
        );
        if let Some(r) = &lat_raw {
            let x = l.p99_us as f64 / r.p99_us.max(1) as f64;
            target(
                "kourier p99 latency ≤ 1.5 × raw's p99".into(),
                format!("{x:.2} × ({:.2} ms)", r.p99_us as f64 / 1000.0),
                Some(x <= 1.5),
            );
        }
    }
    let dest_up = get(Scenario::DestUp).and_then(|o| o.latency.clone());
    if let Some(b) = get(Scenario::DestDown)
        && let (Some(l), Some(d)) = (&b.latency, &b.destinations)
    {
        if let Some(a) = &dest_up {
            let x = l.p99_us as f64 / a.p99_us.max(1) as f64;
            target(
                "dest-down: p99 of the destinations up ≤ 1.2 × dest-up's".into(),
                format!("{x:.2} × ({:.2} ms)", a.p99_us as f64 / 1000.0),
                Some(x <= 1.2),
            );
        }
        let allowed = allowed_calls(d);
        target(
            format!(
                "dest-down: calls to the {} down ≤ {} × (1 + secs / {} s)",
                d.down,
                d.down,
                DEST_OPEN.as_secs_f64()
            ),
            format!("{} (allowed {allowed:.0})", d.calls_down),
            Some(d.calls_down as f64 <= allowed),
        );
        target(
            "dest-down: consumer-wide breaker stays closed".into(),
            format!("{}, opened {}×", d.breaker_state, d.breaker_opened),
            Some(d.breaker_opened == 0),
        );
    }
    for s in [Scenario::DestHotCapped, Scenario::DestHotRetry] {
        if let Some(h) = get(s).and_then(|o| o.hot.as_ref())
            && let Some(cap) = h.cap
        {
            target(
                format!("{}: calls to the hot destination at once ≤ {cap}", s.name()),
                format!("{} at most", h.hot_at_once),
                Some(h.hot_at_once <= u64::from(cap)),
            );
        }
    }
    if let (Some(c), Some(r)) = (
        get(Scenario::DestHotCapped).and_then(|o| o.latency.as_ref()),
        get(Scenario::DestHotRetry).and_then(|o| o.latency.as_ref()),
    ) {
        let x = r.p99_us as f64 / c.p99_us.max(1) as f64;
        target(
            "dest-hot-retry: first attempts' p99 ≤ 1.2 × dest-hot-capped's".into(),
            format!("{x:.2} × ({:.2} ms)", c.p99_us as f64 / 1000.0),
            Some(x <= 1.2),
        );
    }
    if let Some(d) = get(Scenario::DestAllDown).and_then(|o| o.destinations.as_ref()) {
        target(
            format!(
                "dest-all-down: consumer-wide breaker opens (all down {} s)",
                OUTAGE.as_secs()
            ),
            format!("opened {}×", d.breaker_opened),
            Some(d.breaker_opened > 0),
        );
    }
    let _ = writeln!(
        w,
        "  (RSS limit, as documented on RetryingConsumerBuilder (# Memory): kourier's buffer \
         min(max_buffered_bytes, max_buffered_records × record bytes) + one record + 63 read \
         ahead, + max_in_flight × record bytes, + 4 × max_in_flight × (record bytes + 8 KiB) settling, + librdkafka's queued.max.messages.kbytes and \
         fetch.max.bytes (one broker), + a constant for runtime, DLT producer and allocator)"
    );
    println!("{out}");
}

/// (c) against (c0) and (d) against (d0): kourier against the same work done by hand in the
/// raw loop. CPU per record apart for the consumer process and the Redis server.
fn print_floors<'a>(w: &mut String, get: &impl Fn(Scenario) -> Option<&'a Outcome>) {
    let pairs: Vec<_> = [
        (Scenario::Kourier, Scenario::RawRead),
        (Scenario::Redis, Scenario::RedisFloor),
        (Scenario::DeadLetter, Scenario::DeadLetterFloor),
    ]
    .into_iter()
    .filter_map(|(k, f)| Some((k, get(k)?, f, get(f)?)))
    .collect();
    if pairs.is_empty() {
        return;
    }
    let rate = |o: &Outcome| o.records as f64 / o.secs;
    let us = |secs: f64, o: &Outcome| secs / o.records as f64 * 1e6;
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Floors: kourier against the same work done by hand in the raw loop (a1, c0, d0); \
         CPU µs/record, consumer process and Redis server apart, kourier vs floor (×floor)"
    );
    let _ = writeln!(
        w,
        "{:<12} {:>22} {:>7} {:>16} {:>7} {:>16} {:>7} {:>16} {:>7}",
        "pair",
        "rec/s kourier vs floor",
        "×floor",
        "consumer µs/rec",
        "×floor",
        "Redis µs/rec",
        "×floor",
        "total µs/rec",
        "×floor"
    );
    for (k, ko, f, fo) in pairs {
        let redis = k == Scenario::Redis;
        let vs = |a: f64, b: f64| format!("{a:.2} vs {b:.2}");
        let (kr, fr) = (us(ko.store_cpu_secs, ko), us(fo.store_cpu_secs, fo));
        let (kc, fc) = (us(ko.cpu_secs, ko), us(fo.cpu_secs, fo));
        let _ = writeln!(
            w,
            "{:<12} {:>22} {:>7} {:>16} {:>7} {:>16} {:>7} {:>16} {:>7}",
            format!("({}) vs ({})", k.name(), f.name()),
            format!("{} vs {}", thousands(rate(ko)), thousands(rate(fo))),
            ratio(rate(ko), Some(rate(fo))),
            vs(kc, fc),
            ratio(kc, Some(fc)),
            if redis { vs(kr, fr) } else { "—".into() },
            if redis {
                ratio(kr, Some(fr))
            } else {
                "—".into()
            },
            vs(kc + kr, fc + fr),
            ratio(kc + kr, Some(fc + fr)),
        );
    }
}

/// What the open interval allows a scenario's destinations that are down: one call each to
/// open it, then one probe per interval while they stay down.
fn allowed_calls(d: &DestinationsOutcome) -> f64 {
    d.down as f64 * (1.0 + d.down_secs / DEST_OPEN.as_secs_f64())
}

/// The destination scenarios: latency of the destinations that stay up against dest-up's,
/// calls to the destinations that are down against what the open interval allows, dead
/// letters, the consumer-wide breaker.
fn print_destinations<'a>(
    w: &mut String,
    args: &Args,
    get: &impl Fn(Scenario) -> Option<&'a Outcome>,
) {
    let rows: Vec<_> = Scenario::DESTINATIONS
        .into_iter()
        .filter_map(|s| {
            let o = get(s)?;
            Some((s, o, o.latency.as_ref()?, o.destinations.as_ref()?))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let base = get(Scenario::DestUp).and_then(|o| o.latency.as_ref());
    let ms = |us: u64| us as f64 / 1000.0;
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Destinations: {} destinations (key dest-N), Key order, Destinations::by_key() open {} s \
         (fixed), BreakerPolicy::default(), max_uncommitted_per_partition {}; a delivery is a \
         {} ms tokio sleep, a destination that is down answers HandlerError::unavailable at \
         once; offered {} rec/s for {} s after a warm-up that is not recorded; dest-down: {} \
         down {}; dest-all-down: {} s, all down for the first {} s; latency = send → entry of \
         the call that delivers, the {} destinations dest-down keeps up only",
        thousands(DESTINATIONS as f64),
        DEST_OPEN.as_secs(),
        args.uncommitted_per_partition.map_or(
            if args.park {
                "10,000".into()
            } else {
                "the run's records".into()
            },
            |n| thousands(n as f64)
        ),
        DELIVERY.as_millis(),
        thousands(args.latency_rate as f64),
        args.latency_secs,
        DESTINATIONS / DOWN_EVERY,
        if args.dest_down_at_start {
            "from the consumer's start"
        } else {
            "from the end of the warm-up"
        },
        args.latency_secs.min(OUTAGE_MAX_SECS),
        OUTAGE.as_secs(),
        thousands((DESTINATIONS - DESTINATIONS / DOWN_EVERY) as f64),
    );
    let _ = writeln!(
        w,
        "{:<24} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "scenario",
        "samples",
        "sent/s",
        "lag ms",
        "p50 ms",
        "p99 ms",
        "×up p99",
        "p99.9 ms",
        "max ms",
        "CPU s",
        "RSS MiB"
    );
    for (s, o, l, _) in &rows {
        let _ = writeln!(
            w,
            "{:<24} {:>8} {:>7} {:>8.1} {:>8.2} {:>8.2} {:>9} {:>9.2} {:>8.2} {:>8.2} {:>8.1}",
            s.label(),
            thousands(l.samples as f64),
            thousands(l.send_rate),
            ms(l.max_send_lag_us),
            ms(l.p50_us),
            ms(l.p99_us),
            ratio(l.p99_us as f64, base.map(|b| b.p99_us as f64)),
            ms(l.p999_us),
            ms(l.max_us),
            o.cpu_secs,
            o.peak_rss_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(
        w,
        "{:<24} {:>5} {:>6} {:>8} {:>8} {:>16} {:>5} {:>7} {:>30}",
        "",
        "down",
        "open≤",
        "paused≤",
        "lag≤",
        "calls (allowed)",
        "DLT",
        "back s",
        "consumer-wide breaker"
    );
    for (s, o, _, d) in &rows {
        let calls = if d.down == 0 {
            "—".to_owned()
        } else if *s == Scenario::DestDown {
            format!("{} ({:.0})", d.calls_down, allowed_calls(d))
        } else {
            d.calls_down.to_string()
        };
        let breaker = match (d.breaker_opened_after_secs, d.breaker_closed_after_secs) {
            (Some(open), closed) if d.breaker_opened > 0 => format!(
                "opened {}× +{:.0} ms{}",
                d.breaker_opened,
                open * 1000.0,
                closed.map_or(String::new(), |c| format!(", closed +{c:.1} s"))
            ),
            _ => format!("{}, opened {}×", d.breaker_state, d.breaker_opened),
        };
        let back = if *s != Scenario::DestDown {
            "—".to_owned()
        } else {
            format!("{:.2}", d.recovered_secs)
        };
        let _ = writeln!(
            w,
            "{:<24} {:>5} {:>6} {:>8} {:>8} {:>16} {:>5} {:>7} {:>30}",
            s.label(),
            thousands(d.down as f64),
            thousands(d.open_max as f64),
            d.paused_max,
            thousands(d.lag_max as f64),
            calls,
            o.dead_letters,
            back,
            breaker
        );
        if d.duplicates > 0 {
            let _ = writeln!(
                w,
                "  {}: {} records delivered twice",
                s.label(),
                d.duplicates
            );
        }
    }
    let _ = writeln!(
        w,
        "  (lag ms: the producer behind its schedule, worst; CPU s: the process, until the \
         destinations that stay up have every record; open≤, paused≤, lag≤: the most \
         destinations open, partitions paused, records between a partition's commit point and \
         its end, sampled every 100 ms; calls: to destinations while down, for dest-down \
         against down × (1 + seconds down / open interval); DLT: dead letters, 0 or the \
         scenario fails; back s: dest-down, from the destinations coming back to every record delivered; \
         +ms / +s: the consumer-wide breaker's first opening and last closing, after the \
         destinations went down)"
    );
}

/// The hot-destination scenarios: the other destinations' latency and rate with the hot one
/// capped or not, the most calls to the hot one at once, what the cap costs the hot one.
fn print_hot<'a>(w: &mut String, args: &Args, get: &impl Fn(Scenario) -> Option<&'a Outcome>) {
    let rows: Vec<_> = Scenario::HOT
        .into_iter()
        .filter_map(|s| {
            let o = get(s)?;
            Some((s, o, o.latency.as_ref()?, o.hot.as_ref()?))
        })
        .collect();
    let Some((_, _, _, first)) = rows.first() else {
        return;
    };
    let base = get(Scenario::DestHot).and_then(|o| o.latency.as_ref());
    let ms = |us: u64| us as f64 / 1000.0;
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Hot destination: offered {} rec/s for {} s after a warm-up that is not recorded, a key \
         per record, the destination in header `{DEST_HEADER}`, Unordered, max_in_flight {}, \
         Destinations::header, max_uncommitted_per_partition {}; 1 in {HOT_EVERY} records to \
         `{HOT_NAME}` (a {} ms tokio sleep), the others over {HOT_OTHERS} destinations (a {} ms \
         sleep); capped: with_max_in_flight({HOT_CAP}); retries: the first attempt of 1 in \
         {HOT_RETRY_EVERY} of the others' records fails transiently (fixed {} ms back-off); once \
         every record of the others is delivered the hot destination answers in {} ms (its \
         backlog drains); latency = send → entry of the call that delivers, the other \
         destinations' records delivered at the first attempt",
        thousands(args.hot_rate as f64),
        args.latency_secs.min(HOT_MAX_SECS),
        first.max_in_flight,
        args.uncommitted_per_partition
            .map_or("the run's records".into(), |n| thousands(n as f64)),
        HOT_DELIVERY.as_millis(),
        DELIVERY.as_millis(),
        HOT_RETRY_BACKOFF.as_millis(),
        DELIVERY.as_millis(),
    );
    let _ = writeln!(
        w,
        "{:<24} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>16} {:>8} {:>8}",
        "scenario",
        "samples",
        "sent/s",
        "lag ms",
        "p50 ms",
        "p99 ms",
        "×no cap",
        "p99.9 ms",
        "max ms",
        "others/s (sent)",
        "CPU s",
        "RSS MiB"
    );
    for (s, o, l, h) in &rows {
        let _ = writeln!(
            w,
            "{:<24} {:>8} {:>7} {:>8.1} {:>8.2} {:>8.2} {:>9} {:>9.2} {:>8.2} {:>16} {:>8.2} {:>8.1}",
            s.label(),
            thousands(l.samples as f64),
            thousands(l.send_rate),
            ms(l.max_send_lag_us),
            ms(l.p50_us),
            ms(l.p99_us),
            ratio(l.p99_us as f64, base.map(|b| b.p99_us as f64)),
            ms(l.p999_us),
            ms(l.max_us),
            format!(
                "{} ({})",
                thousands(h.others_rate),
                thousands(h.others_offered)
            ),
            o.cpu_secs,
            o.peak_rss_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(
        w,
        "{:<24} {:>5} {:>8} {:>14} {:>9} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>7}",
        "",
        "cap",
        "hot≤",
        "hot/s (sent)",
        "hot p50",
        "hot p99",
        "slots≤",
        "waiting≤",
        "paused≤",
        "others s",
        "drain s",
        "CPU s"
    );
    for (s, _, _, h) in &rows {
        let _ = writeln!(
            w,
            "{:<24} {:>5} {:>8} {:>14} {:>9.2} {:>9.2} {:>7} {:>9} {:>8} {:>8.2} {:>8.2} {:>7.2}",
            s.label(),
            h.cap.map_or("—".into(), |c| c.to_string()),
            h.hot_at_once,
            format!("{} ({})", thousands(h.hot_rate), thousands(h.hot_offered)),
            ms(h.hot_p50_us),
            ms(h.hot_p99_us),
            h.running_max,
            thousands(h.waiting_max as f64),
            h.paused_max,
            h.others_done_secs,
            h.drain_secs,
            h.drain_cpu_secs
        );
        if h.duplicates > 0 {
            let _ = writeln!(
                w,
                "  {}: {} records delivered twice",
                s.label(),
                h.duplicates
            );
        }
    }
    if let (Some(b), Some(c)) = (
        base,
        get(Scenario::DestHotCapped).and_then(|o| o.latency.as_ref()),
    ) {
        let _ = writeln!(
            w,
            "  the other destinations, capped / no cap: p50 {} ({:.2} vs {:.2} ms), p99 {} ({:.2} vs {:.2} ms)",
            ratio(c.p50_us as f64, Some(b.p50_us as f64)),
            ms(c.p50_us),
            ms(b.p50_us),
            ratio(c.p99_us as f64, Some(b.p99_us as f64)),
            ms(c.p99_us),
            ms(b.p99_us)
        );
    }
    if let Some((_, _, l, h)) = rows.iter().find(|(s, ..)| *s == Scenario::DestHotRetry) {
        let _ = writeln!(
            w,
            "  retries: {} first attempts failed; the {} records of the others delivered by a \
             retry: p50 {:.2} ms, p99 {:.2} ms (back-off included); at the first attempt: p50 \
             {:.2} ms, p99 {:.2} ms; destinations open ≤ {}",
            thousands(h.failed_first as f64),
            thousands(h.retried_samples as f64),
            ms(h.retried_p50_us),
            ms(h.retried_p99_us),
            ms(l.p50_us),
            ms(l.p99_us),
            h.open_max
        );
    }
    let _ = writeln!(
        w,
        "  (lag ms: the producer behind its schedule, worst; others/s, hot/s: calls that \
         delivered started within the measured phase, per second; hot≤: the most calls to the \
         hot destination at once, counted in the handler; slots≤, waiting≤, paused≤: the most \
         in-flight slots taken, records waiting without one (for the cap or a back-off) and \
         partitions paused, sampled every 100 ms; others s: from the last send to every record \
         of the others delivered; drain s, CPU s: from then to every record delivered, and the \
         process's CPU meanwhile; the first CPU s: the process, until the others are done)"
    );
}
