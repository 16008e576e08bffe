//! The scenarios: what each is called on the command line and in the table, and which kind
//! (drain, slow handler, latency) it is.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Raw,
    Kourier,
    Redis,
    DeadLetter,
    /// (c0): the floor of (c), the raw loop plus the same Redis work by hand.
    RedisFloor,
    /// (d0): the floor of (d), the raw loop plus the same dead letters by hand.
    DeadLetterFloor,
    SlowPartition,
    SlowKey,
    /// (e0): Key order, 10 ms handler, default `max_in_flight`, no failures.
    RetryBase,
    /// (e): (e0) with 5 % of first attempts failing transiently (500 ms back-off).
    Retry,
    LatencyRaw,
    Latency,
}

impl Scenario {
    pub(crate) const ALL: [Scenario; 12] = [
        Scenario::Raw,
        Scenario::Kourier,
        Scenario::RedisFloor,
        Scenario::Redis,
        Scenario::DeadLetterFloor,
        Scenario::DeadLetter,
        Scenario::SlowPartition,
        Scenario::SlowKey,
        Scenario::RetryBase,
        Scenario::Retry,
        Scenario::LatencyRaw,
        Scenario::Latency,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Raw => "a",
            Scenario::Kourier => "b",
            Scenario::Redis => "c",
            Scenario::DeadLetter => "d",
            Scenario::RedisFloor => "c0",
            Scenario::DeadLetterFloor => "d0",
            Scenario::SlowPartition => "slow-partition",
            Scenario::SlowKey => "slow-key",
            Scenario::RetryBase => "e0",
            Scenario::Retry => "e",
            Scenario::LatencyRaw => "latency-raw",
            Scenario::Latency => "latency",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Scenario::Raw => "(a) raw rdkafka BaseConsumer",
            Scenario::Kourier => "(b) kourier, no-op, Partition",
            Scenario::Redis => "(c) kourier + Redis idempotency",
            Scenario::DeadLetter => "(d) kourier, 1% permanent → DLT",
            Scenario::RedisFloor => "(c0) raw + Redis claim/complete",
            Scenario::DeadLetterFloor => "(d0) raw + 1% produced to DLT",
            Scenario::SlowPartition => "Partition (1 in flight/partition)",
            Scenario::SlowKey => "Key (max in flight 500)",
            Scenario::RetryBase => "(e0) Key, max in flight 64",
            Scenario::Retry => "(e) (e0) + 5% transient, 500 ms",
            Scenario::LatencyRaw => "raw rdkafka BaseConsumer",
            Scenario::Latency => "kourier, no-op, Partition",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    pub(crate) fn is_drain(self) -> bool {
        matches!(
            self,
            Scenario::Raw
                | Scenario::Kourier
                | Scenario::Redis
                | Scenario::DeadLetter
                | Scenario::RedisFloor
                | Scenario::DeadLetterFloor
        )
    }

    pub(crate) fn is_slow(self) -> bool {
        matches!(
            self,
            Scenario::SlowPartition | Scenario::SlowKey | Scenario::RetryBase | Scenario::Retry
        )
    }

    pub(crate) fn is_latency(self) -> bool {
        matches!(self, Scenario::LatencyRaw | Scenario::Latency)
    }
}
