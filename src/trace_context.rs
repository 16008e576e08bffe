//! W3C Trace Context carried in record headers: [`TraceContext`].
//!
//! A record may carry a `traceparent` header (and a `tracestate` one), as defined by the W3C
//! [Trace Context](https://www.w3.org/TR/trace-context/) recommendation:
//! `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`. kourier keeps these headers
//! wherever a record goes — handled, dead-lettered, redriven — so one trace id ties the
//! publish, every attempt, the dead letter and a redrive together, with or without
//! OpenTelemetry:
//!
//! - **Always**: the headers travel untouched (dead letters keep the original headers, a
//!   redrive keeps them too); [`Message::trace_context`](crate::Message::trace_context) parses
//!   them; the consumer's `kourier.record` span records the trace id as its `trace_id` field,
//!   so log lines of one trace can be found with any `tracing` subscriber. To start traces
//!   without OpenTelemetry, give a [`Publisher`](crate::Publisher) a `headers_fn` that adds
//!   [`TraceContext::new_root`]`().to_headers()`.
//! - **With the `opentelemetry` feature**: a [`Publisher`](crate::Publisher) writes the
//!   current span's context into every record that has no `traceparent` yet, and the consumer
//!   makes the `kourier.record` span a *child* of the record's context (through
//!   `tracing-opentelemetry`), so handler spans, dead-letter writes and the publisher's span
//!   form one trace in your OpenTelemetry backend.
//!
//! kourier speaks the W3C format itself rather than through OpenTelemetry's global propagator,
//! so the header names and format are part of its contract whatever propagator an
//! application installs (none is needed).

use std::fmt;

use crate::record::{Header, Headers, RawRecord};

impl RawRecord {
    /// The W3C trace context in the record's `traceparent` / `tracestate` headers, if any.
    pub fn trace_context(&self) -> Option<TraceContext> {
        TraceContext::from_headers(&self.headers)
    }
}

/// A W3C trace context: trace id, parent span id, trace flags and an optional `tracestate`.
///
/// ```
/// use kourier::TraceContext;
///
/// let tc = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert_eq!(tc.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(tc.is_sampled());
/// let child = tc.child();
/// assert_eq!(child.trace_id(), tc.trace_id());
/// assert_ne!(child.span_id(), tc.span_id());
/// assert_eq!(tc.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
    trace_state: Option<String>,
}

impl TraceContext {
    /// The W3C `traceparent` header name.
    pub const TRACEPARENT: &'static str = "traceparent";
    /// The W3C `tracestate` header name.
    pub const TRACESTATE: &'static str = "tracestate";
    /// The `sampled` bit of the trace flags.
    pub const FLAG_SAMPLED: u8 = 0x01;

