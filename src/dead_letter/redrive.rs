//! Publishing a dead letter again: [`RedriveRecord`].

use super::headers;
use super::headers::redrive_count;
use crate::record::{Header, Headers, RawRecord};

/// A dead letter made ready to be published again ("redriven"): the original key, value and
/// headers (names and values byte for byte), **minus** the provenance headers ([`headers::ALL`]) and any
/// retry-tier headers ([`tiers::headers::ALL`](headers::tier::ALL)), **plus**
/// [`headers::REDRIVE_COUNT`] one higher than the letter's and [`headers::REDRIVEN_FROM`]
/// naming the letter (`<dead-letter topic>/<partition>@<offset>`), both replacing any the
/// letter carried.
///
/// The record goes to the letter's original topic unless another is given. Its headers keep
/// everything else the original record carried, e.g. an event id to deduplicate on and the
/// W3C `traceparent`, so the redriven record continues the original trace. The consumer's
/// dedup key of the redriven record is the event's key at the new redrive count (`#r1` for a
/// first redrive): every redrive of a letter at one count — two runs of one redrive, or
/// letters of one event written twice after a crash — is one delivery, handled once when the
/// consumer has an idempotency store (see
/// [`idempotency`](crate::idempotency#deliveries-of-one-event-delivery-rule-18)). A consumer that
/// dead-letters it again keeps the redrive count, which is how a redrive tool can refuse to
/// loop a record forever (the `kourier-dlt` tool does, above `--max-redrives`).
///
/// ```
/// use kourier::dead_letter::{headers, RedriveRecord};
/// use kourier::{Headers, RawRecord};
///
/// let letter = RawRecord::builder("notify.v1.dlt")
///     .offset(7)
///     .key("u-1")
///     .value(r#"{"id":1}"#)
///     .header("event-id", "e-1")
///     .header(headers::ORIGINAL_TOPIC, "notify.v1")
///     .header(headers::FAILURE_KIND, "permanent")
///     .build();
/// let redrive = RedriveRecord::from_dead_letter(&letter, None)?;
/// assert_eq!(redrive.topic, "notify.v1");
/// assert_eq!(
///     redrive.headers,
///     Headers::new()
///         .with("event-id", "e-1")
///         .with(headers::REDRIVE_COUNT, "1")
///         .with(headers::REDRIVEN_FROM, "notify.v1.dlt/0@7"),
/// );
/// assert_eq!(redrive.redrive_count, 1);
/// # Ok::<(), kourier::dead_letter::RedriveError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveRecord {
    /// Where to publish it.
    pub topic: String,
    /// The original key (`None` for a null key).
    pub key: Option<Vec<u8>>,
    /// The original value (`None` for a null value, which includes a metadata-only letter's
    /// dropped value: check [`Provenance::value_dropped_bytes`](super::Provenance) first).
    pub value: Option<Vec<u8>>,
    /// The original headers without provenance, then the new redrive count and where it was
    /// redriven from.
    pub headers: Headers,
    /// The redrive count written to [`headers::REDRIVE_COUNT`].
    pub redrive_count: u32,
}

