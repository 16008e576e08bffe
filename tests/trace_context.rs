//! W3C trace context (`traceparent`) carried publish → handle → dead letter, against the real
//! broker.
//!
//! Always: the header reaches the handler (`Message::trace_context`) and the dead letter
//! unchanged, and the consumer's `kourier.record` span records the trace id as `trace_id`.
//! With `--features opentelemetry`: the publisher injects the current span's context, and the
//! record span (hence the handler's current span) is a child of the publisher's span in the
//! same trace, as the spans exported by an OpenTelemetry SDK show.
//!
//! This binary installs one global `tracing` subscriber (the consumer's spans are created on
//! the runtime's worker threads): a layer capturing `kourier.record` fields, plus, with the
//! feature, `tracing-opentelemetry` over an SDK tracer with an in-memory exporter.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kourier::dead_letter::headers as dlt;
use kourier::{
    Handler, HandlerError, Headers, Message, Publisher, RetryPolicy, RetryingConsumer,
    TraceContext, async_trait,
};
use serde::{Deserialize, Serialize};
use support::consumer::{self, Running, wait_for};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

// ───────────── the subscriber ─────────────

/// `trace_id` fields recorded on `kourier.record` spans, in order.
fn record_trace_ids() -> &'static Mutex<Vec<String>> {
    static IDS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    IDS.get_or_init(Mutex::default)
}

struct CaptureRecordSpans;

struct TraceIdVisitor(Option<String>);

impl Visit for TraceIdVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "trace_id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for CaptureRecordSpans
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "kourier.record" {
            let mut v = TraceIdVisitor(None);
            attrs.record(&mut v);
            if let Some(id) = v.0 {
                record_trace_ids().lock().unwrap().push(id);
            }
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if ctx
            .span(id)
            .is_some_and(|s| s.metadata().name() == "kourier.record")
        {
            let mut v = TraceIdVisitor(None);
            values.record(&mut v);
            if let Some(id) = v.0 {
                record_trace_ids().lock().unwrap().push(id);
            }
        }
    }
}

#[cfg(feature = "opentelemetry")]
fn exporter() -> &'static opentelemetry_sdk::trace::InMemorySpanExporter {
    static EXPORTER: OnceLock<opentelemetry_sdk::trace::InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(opentelemetry_sdk::trace::InMemorySpanExporter::default)
}

fn install_subscriber() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("kourier", tracing::Level::INFO)
            .with_target("trace_context", tracing::Level::INFO);
        let registry = tracing_subscriber::registry()
            .with(CaptureRecordSpans)
            .with(filter);
        #[cfg(feature = "opentelemetry")]
        let registry = {
            use opentelemetry::trace::TracerProvider as _;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_simple_exporter(exporter().clone())
                .build();
            let tracer = provider.tracer("kourier-tests");
            registry.with(tracing_opentelemetry::layer().with_tracer(tracer))
        };
        tracing::subscriber::set_global_default(registry).expect("install the subscriber");
    });
}

// ───────────── the consumer ─────────────

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ev {
    id: u32,
    fail: bool,
}

/// What the handler saw: the record's trace context, and (with the feature) the trace and
/// span id of its current OpenTelemetry span.
#[derive(Debug, Clone, Default)]
struct Seen {
    contexts: Vec<Option<TraceContext>>,
    #[cfg(feature = "opentelemetry")]
    otel: Vec<(opentelemetry::trace::TraceId, opentelemetry::trace::SpanId)>,
}

struct Recorder(Arc<Mutex<Seen>>);

#[async_trait]
impl Handler for Recorder {
    type Event = Ev;
    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        {
            let mut seen = self.0.lock().unwrap();
            seen.contexts.push(m.trace_context());
            #[cfg(feature = "opentelemetry")]
            {
                use opentelemetry::trace::TraceContextExt as _;
                use tracing_opentelemetry::OpenTelemetrySpanExt as _;
                let cx = tracing::Span::current().context();
                let span = cx.span();
                let sc = span.span_context();
                seen.otel.push((sc.trace_id(), sc.span_id()));
            }
        }
        if m.event().fail {
            return Err(HandlerError::permanent("this one fails"));
        }
        Ok(())
    }
}

struct Setup {
    topic: String,
    dlt_topic: String,
    publisher: Publisher<Ev>,
    seen: Arc<Mutex<Seen>>,
    consumer: Running,
}

async fn setup(name: &str) -> Setup {
    install_subscriber();
    let (topic, group, dlt_topic) = consumer::setup(name, 1).await;
    let publisher = Publisher::<Ev>::builder(support::bootstrap(), &topic)
        .key_fn(|e: &Ev| e.id.to_string())
        .build()
        .expect("publisher");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let consumer = Running::start(
        RetryingConsumer::builder(Recorder(seen.clone()))
            .bootstrap_servers(support::bootstrap())
            .group_id(&group)
            .topic(&topic)
            .retry_policy(RetryPolicy::no_retries())
            .commit_interval(Duration::from_millis(200)),
    );
    Setup {
        topic,
        dlt_topic,
        publisher,
        seen,
        consumer,
    }
}

