//! The command line: the run's settings, or (in a child process) the one scenario to run.

use crate::scenario::Scenario;

const USAGE: &str = "\
usage: throughput [--quick|--smoke] [--records N] [--size BYTES] [--scenarios LIST]
                  [--compression none|lz4|...] [--latency-rate N] [--latency-secs S]
                  [--slow-records N] [--slow-partition-records N] [--keep-topics]
                  [--consumer-config KEY=VALUE]... [--buffer-records N] [--partition-buffer N]
                  [--ordering partition|key|unordered] [--max-in-flight N] [--timeline]
                  [--floor-claim-script] [--uncommitted-per-partition N] [--dest-down-at-start] [--park]
                  [--hot-rate N]

  --records N          records of the drain scenarios a-d, a1, c0, d0 (default 1000000; --quick 50000)
  --size BYTES         value size (default 100)
  --scenarios LIST     comma-separated, from: a,a1,b,c0,c,d0,d,slow-partition,slow-key,e0,e,
                       latency-raw,latency (the default: these, in that order) and
                       dest-up,dest-down,dest-all-down (run only when named; `destinations`
                       stands for the three) and dest-hot,dest-hot-capped,dest-hot-retry (run
                       only when named; `hot` stands for the three)
  --quick              a reduced run (CI smoke check): 50,000 records, 3 s latency phase, slow
                       handler on 5,000 (Key) and 100 (Partition) records
  --smoke              a tiny run (what `cargo test --all-targets` does with this binary):
                       2,000 records, 1 s latency phase at 1,000/s; figures are meaningless
  --compression C      producer compression.codec for pre-production (default none)
  --latency-rate N     offered rate of the latency and destination scenarios, records/s
                       (default 5000)
  --latency-secs S     measured seconds of the latency and destination scenarios (default 20;
                       --quick 3; dest-all-down and the hot ones at most 10)
  --slow-records N     records of the slow-handler Key scenario (default 20000)
  --slow-partition-records N
                       records of the slow-handler Partition scenario (default 1000)
  --keep-topics        do not delete this run's topics at the end
  --consumer-config KEY=VALUE
                       a librdkafka consumer property for every consumer, raw and kourier
                       (repeatable), e.g. fetch.wait.max.ms=10
  --buffer-records N   kourier's max_buffered_records (default: kourier's, 10000)
  --partition-buffer N kourier's max_buffered_records_per_partition (default: kourier's, 2000)
  --ordering O         kourier's ordering in scenarios b, c, d and latency (default partition;
                       the slow-handler scenarios always compare Partition with Key)
  --max-in-flight N    kourier's max_in_flight in scenarios b, c, d, latency and the destination
                       ones (default 64)
  --timeline           print each latency and destination scenario's mean and max latency per
                       second (stderr)
  --floor-claim-script (c0) claims each batch with kourier's claim script (one call) instead
                       of a pipeline of SET NX PX: the same commands for the server as (c)
  --uncommitted-per-partition N
                       kourier's max_uncommitted_per_partition (default: kourier's, 10000; the
                       destination scenarios: the run's record count, so that records waiting
                       for their destination never pause a partition)
  --dest-down-at-start dest-down: the 20 destinations are down from the consumer's start, not
                       from the end of the warm-up
  --park               the destination scenarios park waiting records in a retry tier (1 s,
                       with key order, in-memory ledger; park after 5 s) and keep kourier's
                       max_uncommitted_per_partition (10000) unless told otherwise
  --hot-rate N         offered rate of the hot-destination scenarios, records/s, half of them
                       to the hot destination (default 1000; --smoke 200)";

#[derive(Debug, Clone)]
pub(crate) struct Args {
    pub(crate) quick: bool,
    pub(crate) smoke: bool,
    pub(crate) records: u64,
    pub(crate) size: usize,
    pub(crate) scenarios: Vec<Scenario>,
    pub(crate) compression: String,
    pub(crate) latency_rate: u64,
    pub(crate) latency_secs: u64,
    pub(crate) slow_records: u64,
    pub(crate) slow_partition_records: u64,
    pub(crate) keep_topics: bool,
    pub(crate) timeline: bool,
    pub(crate) floor_claim_script: bool,
    pub(crate) consumer_config: Vec<(String, String)>,
    pub(crate) buffer_records: Option<u64>,
    pub(crate) partition_buffer: Option<u64>,
    pub(crate) ordering: Option<String>,
    pub(crate) max_in_flight: Option<u64>,
    pub(crate) uncommitted_per_partition: Option<u64>,
    pub(crate) dest_down_at_start: bool,
    pub(crate) park: bool,
    pub(crate) hot_rate: u64,
    pub(crate) child: Option<ChildArgs>,
}

/// What a child process runs: one scenario on an existing topic.
#[derive(Debug, Clone)]
pub(crate) struct ChildArgs {
    pub(crate) scenario: Scenario,
    pub(crate) topic: String,
    /// Records in the topic (the scenario may stop earlier: see `records`).
    pub(crate) topic_records: u64,
    pub(crate) run_id: String,
}