/// A dead letter cannot be redriven.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedriveError {
    /// The letter does not name its original topic, and no destination was given.
    #[error(
        "dead letter {coordinates} has no {} header: give a destination topic",
        headers::ORIGINAL_TOPIC
    )]
    NoDestination {
        /// The letter's `topic/partition@offset` in the dead-letter topic.
        coordinates: String,
    },
    /// The destination (the letter's [`headers::ORIGINAL_TOPIC`], or the one given) is not a
    /// valid topic name: the header is untrusted input (delivery rule 17 in the crate docs).
    #[error("dead letter {coordinates}: cannot redrive to {topic}: {reason}")]
    InvalidDestination {
        /// The letter's `topic/partition@offset` in the dead-letter topic.
        coordinates: String,
        /// The destination as given, escaped and cut to 100 characters.
        topic: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl RedriveRecord {
    /// Builds the record that redrives `letter` (a record read from a dead-letter topic, e.g.
    /// with [`RawRecord::from_message`]) to `destination`, or to its original topic when
    /// `destination` is `None`.
    ///
    /// # Errors
    /// [`RedriveError::NoDestination`] when `destination` is `None` and the letter has no
    /// [`headers::ORIGINAL_TOPIC`]; [`RedriveError::InvalidDestination`] when the destination
    /// is not a valid topic name (1 to 249 of `a-z A-Z 0-9 . _ -`).
    ///
    /// The letter's headers are untrusted: the original topic is checked, a malformed
    /// [`headers::REDRIVE_COUNT`] counts as `u32::MAX` (see
    /// [`Provenance`](super::Provenance)), and the new count saturates rather than wraps.
    /// Never panics.
    pub fn from_dead_letter(
        letter: &RawRecord,
        destination: Option<&str>,
    ) -> Result<RedriveRecord, RedriveError> {
        let topic = match destination {
            Some(topic) => topic.to_owned(),
            None => letter
                .headers
                .get_str(headers::ORIGINAL_TOPIC)
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| RedriveError::NoDestination {
                    coordinates: letter.coordinates(),
                })?,
        };
        if crate::topic_name::check(&topic).is_err() {
            return Err(RedriveError::InvalidDestination {
                coordinates: letter.coordinates(),
                topic: headers::shown(topic.as_bytes()),
                reason: "not a valid topic name (1 to 249 of a-z A-Z 0-9 . _ -)".into(),
            });
        }
        let count = redrive_count(&letter.headers).saturating_add(1);
        let mut out: Headers = letter
            .headers
            .iter()
            .filter(|h| {
                !headers::is_provenance(&h.key)
                    && !h.is_named(headers::REDRIVE_COUNT)
                    && !h.is_named(headers::REDRIVEN_FROM)
                    && !headers::tier::ALL.iter().any(|n| h.is_named(n))
            })
            .cloned()
            .collect();
        out.push(Header::new(headers::REDRIVE_COUNT, count.to_string()));
        out.push(Header::new(headers::REDRIVEN_FROM, letter.coordinates()));
        Ok(RedriveRecord {
            topic,
            key: letter.key.as_deref().map(<[u8]>::to_vec),
            value: letter.value.as_deref().map(<[u8]>::to_vec),
            headers: out,
            redrive_count: count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(headers: Headers) -> RawRecord {
        RawRecord {
            topic: "t.dlt".into(),
            partition: 1,
            offset: 9,
            key: None,
            value: None,
            headers,
            timestamp: Some(1),
            log_append_time: false,
        }
    }

    #[test]
    fn strips_every_provenance_header_and_counts_redrives() {
        let mut h = Headers::new().with("traceparent", "tp");
        for name in headers::ALL {
            h.push(Header::new(*name, "x"));
        }
        h.push(Header::new(headers::ORIGINAL_TOPIC, "t"));
        h.push(Header::new(headers::REDRIVE_COUNT, "2"));
        h.push(Header::new(headers::REDRIVEN_FROM, "older.dlt/0@1"));
        h.push(Header::null("null-valued"));
        let r = RedriveRecord::from_dead_letter(&letter(h), None).unwrap();
        assert_eq!(r.topic, "t", "the last original-topic header counts");
        assert_eq!(r.redrive_count, 3);
        assert_eq!(
            r.headers,
            Headers::from_iter([
                Header::new("traceparent", "tp"),
                Header::null("null-valued"),
                Header::new(headers::REDRIVE_COUNT, "3"),
                Header::new(headers::REDRIVEN_FROM, "t.dlt/1@9"),
            ])
        );
        assert_eq!((r.key, r.value), (None, None), "null stays null");
    }

    #[test]
    fn a_destination_is_needed_without_original_topic() {
        let err = RedriveRecord::from_dead_letter(&letter(Headers::new()), None).unwrap_err();
        assert_eq!(
            err,
            RedriveError::NoDestination {
                coordinates: "t.dlt/1@9".into()
            }
        );
        let r = RedriveRecord::from_dead_letter(&letter(Headers::new()), Some("other")).unwrap();
        assert_eq!((r.topic.as_str(), r.redrive_count), ("other", 1));
    }

    #[test]
    fn an_invalid_destination_is_refused() {
        let h = Headers::new().with(headers::ORIGINAL_TOPIC, "no such/topic\x1b");
        let err = RedriveRecord::from_dead_letter(&letter(h), None).unwrap_err();
        assert!(
            matches!(&err, RedriveError::InvalidDestination { topic, .. } if topic == "`no such/topic\\u{1b}`"),
            "{err:?}"
        );
        let long = "x".repeat(300);
        let err =
            RedriveRecord::from_dead_letter(&letter(Headers::new()), Some(&long)).unwrap_err();
        assert!(err.to_string().contains("(300 bytes)"), "{err}");
    }

    #[test]
    fn a_huge_or_malformed_redrive_count_saturates() {
        for count in ["99999999999", "4294967295", "junk"] {
            let h = Headers::new()
                .with(headers::ORIGINAL_TOPIC, "t")
                .with(headers::REDRIVE_COUNT, count);
            let r = RedriveRecord::from_dead_letter(&letter(h), None).unwrap();
            assert_eq!(r.redrive_count, u32::MAX, "{count}");
            assert_eq!(
                r.headers.get_str(headers::REDRIVE_COUNT),
                Some("4294967295")
            );
        }
    }

    proptest::proptest! {
        /// Whatever the letter's headers: no panic; a redrive carries no provenance or tier
        /// header, exactly one redrive count, never lower than the letter's, and goes to a
        /// valid topic name.
        #[test]
        fn any_letter_redrives_or_is_refused_cleanly(
            h in crate::dead_letter::headers::tests::arbitrary_headers(),
            destination in proptest::option::of("[a-z./ ]{0,8}"),
        ) {
            let before = redrive_count(&h);
            match RedriveRecord::from_dead_letter(&letter(h), destination.as_deref()) {
                Ok(r) => {
                    proptest::prop_assert!(crate::topic_name::check(&r.topic).is_ok());
                    proptest::prop_assert_eq!(r.redrive_count, before.saturating_add(1));
                    proptest::prop_assert_eq!(r.headers.get_all(headers::REDRIVE_COUNT).count(), 1);
                    proptest::prop_assert_eq!(r.headers.get_all(headers::REDRIVEN_FROM).count(), 1);
                    let clean = r.headers.iter().all(|x| {
                        !headers::is_provenance(x.key())
                            && !headers::tier::ALL.iter().any(|n| x.is_named(n))
                    });
                    proptest::prop_assert!(clean);
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
}