impl Setup {
    async fn wait_for_handled(&self, n: usize) {
        wait_for(
            &format!("{n} records handled"),
            Duration::from_secs(60),
            || self.seen.lock().unwrap().contexts.len() >= n,
        )
        .await;
    }

    async fn stop(self) {
        self.consumer.stop().await;
    }
}

fn traceparent(r: &support::ReadRecord) -> Option<String> {
    r.header(TraceContext::TRACEPARENT)
        .flatten()
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

// ───────────── tests ─────────────

/// Without any OpenTelemetry: a `traceparent` given to the publisher reaches the handler and
/// the dead letter untouched, and the record span records its trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_travels_from_publisher_to_handler_and_dead_letter() {
    let s = setup("trace-headers").await;
    let root = TraceContext::new_root().with_trace_state("vendor=abc");
    let ok = TraceContext::new_root();
    s.publisher
        .send_with_headers(&Ev { id: 1, fail: true }, root.to_headers())
        .await
        .expect("publish");
    s.publisher
        .send_with_headers(&Ev { id: 2, fail: false }, ok.to_headers())
        .await
        .expect("publish");
    s.wait_for_handled(2).await;
    let seen = s.seen.lock().unwrap().clone();
    assert_eq!(seen.contexts, vec![Some(root.clone()), Some(ok.clone())]);

    let letters = support::read_at_least(&s.dlt_topic, 1, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(traceparent(&letters[0]), Some(root.traceparent()));
    assert_eq!(
        letters[0].header(TraceContext::TRACESTATE).flatten(),
        Some(&b"vendor=abc"[..])
    );
    assert_eq!(
        letters[0].header(dlt::ORIGINAL_TOPIC).flatten(),
        Some(s.topic.as_bytes())
    );
    let ids = record_trace_ids().lock().unwrap().clone();
    for tc in [&root, &ok] {
        assert!(
            ids.contains(&tc.trace_id_hex()),
            "record span trace_id {} missing from {ids:?}",
            tc.trace_id_hex()
        );
    }
    s.stop().await;
}

/// A record without a `traceparent` gets none (without the feature) and the handler sees
/// `None`; headers are not invented.
#[cfg(not(feature = "opentelemetry"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_traceparent_is_invented_without_opentelemetry() {
    let s = setup("trace-none").await;
    s.publisher
        .send_with_headers(&Ev { id: 1, fail: false }, Headers::new().with("x", "y"))
        .await
        .expect("publish");
    s.wait_for_handled(1).await;
    assert_eq!(s.seen.lock().unwrap().contexts, vec![None]);
    let records = support::read_all(&s.topic).await;
    assert_eq!(traceparent(&records[0]), None);
    s.stop().await;
}

/// With OpenTelemetry: publishing inside a span injects its context; the handler runs in a
/// span of the same trace whose parent is the publisher's span; the dead letter carries it.
#[cfg(feature = "opentelemetry")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_covers_publish_handle_and_dead_letter() {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let s = setup("trace-otel").await;
    let publish_span = tracing::info_span!("publish notification");
    let publisher_context = publish_span.context().span().span_context().clone();
    assert!(
        publisher_context.is_valid(),
        "the OpenTelemetry layer is installed"
    );
    async {
        s.publisher
            .send_with_headers(&Ev { id: 1, fail: true }, Headers::new())
            .await
            .expect("publish")
    }
    .instrument(publish_span.clone())
    .await;
    drop(publish_span);
    s.wait_for_handled(1).await;

    let seen = s.seen.lock().unwrap().clone();
    let carried = seen.contexts[0]
        .clone()
        .expect("the publisher injected a traceparent");
    assert_eq!(carried.trace_id(), publisher_context.trace_id().to_bytes());
    assert_eq!(carried.span_id(), publisher_context.span_id().to_bytes());
    let (handler_trace, handler_span) = seen.otel[0];
    assert_eq!(handler_trace, publisher_context.trace_id(), "same trace");
    assert_ne!(handler_span, publisher_context.span_id());

    let letters = support::read_at_least(&s.dlt_topic, 1, Duration::from_secs(30)).await;
    assert_eq!(traceparent(&letters[0]), Some(carried.traceparent()));
    s.stop().await;

    // The exported record span is the publish span's child.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let record_span = loop {
        let spans = exporter().get_finished_spans().expect("finished spans");
        if let Some(span) = spans
            .into_iter()
            .find(|d| d.name == "kourier.record" && d.span_context.span_id() == handler_span)
        {
            break span;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the record span was not exported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        record_span.span_context.trace_id(),
        publisher_context.trace_id()
    );
    assert_eq!(record_span.parent_span_id, publisher_context.span_id());
}
