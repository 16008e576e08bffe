//! Kafka dead-letter topic sink (placeholder, being written).
/// Placeholder.
#[derive(Debug)]
pub struct KafkaDeadLetterSink;
/// Placeholder.
#[derive(Debug)]
pub struct KafkaDeadLetterSinkBuilder;