pub(crate) fn parse_args() -> Result<Args, String> {
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`. `cargo test --all-targets` runs this binary too (a debug
    // build, no `--bench`, perhaps libtest flags or a test-name filter): then it makes only a
    // smoke run, or none when a filter is given, so the test suite stays fast.
    let under_bench = raw.iter().any(|a| a == "--bench");
    let is_child = raw.iter().any(|a| a == "--scenario");
    if !under_bench && !is_child {
        if let Some(filter) = raw.iter().find(|a| !a.starts_with('-')) {
            // Like libtest with a filter that matches nothing: run nothing, succeed.
            println!(
                "throughput: not run (test filter {filter:?}); run it with `cargo bench --bench throughput`"
            );
            std::process::exit(0);
        }
        raw = vec!["--smoke".into()];
    }
    raw.retain(|a| a != "--bench");
    let smoke = raw.iter().any(|a| a == "--smoke");
    let quick = smoke || raw.iter().any(|a| a == "--quick");
    let pick = |smoke_value: u64, quick_value: u64, full: u64| {
        if smoke {
            smoke_value
        } else if quick {
            quick_value
        } else {
            full
        }
    };
    let mut args = Args {
        quick,
        smoke,
        records: pick(2_000, 50_000, 1_000_000),
        size: 100,
        scenarios: Scenario::DEFAULT.to_vec(),
        compression: "none".into(),
        latency_rate: pick(1_000, 5_000, 5_000),
        latency_secs: pick(1, 3, 20),
        slow_records: pick(500, 5_000, 20_000),
        slow_partition_records: pick(20, 100, 1_000),
        keep_topics: false,
        timeline: false,
        floor_claim_script: false,
        consumer_config: Vec::new(),
        buffer_records: None,
        partition_buffer: None,
        ordering: None,
        max_in_flight: None,
        uncommitted_per_partition: None,
        dest_down_at_start: false,
        park: false,
        hot_rate: pick(200, 1_000, 1_000),
        child: None,
    };
    let (mut scenario, mut topic, mut topic_records, mut run_id) = (None, None, None, None);
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| -> Result<u64, String> {
            v.replace('_', "")
                .parse()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--quick" | "--smoke" => {}
            "--keep-topics" => args.keep_topics = true,
            "--timeline" => args.timeline = true,
            "--floor-claim-script" => args.floor_claim_script = true,
            "--dest-down-at-start" => args.dest_down_at_start = true,
            "--park" => args.park = true,
            "--uncommitted-per-partition" => {
                args.uncommitted_per_partition = Some(number(&flag, value(&flag)?)?);
            }
            "--consumer-config" => {
                let v = value(&flag)?;
                let (k, v) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--consumer-config: {v:?} is not KEY=VALUE"))?;
                args.consumer_config.push((k.to_owned(), v.to_owned()));
            }
            "--ordering" => {
                let v = value(&flag)?;
                if !matches!(v.as_str(), "partition" | "key" | "unordered") {
                    return Err(format!(
                        "--ordering: {v:?} is not partition, key or unordered"
                    ));
                }
                args.ordering = Some(v);
            }
            "--max-in-flight" => args.max_in_flight = Some(number(&flag, value(&flag)?)?),
            "--buffer-records" => args.buffer_records = Some(number(&flag, value(&flag)?)?),
            "--partition-buffer" => args.partition_buffer = Some(number(&flag, value(&flag)?)?),
            "--records" => args.records = number(&flag, value(&flag)?)?,
            "--size" => args.size = number(&flag, value(&flag)?)? as usize,
            "--compression" => args.compression = value(&flag)?,
            "--latency-rate" => args.latency_rate = number(&flag, value(&flag)?)?,
            "--latency-secs" => args.latency_secs = number(&flag, value(&flag)?)?,
            "--hot-rate" => args.hot_rate = number(&flag, value(&flag)?)?,
            "--slow-records" => args.slow_records = number(&flag, value(&flag)?)?,
            "--slow-partition-records" => {
                args.slow_partition_records = number(&flag, value(&flag)?)?;
            }
            "--scenarios" => {
                args.scenarios.clear();
                for s in value(&flag)?.split(',').filter(|s| !s.is_empty()) {
                    if s == "destinations" {
                        args.scenarios.extend(Scenario::DESTINATIONS);
                    } else if s == "hot" {
                        args.scenarios.extend(Scenario::HOT);
                    } else {
                        let scenario =
                            Scenario::parse(s).ok_or_else(|| format!("unknown scenario {s:?}"))?;
                        args.scenarios.push(scenario);
                    }
                }
            }
            "--scenario" => {
                let v = value(&flag)?;
                scenario =
                    Some(Scenario::parse(&v).ok_or_else(|| format!("unknown scenario {v:?}"))?);
            }
            "--topic" => topic = Some(value(&flag)?),
            "--topic-records" => topic_records = Some(number(&flag, value(&flag)?)?),
            "--run-id" => run_id = Some(value(&flag)?),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.records == 0 || args.slow_records == 0 || args.slow_partition_records == 0 {
        return Err("record counts must be at least 1".into());
    }
    if args.latency_rate == 0 || args.latency_secs == 0 || args.hot_rate == 0 {
        return Err("--latency-rate, --latency-secs and --hot-rate must be at least 1".into());
    }
    if args.scenarios.is_empty() {
        return Err("--scenarios: nothing to run".into());
    }
    if let Some(scenario) = scenario {
        args.child = Some(ChildArgs {
            scenario,
            topic: topic.ok_or("--scenario needs --topic")?,
            topic_records: topic_records.ok_or("--scenario needs --topic-records")?,
            run_id: run_id.ok_or("--scenario needs --run-id")?,
        });
    }
    Ok(args)
}
