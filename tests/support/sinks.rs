//! Dead-letter sinks for tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use kourier::{
    DeadLetter, DeadLetterError, DeadLetterReceipt, DeadLetterSink, KafkaDeadLetterSink,
    PendingLetter, async_trait,
};

/// A custom sink wrapping the Kafka sink to count letters (`send` and `enqueue`): every
/// trait method is required, so it says what it does with each — here it forwards them all,
/// `topics_for` included.
#[derive(Debug)]
pub(crate) struct CountingSink {
    pub(crate) inner: KafkaDeadLetterSink,
    pub(crate) letters: Arc<AtomicU32>,
}

impl CountingSink {
    pub(crate) fn new(inner: KafkaDeadLetterSink) -> Self {
        CountingSink {
            inner,
            letters: Arc::default(),
        }
    }
}

#[async_trait]
impl DeadLetterSink for CountingSink {
    async fn send(&self, letter: &DeadLetter) -> Result<DeadLetterReceipt, DeadLetterError> {
        self.letters.fetch_add(1, Ordering::SeqCst);
        self.inner.send(letter).await
    }
    async fn enqueue<'a>(&'a self, letter: &'a DeadLetter) -> PendingLetter<'a> {
        self.letters.fetch_add(1, Ordering::SeqCst);
        self.inner.enqueue(letter).await
    }
    fn topics_for(&self, source_topic: &str) -> Vec<String> {
        self.inner.topics_for(source_topic)
    }
}
