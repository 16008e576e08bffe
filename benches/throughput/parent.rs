//! The parent process: creates the topics, pre-produces, runs each scenario in a child process
//! of its own (so CPU time and peak RSS are per scenario), deletes the topics, prints the table.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::args::Args;
use crate::measure::{Outcome, Results, load_average, machine};
use crate::produce::{Produced, pre_produce};
use crate::scenario::Scenario;
use crate::services::{create_topics, delete_topics, log_end, require_kafka, require_redis};
use crate::table::{print_table, thousands};
use crate::{BoxResult, PARTITIONS, SLOW_KEYS};

fn run_child_process(
    args: &Args,
    scenario: Scenario,
    topic: &str,
    topic_records: u64,
    run_id: &str,
) -> BoxResult<Outcome> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["--scenario", scenario.name(), "--topic", topic])
        .args(["--topic-records", &topic_records.to_string()])
        .args(["--run-id", run_id])
        .args(["--records", &args.records.to_string()])
        .args(["--size", &args.size.to_string()])
        .args(["--latency-rate", &args.latency_rate.to_string()])
        .args(["--latency-secs", &args.latency_secs.to_string()])
        .args(["--hot-rate", &args.hot_rate.to_string()])
        .args(["--slow-records", &args.slow_records.to_string()])
        .args([
            "--slow-partition-records",
            &args.slow_partition_records.to_string(),
        ]);
    if args.quick {
        cmd.arg("--quick");
    }
    if args.smoke {
        cmd.arg("--smoke");
    }
    if args.timeline {
        cmd.arg("--timeline");
    }
    if args.floor_claim_script {
        cmd.arg("--floor-claim-script");
    }
    if args.dest_down_at_start {
        cmd.arg("--dest-down-at-start");
    }
    if args.park {
        cmd.arg("--park");
    }
    if let Some(n) = args.uncommitted_per_partition {
        cmd.args(["--uncommitted-per-partition", &n.to_string()]);
    }
    for (k, v) in &args.consumer_config {
        cmd.args(["--consumer-config", &format!("{k}={v}")]);
    }
    if let Some(n) = args.buffer_records {
        cmd.args(["--buffer-records", &n.to_string()]);
    }
    if let Some(n) = args.partition_buffer {
        cmd.args(["--partition-buffer", &n.to_string()]);
    }
    if let Some(o) = &args.ordering {
        cmd.args(["--ordering", o]);
    }
    if let Some(n) = args.max_in_flight {
        cmd.args(["--max-in-flight", &n.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut stdout)?;
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("scenario {} failed ({status})", scenario.name()).into());
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| format!("scenario {} printed no result", scenario.name()))?;
    Ok(serde_json::from_str(line)?)
}

pub(crate) fn run_parent(args: &Args) -> BoxResult<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    require_kafka()?;
    if args.scenarios.contains(&Scenario::Redis) || args.scenarios.contains(&Scenario::RedisFloor) {
        rt.block_on(require_redis())?;
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let run_id = format!("{}-{}", std::process::id(), nanos % 1_000_000_000_000);
    let load_start = load_average();
    eprintln!("throughput: run {run_id}; {}", machine());

    let drain_topic = format!("kourier-bench-{run_id}-drain");
    let slow_topic = format!("kourier-bench-{run_id}-slow");
    let mut topics: Vec<(String, i32)> = Vec::new();
    let wants = |f: fn(Scenario) -> bool| args.scenarios.iter().any(|s| f(*s));
    if wants(Scenario::is_drain) {
        topics.push((drain_topic.clone(), PARTITIONS));
        topics.push((format!("{drain_topic}.dlt"), PARTITIONS));
    }
    if wants(Scenario::is_slow) {
        topics.push((slow_topic.clone(), 1));
        topics.push((format!("{slow_topic}.dlt"), 1));
    }
    for s in args.scenarios.iter().filter(|s| s.has_own_topic()) {
        let t = format!("kourier-bench-{run_id}-{}", s.name());
        topics.push((format!("{t}.dlt"), PARTITIONS));
        topics.push((t, PARTITIONS));
    }
    rt.block_on(create_topics(&topics))?;

    let result = run_scenarios(args, &run_id, &drain_topic, &slow_topic);
    if !args.keep_topics {
        let names: Vec<String> = topics.into_iter().map(|(t, _)| t).collect();
        if let Err(e) = rt.block_on(delete_topics(&names)) {
            eprintln!("warning: could not delete this run's topics: {e}");
        }
    }
    let (produced, results, failures) = result?;
    print_table(
        args,
        &run_id,
        &drain_topic,
        &produced,
        &results,
        &load_start,
    );
    if failures > 0 {
        return Err(format!("{failures} scenario(s) failed").into());
    }
    Ok(())
}

/// Pre-produces and runs every scenario; a failed scenario is reported and skipped.
fn run_scenarios(
    args: &Args,
    run_id: &str,
    drain_topic: &str,
    slow_topic: &str,
) -> BoxResult<(Option<Produced>, Results, usize)> {
    let wants = |f: fn(Scenario) -> bool| args.scenarios.iter().any(|s| f(*s));
    let mut produced = None;
    if wants(Scenario::is_drain) {
        eprintln!(
            "throughput: pre-producing {} records × {} B to {drain_topic}",
            thousands(args.records as f64),
            args.size
        );
        let p = pre_produce(
            drain_topic,
            args.records,
            args.size,
            PARTITIONS,
            10_000,
            &args.compression,
            run_id,
        )?;
        let in_log = log_end(drain_topic, PARTITIONS)?;
        if in_log != args.records {
            return Err(format!("{in_log} records in the log, expected {}", args.records).into());
        }
        produced = Some(p);
    }
    if wants(Scenario::is_slow) {
        let n = args.slow_records.max(args.slow_partition_records);
        eprintln!("throughput: pre-producing {n} records over {SLOW_KEYS} keys to {slow_topic}");
        pre_produce(
            slow_topic,
            n,
            args.size,
            1,
            SLOW_KEYS,
            &args.compression,
            run_id,
        )?;
    }
    let mut results = Vec::new();
    let mut failures = 0;
    for &scenario in &args.scenarios {
        let (topic, topic_records) = if scenario.is_drain() {
            (drain_topic.to_owned(), args.records)
        } else if scenario.is_slow() {
            let n = args.slow_records.max(args.slow_partition_records);
            (slow_topic.to_owned(), n)
        } else {
            (format!("kourier-bench-{run_id}-{}", scenario.name()), 0)
        };
        eprintln!(
            "throughput: scenario {} ({}) …",
            scenario.name(),
            scenario.label()
        );
        match run_child_process(args, scenario, &topic, topic_records, run_id) {
            Ok(outcome) => results.push((scenario, outcome)),
            Err(e) => {
                eprintln!("throughput: {e}");
                failures += 1;
            }
        }
    }
    Ok((produced, results, failures))
}