    /// A context from its parts; `None` when the trace id or the span id is all zeros (invalid
    /// in W3C Trace Context).
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Option<Self> {
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceContext {
            trace_id,
            span_id,
            flags,
            trace_state: None,
        })
    }

    /// A new trace: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        let trace_id = loop {
            let id = fastrand::u128(..).to_be_bytes();
            if id != [0; 16] {
                break id;
            }
        };
        TraceContext {
            trace_id,
            span_id: random_span_id(),
            flags: Self::FLAG_SAMPLED,
            trace_state: None,
        }
    }

    /// The same trace with a new random span id (flags and `tracestate` kept): the context to
    /// send on when this one is the parent.
    #[must_use]
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: random_span_id(),
            ..self.clone()
        }
    }

    /// Sets the `tracestate` value (vendor-specific data, passed along as it is).
    #[must_use]
    pub fn with_trace_state(mut self, trace_state: impl Into<String>) -> Self {
        let state = trace_state.into();
        self.trace_state = (!state.trim().is_empty()).then_some(state);
        self
    }

    /// Parses a `traceparent` value. Version `00` must be exactly
    /// `00-<32 hex>-<16 hex>-<2 hex>`, lowercase; a later version may append `-`-separated
    /// fields, which are ignored (as the recommendation says). `None` for anything else,
    /// including version `ff` and all-zero ids.
    pub fn parse(traceparent: &str) -> Option<Self> {
        Self::parse_bytes(traceparent.trim().as_bytes())
    }

    pub(crate) fn parse_bytes(v: &[u8]) -> Option<Self> {
        if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let version = hex_byte(v[0], v[1])?;
        match version {
            0xff => return None,
            0x00 if v.len() != 55 => return None,
            _ if v.len() > 55 && v[55] != b'-' => return None,
            _ => {}
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(v[3 + 2 * i], v[4 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(v[36 + 2 * i], v[37 + 2 * i])?;
        }
        let flags = hex_byte(v[53], v[54])?;
        Self::new(trace_id, span_id, flags)
    }

    /// The context carried by `headers`: the last `traceparent` header, with the
    /// `tracestate` headers joined by `,` (the recommendation allows splitting it). `None`
    /// when there is no valid `traceparent`.
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        let parent = headers.get(Self::TRACEPARENT)?;
        let mut tc = Self::parse_bytes(parent.trim_ascii())?;
        let state: Vec<&str> = headers
            .iter()
            .filter(|h| h.is_named(Self::TRACESTATE))
            .filter_map(|h| h.value.as_deref())
            .filter_map(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if !state.is_empty() {
            tc.trace_state = Some(state.join(","));
        }
        Some(tc)
    }

    /// The trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The trace id as 32 lowercase hex digits, as logs and tracing backends show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent span id: the span that sent the record.
    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// The parent span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// The trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the `sampled` flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & Self::FLAG_SAMPLED != 0
    }

    /// The `tracestate` value, if any.
    pub fn trace_state(&self) -> Option<&str> {
        self.trace_state.as_deref()
    }

    /// The `traceparent` value (version `00`); the same as `to_string()`.
    pub fn traceparent(&self) -> String {
        self.to_string()
    }

    /// Writes this context into `headers`, replacing any `traceparent` and `tracestate`
    /// headers there.
    pub fn write_to(&self, headers: &mut Headers) {
        headers.remove(Self::TRACEPARENT);
        headers.remove(Self::TRACESTATE);
        headers.push(Header::new(Self::TRACEPARENT, self.traceparent()));
        if let Some(state) = &self.trace_state {
            headers.push(Header::new(Self::TRACESTATE, state.as_bytes()));
        }
    }

    /// The headers carrying this context: `traceparent`, and `tracestate` when set.
    pub fn to_headers(&self) -> Headers {
        let mut headers = Headers::new();
        self.write_to(&mut headers);
        headers
    }

    /// The trace id, formatted lazily (for span fields: no allocation).
    pub(crate) fn trace_id_display(&self) -> impl fmt::Display + '_ {
        HexDisplay(&self.trace_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{}",
            HexDisplay(&self.trace_id),
            HexDisplay(&self.span_id),
            HexDisplay(&[self.flags])
        )
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::TraceContext;

    #[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
    impl TraceContext {
        /// The context of an OpenTelemetry span; `None` when it is not valid.
        ///
        /// *(feature `opentelemetry`)*
        pub fn from_span_context(span: &SpanContext) -> Option<Self> {
            if !span.is_valid() {
                return None;
            }
            let state = span.trace_state().header();
            Some(
                TraceContext::new(
                    span.trace_id().to_bytes(),
                    span.span_id().to_bytes(),
                    span.trace_flags().to_u8(),
                )?
                .with_trace_state(state),
            )
        }

        /// This context as a *remote* OpenTelemetry span context (an unparsable `tracestate`
        /// is dropped).
        ///
        /// *(feature `opentelemetry`)*
        pub fn to_span_context(&self) -> SpanContext {
            let state = self
                .trace_state
                .as_deref()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            SpanContext::new(
                TraceId::from_bytes(self.trace_id),
                SpanId::from_bytes(self.span_id),
                TraceFlags::new(self.flags),
                true,
                state,
            )
        }

        /// An OpenTelemetry context whose (remote) parent is this one.
        ///
        /// *(feature `opentelemetry`)*
        pub fn to_otel_context(&self) -> opentelemetry::Context {
            opentelemetry::Context::new().with_remote_span_context(self.to_span_context())
        }

        /// The context of the current span: the current `tracing` span's OpenTelemetry context
        /// (through `tracing-opentelemetry`), else OpenTelemetry's own current context; `None`
        /// when neither has a valid span.
        ///
        /// *(feature `opentelemetry`)*
        pub fn current() -> Option<Self> {
            let from_tracing = tracing::Span::current().context();
            let span = from_tracing.span();
            if let Some(tc) = Self::from_span_context(span.span_context()) {
                return Some(tc);
            }
            let cx = opentelemetry::Context::current();
            Self::from_span_context(cx.span().span_context())
        }
    }

    /// Makes `span` a child of the record's context, when `tracing-opentelemetry` is
    /// installed (otherwise nothing happens).
    pub(crate) fn set_parent(span: &tracing::Span, tc: &TraceContext) {
        if span.is_disabled() {
            return;
        }
        if let Err(e) = span.set_parent(tc.to_otel_context()) {
            tracing::trace!(error = %e, "record span not parented on the record's trace context");
        }
    }
}

