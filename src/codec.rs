//! How record bytes become a typed event, and what counts as a poison pill.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use crate::error::BoxError;
use crate::record::RawRecord;

/// Turns a raw record into the handler's event type.
///
/// A decode failure makes the record a *poison pill*: it is dead-lettered at once with its
/// raw bytes and failure kind `decode`, and the handler is never called for it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot decode records into `{T}`",
    label = "no codec for `{T}`",
    note = "the consumer builder decodes JSON until `.codec(..)` sets another codec: an event \
            that is not `serde::de::DeserializeOwned` needs one, e.g. `.codec(kourier::BytesCodec)` \
            or `.codec(kourier::codec_fn(..))`"
)]
pub trait Codec<T>: Send + Sync + 'static {
    /// Decodes one record.
    ///
    /// # Errors
    /// A [`DecodeError`] when the record is not a valid `T`.
    fn decode(&self, record: &RawRecord) -> Result<T, DecodeError>;
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    reason: String,
    #[source]
    source: Option<BoxError>,
}

impl DecodeError {
    /// A decode error with a reason and no underlying cause.
    pub fn new(reason: impl Into<String>) -> Self {
        DecodeError {
            reason: reason.into(),
            source: None,
        }
    }

    /// A decode error caused by `source`.
    pub fn with_source(reason: impl Into<String>, source: impl Into<BoxError>) -> Self {
        DecodeError {
            reason: reason.into(),
            source: Some(source.into()),
        }
    }
}

/// JSON via serde: the default codec. A null or empty value is a decode error.
pub struct JsonCodec<T>(PhantomData<fn() -> T>);

impl<T> JsonCodec<T> {
    /// The JSON codec.
    pub fn new() -> Self {
        JsonCodec(PhantomData)
    }
}

impl<T> Default for JsonCodec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for JsonCodec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonCodec<{}>", std::any::type_name::<T>())
    }
}

impl<T> Clone for JsonCodec<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T: DeserializeOwned + 'static> Codec<T> for JsonCodec<T> {
    fn decode(&self, record: &RawRecord) -> Result<T, DecodeError> {
        let bytes = record
            .value
            .as_deref()
            .ok_or_else(|| DecodeError::new("null value where a JSON event is required"))?;
        if bytes.is_empty() {
            return Err(DecodeError::new(
                "empty value where a JSON event is required",
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| DecodeError::with_source("invalid JSON event", e))
    }
}

/// Hands the value bytes through untouched; a null value becomes `None`. Never fails.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

impl Codec<Option<Vec<u8>>> for BytesCodec {
    fn decode(&self, record: &RawRecord) -> Result<Option<Vec<u8>>, DecodeError> {
        Ok(record.value.as_deref().map(<[u8]>::to_vec))
    }
}

/// A codec from a closure, for custom formats.
///
/// ```
/// use kourier::{codec_fn, Codec, DecodeError};
/// let upper = codec_fn(|record| {
///     let bytes = record.value.as_deref().ok_or_else(|| DecodeError::new("null value"))?;
///     std::str::from_utf8(bytes)
///         .map(str::to_uppercase)
///         .map_err(|e| DecodeError::with_source("not UTF-8", e))
/// });
/// # let _ = upper;
/// ```
pub fn codec_fn<T, F>(f: F) -> CodecFn<F>
where
    F: Fn(&RawRecord) -> Result<T, DecodeError> + Send + Sync + 'static,
{
    CodecFn(f)
}

/// The [`Codec`] made by [`codec_fn`].
#[derive(Clone, Copy)]
pub struct CodecFn<F>(F);

impl<F> fmt::Debug for CodecFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CodecFn")
    }
}

impl<T, F> Codec<T> for CodecFn<F>
where
    F: Fn(&RawRecord) -> Result<T, DecodeError> + Send + Sync + 'static,
{
    fn decode(&self, record: &RawRecord) -> Result<T, DecodeError> {
        (self.0)(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Headers;

    fn record(value: Option<&[u8]>) -> RawRecord {
        RawRecord {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: value.map(Into::into),
            headers: Headers::new(),
            timestamp: None,
            log_append_time: false,
        }
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Ev {
        id: u32,
    }

    #[test]
    fn json_decodes_and_rejects_poison() {
        let c = JsonCodec::<Ev>::new();
        assert_eq!(
            c.decode(&record(Some(br#"{"id":7}"#))).unwrap(),
            Ev { id: 7 }
        );
        assert_eq!(
            c.decode(&record(None)).unwrap_err().to_string(),
            "null value where a JSON event is required"
        );
        assert!(c.decode(&record(Some(b""))).is_err());
        assert!(c.decode(&record(Some(b"{not json"))).is_err());
        assert!(c.decode(&record(Some(br#"{"other":1}"#))).is_err());
    }

    #[test]
    fn bytes_keeps_null() {
        assert_eq!(BytesCodec.decode(&record(None)).unwrap(), None);
        assert_eq!(
            BytesCodec.decode(&record(Some(b"x"))).unwrap(),
            Some(b"x".to_vec())
        );
    }
}
