//! The scenarios: what each is called on the command line and in the table, which kind
//! (drain, slow handler, latency, destinations, hot destination) it is, and which run by
//! default.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Raw,
    /// (a1): the floor of (b), the raw loop reading what a handler is given: each record's
    /// headers (librdkafka parses them) and its value decoded.
    RawRead,
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
    /// 1,000 destinations, a breaker per destination, none down.
    DestUp,
    /// The same with 20 of them down for the whole run.
    DestDown,
    /// The same with every destination down for a few seconds.
    DestAllDown,
    /// Half the records to one slow destination, no cap: the baseline.
    DestHot,
    /// The same with a cap per destination (`Destinations::with_max_in_flight`).
    DestHotCapped,
    /// The capped one with the first attempt of some of the other destinations' records
    /// failing transiently.
    DestHotRetry,
}

impl Scenario {
    /// What `--scenarios` accepts.
    pub(crate) const ALL: [Scenario; 19] = [
        Scenario::Raw,
        Scenario::RawRead,
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
        Scenario::DestUp,
        Scenario::DestDown,
        Scenario::DestAllDown,
        Scenario::DestHot,
        Scenario::DestHotCapped,
        Scenario::DestHotRetry,
    ];

    /// What runs without `--scenarios`: every scenario but the destination and hot ones.
    pub(crate) const DEFAULT: [Scenario; 13] = [
        Scenario::Raw,
        Scenario::RawRead,
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

    /// What `--scenarios destinations` stands for.
    pub(crate) const DESTINATIONS: [Scenario; 3] =
        [Scenario::DestUp, Scenario::DestDown, Scenario::DestAllDown];

    /// What `--scenarios hot` stands for.
    pub(crate) const HOT: [Scenario; 3] = [
        Scenario::DestHot,
        Scenario::DestHotCapped,
        Scenario::DestHotRetry,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Raw => "a",
            Scenario::RawRead => "a1",
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
            Scenario::DestUp => "dest-up",
            Scenario::DestDown => "dest-down",
            Scenario::DestAllDown => "dest-all-down",
            Scenario::DestHot => "dest-hot",
            Scenario::DestHotCapped => "dest-hot-capped",
            Scenario::DestHotRetry => "dest-hot-retry",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Scenario::Raw => "(a) raw rdkafka BaseConsumer",
            Scenario::RawRead => "(a1) raw + headers read, decoded",
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
            Scenario::DestUp => "none down",
            Scenario::DestDown => "20 of 1,000 down",
            Scenario::DestAllDown => "all down for 3 s",
            Scenario::DestHot => "hot, no cap",
            Scenario::DestHotCapped => "hot, capped",
            Scenario::DestHotRetry => "hot, capped, retries",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    pub(crate) fn is_drain(self) -> bool {
        matches!(
            self,
            Scenario::Raw
                | Scenario::RawRead
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

    pub(crate) fn is_destinations(self) -> bool {
        matches!(
            self,
            Scenario::DestUp | Scenario::DestDown | Scenario::DestAllDown
        )
    }

    pub(crate) fn is_hot(self) -> bool {
        matches!(
            self,
            Scenario::DestHot | Scenario::DestHotCapped | Scenario::DestHotRetry
        )
    }

    /// Reads a topic of its own that it produces to as it runs (latency, destinations, hot
    /// destination).
    pub(crate) fn has_own_topic(self) -> bool {
        self.is_latency() || self.is_destinations() || self.is_hot()
    }
}