#[cfg(feature = "opentelemetry")]
pub(crate) use self::otel::set_parent;

fn random_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    Some(hex_digit(hi)? << 4 | hex_digit(lo)?)
}

struct HexDisplay<'a>(&'a [u8]);

impl fmt::Display for HexDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    HexDisplay(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_recommendations_example() {
        let tc = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(tc.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tc.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(tc.flags(), 1);
        assert!(tc.is_sampled());
        assert_eq!(tc.to_string(), EXAMPLE);
        assert_eq!(tc.trace_id_display().to_string(), tc.trace_id_hex());
    }

    #[test]
    fn refuses_what_the_recommendation_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // v00 with extra
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", // no dash after flags
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert!(TraceContext::parse(future).is_some());
    }

    #[test]
    fn headers_round_trip_with_trace_state() {
        let tc = TraceContext::parse(EXAMPLE)
            .unwrap()
            .with_trace_state("congo=t61rcWkgMzE");
        let mut headers = Headers::new()
            .with("event-id", "e-1")
            .with("traceparent", "junk");
        tc.write_to(&mut headers);
        assert_eq!(headers.len(), 3, "the old traceparent is replaced");
        assert_eq!(TraceContext::from_headers(&headers), Some(tc.clone()));

        // Split tracestate headers are joined.
        let split = Headers::new()
            .with("traceparent", EXAMPLE)
            .with("tracestate", "a=1")
            .with("tracestate", "b=2");
        assert_eq!(
            TraceContext::from_headers(&split).unwrap().trace_state(),
            Some("a=1,b=2")
        );
        assert_eq!(
            TraceContext::from_headers(&Headers::new().with("traceparent", "nope")),
            None
        );
    }

    #[test]
    fn roots_and_children_are_valid_and_distinct() {
        let root = TraceContext::new_root();
        assert!(root.is_sampled());
        assert_eq!(TraceContext::parse(&root.traceparent()), Some(root.clone()));
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_ne!(TraceContext::new_root().trace_id(), root.trace_id());
        assert_eq!(TraceContext::new([0; 16], [1; 8], 0), None);
    }

    #[cfg(feature = "opentelemetry")]
    #[test]
    fn converts_to_and_from_opentelemetry() {
        let tc = TraceContext::parse(EXAMPLE)
            .unwrap()
            .with_trace_state("congo=t61rcWkgMzE");
        let sc = tc.to_span_context();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(TraceContext::from_span_context(&sc), Some(tc));
    }
}
