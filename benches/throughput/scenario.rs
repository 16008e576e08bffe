//! The scenarios: what each is called on the command line and in the table, and which kind
//! (drain, slow handler, latency) it is.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Raw,
    Kourier,
    Redis,
    DeadLetter,
    SlowPartition,
    SlowKey,
    LatencyRaw,
    Latency,
}

impl Scenario {
    pub(crate) const ALL: [Scenario; 8] = [
        Scenario::Raw,
        Scenario::Kourier,
        Scenario::Redis,
        Scenario::DeadLetter,
        Scenario::SlowPartition,
        Scenario::SlowKey,
        Scenario::LatencyRaw,
        Scenario::Latency,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Raw => "a",
            Scenario::Kourier => "b",
            Scenario::Redis => "c",
            Scenario::DeadLetter => "d",
            Scenario::SlowPartition => "slow-partition",
            Scenario::SlowKey => "slow-key",
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
            Scenario::SlowPartition => "Partition (1 in flight/partition)",
            Scenario::SlowKey => "Key (max in flight 500)",
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
            Scenario::Raw | Scenario::Kourier | Scenario::Redis | Scenario::DeadLetter
        )
    }

    pub(crate) fn is_slow(self) -> bool {
        matches!(self, Scenario::SlowPartition | Scenario::SlowKey)
    }

    pub(crate) fn is_latency(self) -> bool {
        matches!(self, Scenario::LatencyRaw | Scenario::Latency)
    }
}
