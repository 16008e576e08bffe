//! `kourier-dlt console`: one web page for the on-call engineer (feature `console`).
//!
//! - **Consumers**: for each `--consumer NAME=URL`, the JSON status the URL answers (kourier's
//!   health routes' `GET /status`: live, ready and why not, partitions with their lag,
//!   breaker states, in flight, outcome counts); any other JSON is shown as key/value rows,
//!   and a URL that does not answer says so.
//! - **Dead letters**: each `--dlt` topic, filtered as `redrive` filters (place, header, key,
//!   kind, since/until), at most `--max-letters` letters per page and `--max-read` records
//!   read, so a large topic cannot hold the page; a letter's page shows its provenance, its
//!   headers and its key and value decoded (JSON pretty-printed, other UTF-8 as text, anything
//!   else in hex).
//! - **Redrive**: the letters ticked on the list (or the one on its page) are redriven after
//!   a confirmation: a first `POST` runs a dry run and shows what would be redriven and what
//!   would be refused; the second, with `confirm`, redrives those letters
//!   ([`DeadLetterTopic::redrive`](kourier::dead_letter::DeadLetterTopic::redrive), stateless)
//!   and shows the report. No `GET` changes anything.
//!
//! Letters are untrusted input (anyone who can write to a topic writes them): every value on
//! the page goes through maud, which escapes it. A `POST` from another site is refused (its
//! `Origin` or `Sec-Fetch-Site` says so). The page has no login: serve it on loopback, or
//! behind a proxy that authenticates.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use kourier::DeadLetterReason;
use kourier::dead_letter::{
    LetterRange, LetterSelector, Letters, Redrive, RedriveReport, RedriveStopped, headers,
};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use crate::dlt::{self, Kafka, Letter};

/// Most letters one redrive request may name.
const MAX_SELECTED: usize = 1000;
/// Most bytes of a letter's value shown on its page.
const MAX_VALUE_SHOWN: usize = 64 * 1024;
/// Most characters of an error message shown in the list.
const MAX_ERROR_SHOWN: usize = 200;
/// Most key/value rows shown for one consumer's status.
const MAX_STATUS_ROWS: usize = 400;
/// How long a consumer's status URL may take to answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// What the console serves: set from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Console {
    pub(crate) kafka: Kafka,
    /// The dead-letter topics it may browse and redrive (no other).
    pub(crate) dlts: Vec<String>,
    /// `(name, status URL)` of each consumer shown.
    pub(crate) consumers: Vec<(String, String)>,
    /// Most letters listed on one page.
    pub(crate) max_letters: usize,
    /// Most records read for one page.
    pub(crate) max_read: u64,
}

/// A `--consumer NAME=URL` argument.
pub(crate) fn parse_consumer(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, url))
            if !name.is_empty() && (url.starts_with("http://") || url.starts_with("https://")) =>
        {
            Ok((name.to_owned(), url.to_owned()))
        }
        _ => Err(format!(
            "{s:?} is not a consumer: use NAME=URL, e.g. notifier=http://127.0.0.1:9090/status"
        )),
    }
}

struct AppState {
    console: Console,
    http: reqwest::Client,
}

type Shared = Arc<AppState>;

/// Serves the console on `listen` until Ctrl-C; prints the address it listens on (with the
/// port chosen when `listen` asks for port 0) as the first line on stdout.
pub(crate) async fn serve(listen: SocketAddr, console: Console) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    println!("kourier-dlt console listening on http://{addr}/");
    let app = router(console)?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving the console")
}

/// The console's routes: `GET /`, `GET /letter`, `POST /redrive`.
pub(crate) fn router(console: Console) -> Result<Router> {
    let http = reqwest::Client::builder()
        .timeout(STATUS_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let state = Arc::new(AppState { console, http });
    Ok(Router::new()
        .route("/", get(index))
        .route("/letter", get(letter_page))
        .route("/redrive", axum::routing::post(redrive))
        .with_state(state))
}

// ───────────── requests ─────────────

/// The fields of a query string or form, repeated ones kept.
struct Fields(Vec<(String, String)>);

impl Fields {
    fn parse(bytes: &[u8]) -> Self {
        Fields(
            form_urlencoded::parse(bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
}

/// The filters of the browser form, as given (to show them again) and as a selector.
#[derive(Default)]
struct Filters {
    at: String,
    header: String,
    key: String,
    kind: String,
    since: String,
    until: String,
}

impl Filters {
    fn from_fields(f: &Fields) -> Self {
        let text = |name| f.get(name).unwrap_or_default().to_owned();
        Filters {
            at: text("at"),
            header: text("header"),
            key: text("key"),
            kind: text("kind"),
            since: text("since"),
            until: text("until"),
        }
    }

    /// The selector, or what is wrong with a filter.
    fn selector(&self) -> std::result::Result<LetterSelector, String> {
        let mut s = LetterSelector::new();
        for place in self.at.split([',', ' ']).filter(|p| !p.is_empty()) {
            s = s.at(place.parse::<LetterRange>().map_err(|e| e.to_string())?);
        }
        if !self.header.is_empty() {
            let (name, value) = dlt::parse_header(&self.header)?;
            s = s.header(name, value);
        }
        if !self.key.is_empty() {
            s = s.key(&self.key);
        }
        if !self.kind.is_empty() {
            s = s.kind(dlt::parse_kind(&self.kind)?);
        }
        if !self.since.is_empty() {
            s = s.since(dlt::parse_time(&self.since)?);
        }
        if !self.until.is_empty() {
            s = s.until(dlt::parse_time(&self.until)?);
        }
        Ok(s)
    }
}

/// The dead-letter topic a request names: one of `--dlt` (the first when none is named).
fn chosen_dlt<'a>(console: &'a Console, f: &Fields) -> std::result::Result<&'a str, String> {
    match f.get("dlt") {
        None => console
            .dlts
            .first()
            .map(String::as_str)
            .ok_or_else(|| "no dead-letter topic given (--dlt)".to_owned()),
        Some(name) => console
            .dlts
            .iter()
            .find(|d| *d == name)
            .map(String::as_str)
            .ok_or_else(|| format!("{name} is not one of the console's dead-letter topics")),
    }
}

/// Whether a state-changing request comes from another site: its `Sec-Fetch-Site` is not
/// `same-origin`, or its `Origin` is not this host.
fn cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
        && site.as_bytes() != b"none"
    {
        return true;
    }
    match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (Some(origin), Some(host)) => {
            let origin = origin.to_str().unwrap_or_default();
            let host = host.to_str().unwrap_or_default();
            let origin_host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .unwrap_or(origin);
            origin_host != host
        }
        (Some(_), None) => true,
        _ => false,
    }
}

// ───────────── pages ─────────────

async fn index(State(app): State<Shared>, RawQuery(query): RawQuery) -> Response {
    let fields = Fields::parse(query.unwrap_or_default().as_bytes());
    let filters = Filters::from_fields(&fields);
    // The consumers are asked while the letters are read.
    let letters = async {
        match chosen_dlt(&app.console, &fields) {
            Err(e) => html! { p.error { (e) } },
            Ok(dlt) => match filters.selector() {
                Err(e) => browser(&app.console, dlt, &filters, Err(e)),
                Ok(selector) => {
                    let read = read_letters(&app.console, dlt, selector).await;
                    browser(&app.console, dlt, &filters, read)
                }
            },
        }
    };
    let (consumers, browser) = tokio::join!(consumer_statuses(&app), letters);
    page(
        "kourier console",
        html! {
            section #consumers {
                h2 { "Consumers" }
                @if consumers.is_empty() {
                    p.note { "No consumer given (--consumer NAME=URL)." }
                }
                @for c in &consumers { (c) }
            }
            section #dead-letters {
                h2 { "Dead letters" }
                (browser)
            }
        },
    )
    .into_response()
}

async fn read_letters(
    console: &Console,
    dlt: &str,
    selector: LetterSelector,
) -> std::result::Result<Letters, String> {
    let topic = console.kafka.topic(dlt);
    let (max_letters, max_read) = (console.max_letters, console.max_read);
    tokio::task::spawn_blocking(move || {
        topic.read_at_most(&selector, max_letters, max_read, |_, _| {})
    })
    .await
    .map_err(|e| format!("reading {dlt} failed: {e}"))?
    .map_err(|e| format!("reading {dlt} failed: {}", error_chain(&e)))
}

fn browser(
    console: &Console,
    dlt: &str,
    filters: &Filters,
    letters: std::result::Result<Letters, String>,
) -> Markup {
    let kinds = ["decode", "permanent", "retries-exhausted", "panic"];
    html! {
        form #filters method="get" action="/" {
            label { "topic " select name="dlt" {
                @for d in &console.dlts {
                    option value=(d) selected[d == dlt] { (d) }
                }
            } }
            label { " place " input name="at" placeholder="0:42 or 0:10-19" value=(filters.at); }
            label { " header " input name="header" placeholder="event-id=e-1" value=(filters.header); }
            label { " key " input name="key" value=(filters.key); }
            label { " kind " select name="kind" {
                option value="" { "any" }
                @for k in kinds { option value=(k) selected[filters.kind == k] { (k) } }
            } }
            label { " since " input name="since" placeholder="2h or 2026-12-06T08:00:00Z" value=(filters.since); }
            label { " until " input name="until" value=(filters.until); }
            " " button #apply type="submit" { "Show" }
        }
        @match letters {
            Err(e) => p.error { (e) },
            Ok(letters) => {
                p #summary {
                    (letters.letters.len()) " letter(s) shown of " (letters.read) " read in " (dlt)
                    @if letters.more {
                        " — more may follow (at most " (console.max_letters) " letters and "
                        (console.max_read) " records per page): narrow the filters, e.g. a place range."
                    }
                }
                form #select method="post" action="/redrive" {
                    input type="hidden" name="dlt" value=(dlt);
                    table #letters {
                        thead { tr {
                            th { "select" } th { "place" } th { "key" } th { "kind" } th { "error" }
                            th { "attempts" } th { "given up" } th { "original" } th { "redrives" }
                        } }
                        tbody {
                            @for record in &letters.letters {
                                (letter_row(dlt, &Letter::new(record.clone())))
                            }
                        }
                    }
                    @if !letters.letters.is_empty() {
                        button #redrive-selected type="submit" { "Redrive selected…" }
                        " (a dry run shows what will be redriven; nothing is published before you confirm)"
                    }
                }
            }
        }
    }
}

fn letter_row(dlt: &str, l: &Letter) -> Markup {
    let place = format!("{}:{}", l.record.partition, l.record.offset);
    let p = &l.provenance;
    let href = format!(
        "/letter?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("dlt", dlt)
            .append_pair("at", &place)
            .finish()
    );
    let error: String = p
        .error
        .as_deref()
        .unwrap_or("-")
        .chars()
        .take(MAX_ERROR_SHOWN)
        .collect();
    html! {
        tr.letter data-place=(place) {
            td { input type="checkbox" name="letter" value=(place) aria-label=(format!("select {place}")); }
            td { a.place href=(href) { (place) } }
            td.key { (bytes_text(l.record.key.as_deref())) }
            td.kind { (p.failure_kind.map_or("-", DeadLetterReason::as_str)) }
            td.error { (error) }
            td { (p.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string())) }
            td { (time(p.last_failure)) }
            td { (p.original_coordinates()) }
            td { (p.redrive_count) }
        }
    }
}

async fn letter_page(State(app): State<Shared>, RawQuery(query): RawQuery) -> Response {
    let fields = Fields::parse(query.unwrap_or_default().as_bytes());
    let dlt = match chosen_dlt(&app.console, &fields) {
        Ok(d) => d.to_owned(),
        Err(e) => return error_page(StatusCode::NOT_FOUND, &e),
    };
    let place: LetterRange = match fields.get("at").map(str::parse::<LetterRange>) {
        Some(Ok(p)) if p.first == p.last => p,
        _ => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "give one letter's place: at=PARTITION:OFFSET",
            );
        }
    };
    let letters = match read_letters(&app.console, &dlt, LetterSelector::new().at(place)).await {
        Ok(l) => l,
        Err(e) => return error_page(StatusCode::BAD_GATEWAY, &e),
    };
    let Some(record) = letters.letters.into_iter().next() else {
        return error_page(
            StatusCode::NOT_FOUND,
            &format!("no letter at {place} in {dlt}"),
        );
    };
    let l = Letter::new(record);
    let p = &l.provenance;
    let provenance: Vec<(&str, String)> = vec![
        ("original", p.original_coordinates()),
        (
            "consumer group",
            p.consumer_group.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "kind",
            p.failure_kind
                .map_or("-", DeadLetterReason::as_str)
                .to_owned(),
        ),
        ("error", p.error.clone().unwrap_or_else(|| "-".into())),
        (
            "exception",
            p.exception_class.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "attempts",
            p.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
        ),
        ("first failure", time(p.first_failure)),
        ("last failure", time(p.last_failure)),
        ("redrive count", p.redrive_count.to_string()),
        (
            "letter timestamp",
            l.record
                .timestamp
                .and_then(|ms| u64::try_from(ms).ok())
                .and_then(|ms| std::time::UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
                .map_or_else(|| "-".to_owned(), |t| time(Some(t))),
        ),
    ];
    let place_text = format!("{}:{}", l.record.partition, l.record.offset);
    page(
        &format!("letter {dlt} {place_text}"),
        html! {
            p { a href="/" { "← back to the console" } }
            h2 { "Letter " (dlt) " " (place_text) }
            table #provenance {
                @for (name, value) in &provenance { tr { th { (name) } td { (value) } } }
            }
            h3 { "Headers" }
            table #headers {
                thead { tr { th { "name" } th { "value" } } }
                tbody {
                    @for h in l.record.headers.iter() {
                        tr.header class=[headers::ALL.iter().any(|n| h.is_named(n)).then_some("provenance")] {
                            td.name { (h.key_escaped()) }
                            td.value { (bytes_text(h.value())) }
                        }
                    }
                }
            }
            h3 { "Key" }
            pre #key { (bytes_text(l.record.key.as_deref())) }
            h3 { "Value" }
            (value_view(l.record.value.as_deref()))
            form method="post" action="/redrive" {
                input type="hidden" name="dlt" value=(dlt);
                input type="hidden" name="letter" value=(place_text);
                button #redrive-this type="submit" { "Redrive this letter…" }
            }
        },
    )
    .into_response()
}

async fn redrive(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if cross_site(&headers) {
        return error_page(
            StatusCode::FORBIDDEN,
            "refused: this request comes from another site",
        );
    }
    let fields = Fields::parse(&body);
    let dlt = match chosen_dlt(&app.console, &fields) {
        Ok(d) => d.to_owned(),
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e),
    };
    let mut places = Vec::new();
    for p in fields.all("letter") {
        match p.parse::<LetterRange>() {
            Ok(r) if r.first == r.last => places.push(r),
            _ => {
                return error_page(
                    StatusCode::BAD_REQUEST,
                    &format!("{p:?} is not a letter place"),
                );
            }
        }
    }
    if places.is_empty() {
        return error_page(StatusCode::BAD_REQUEST, "no letter selected");
    }
    if places.len() > MAX_SELECTED {
        return error_page(
            StatusCode::BAD_REQUEST,
            &format!("at most {MAX_SELECTED} letters at once"),
        );
    }
    let selector = places
        .iter()
        .fold(LetterSelector::new(), |s, &place| s.at(place));
    let confirmed = fields.get("confirm") == Some("yes");
    let run = Redrive::new(selector).dry_run(!confirmed);
    let topic = app.console.kafka.topic(&dlt);
    let result = tokio::task::spawn_blocking(move || topic.redrive(&run, |_| {})).await;
    let (report, stopped) = match result {
        Ok(Ok(report)) => (report, None),
        Ok(Err(RedriveStopped { report, error })) => (*report, Some(error_chain(&*error))),
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let title = if confirmed {
        "Redrive report"
    } else {
        "Confirm the redrive"
    };
    page(
        title,
        html! {
            p { a href="/" { "← back to the console" } }
            h2 { (title) }
            @if let Some(e) = &stopped { p.error #stopped { "The run stopped: " (e) } }
            (report_view(&report, confirmed))
            @if !confirmed && !report.redriven.is_empty() && stopped.is_none() {
                form #confirm method="post" action="/redrive" {
                    input type="hidden" name="dlt" value=(dlt);
                    @for p in &places { input type="hidden" name="letter" value=(p.to_string()); }
                    input type="hidden" name="confirm" value="yes";
                    button #confirm-redrive type="submit" {
                        "Redrive " (report.redriven.len()) " letter(s) now"
                    }
                }
            }
        },
    )
    .into_response()
}

fn report_view(report: &RedriveReport, confirmed: bool) -> Markup {
    let verb = if confirmed {
        "redriven"
    } else {
        "will be redriven"
    };
    html! {
        p #report-summary {
            (report.dlt) ": " (report.redriven.len()) " " (verb) ", "
            (report.refused.len()) " refused, " (report.read) " read"
            @if confirmed { " (stateless: nothing committed)" } @else { " (dry run: nothing published yet)" }
        }
        table #redriven {
            thead { tr { th { "letter" } th { "original" } th { "key" } th { "to" } th { "redrive count" } } }
            tbody {
                @for r in &report.redriven {
                    tr {
                        td { (r.letter) }
                        td { (r.original) }
                        td { (bytes_text(r.key.as_deref())) }
                        td { (r.topic)
                            @if let (Some(p), Some(o)) = (r.partition, r.offset) { "/" (p) "@" (o) } }
                        td { (r.redrive_count) }
                    }
                }
            }
        }
        @if !report.refused.is_empty() {
            h3 { "Refused" }
            table #refused {
                thead { tr { th { "letter" } th { "original" } th { "reason" } } }
                tbody {
                    @for r in &report.refused {
                        tr { td { (r.letter) } td { (r.original) } td { (r.reason) } }
                    }
                }
            }
        }
    }
}

// ───────────── consumers ─────────────

async fn consumer_statuses(app: &AppState) -> Vec<Markup> {
    let fetches = app.console.consumers.iter().map(|(name, url)| async move {
        let answer = fetch_status(&app.http, url).await;
        consumer_view(name, url, answer)
    });
    futures_util::future::join_all(fetches).await
}

/// What a status URL answered: its HTTP status and its body as JSON, or why not.
async fn fetch_status(
    http: &reqwest::Client,
    url: &str,
) -> std::result::Result<(u16, Value), String> {
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("unreachable: {}", error_chain(&e)))?;
    let code = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("answered {code}, then failed: {}", error_chain(&e)))?;
    serde_json::from_slice(&body)
        .map(|v| (code, v))
        .map_err(|_| {
            let start: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            format!("answered {code} with a body that is not JSON: {start}")
        })
}

fn consumer_view(
    name: &str,
    url: &str,
    answer: std::result::Result<(u16, Value), String>,
) -> Markup {
    html! {
        div.consumer data-name=(name) {
            h3 { (name) " " small { a href=(url) { (url) } } }
            @match &answer {
                Err(e) => p.error.unreachable { (e) },
                Ok((code, status)) => {
                    @if let Some(c) = status.get("consumer").filter(|c| c.is_object()) {
                        (health_view(*code, status, c))
                    } @else {
                        p { "HTTP " (code) " (not the shape of kourier's health status: all fields below)" }
                    }
                    details open[status.get("consumer").is_none_or(|c| !c.is_object())] {
                        summary { "all fields" }
                        (key_values(status))
                    }
                }
            }
        }
    }
}

/// kourier's health status (`{"live","ready","reasons","consumer":{...}}`), every field
/// optional: a field that is missing or of another type shows as `-`.
fn health_view(code: u16, status: &Value, c: &Value) -> Markup {
    let text = |v: Option<&Value>| match v {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let yes_no = |v: Option<&Value>| match v.and_then(Value::as_bool) {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    };
    let reasons: Vec<String> = status
        .get("reasons")
        .and_then(Value::as_array)
        .map(|r| r.iter().map(|v| text(Some(v))).collect())
        .unwrap_or_default();
    let partitions = c
        .get("partitions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let breaker = c.get("breaker").filter(|b| b.is_object());
    let destinations = c.get("destinations").filter(|d| d.is_object());
    html! {
        p.health {
            "HTTP " (code) " · live: " b.live { (yes_no(status.get("live"))) }
            " · ready: " b.ready { (yes_no(status.get("ready"))) }
            " · state: " b.state { (text(c.get("state"))) }
            " · connection: " (text(c.get("connection")))
            " · caught up: " (yes_no(c.get("caught_up")))
            " · in flight: " b.in-flight { (text(c.get("in_flight"))) }
            " · waiting retry: " (text(c.get("waiting_retry")))
            " · buffered: " (text(c.get("buffered_records")))
        }
        @if !reasons.is_empty() {
            ul.reasons { @for r in &reasons { li { (r) } } }
        }
        @if let Some(f) = c.get("failure").filter(|f| !f.is_null()) { p.error { "failure: " (text(Some(f))) } }
        table.partitions {
            thead { tr { th { "topic" } th { "partition" } th { "committed" } th { "end" } th { "lag" } th { "paused" } } }
            tbody {
                @for p in &partitions {
                    tr {
                        td { (text(p.get("topic"))) } td { (text(p.get("partition"))) }
                        td { (text(p.get("committed"))) } td { (text(p.get("end_offset"))) }
                        td.lag { (text(p.get("lag"))) } td { (yes_no(p.get("paused"))) }
                    }
                }
                @if partitions.is_empty() { tr { td colspan="6" { "no partitions assigned" } } }
            }
        }
        p.breaker {
            "outage breaker: " b { (breaker.map_or_else(|| "none".to_owned(), |b| text(b.get("state")))) }
            @if let Some(b) = breaker {
                " since " (text(b.get("since"))) ", held failures " (text(b.get("held_failures")))
                ", waiting " (text(b.get("waiting")))
            }
            @if let Some(d) = destinations {
                " · destination breakers: " (text(d.get("open"))) " open of " (text(d.get("tracked"))) " tracked"
            }
        }
        @if let Some(top) = destinations.and_then(|d| d.get("top")).and_then(Value::as_array).filter(|t| !t.is_empty()) {
            table.destinations {
                thead { tr { th { "destination" } th { "state" } th { "held failures" } th { "waiting" } } }
                tbody { @for d in top { tr {
                    td { (text(d.get("name"))) } td { (text(d.get("state"))) }
                    td { (text(d.get("held_failures"))) } td { (text(d.get("waiting"))) }
                } } }
            }
        }
        @if let Some(outcomes) = c.get("outcomes") {
            div.outcomes { h4 { "outcomes" } (key_values(outcomes)) }
        }
    }
}

/// Any JSON as `path: value` rows (at most [`MAX_STATUS_ROWS`]).
fn key_values(v: &Value) -> Markup {
    let mut rows = Vec::new();
    flatten("", v, &mut rows);
    let more = rows.len() > MAX_STATUS_ROWS;
    rows.truncate(MAX_STATUS_ROWS);
    html! {
        table.fields {
            @for (k, v) in &rows { tr { th { (k) } td { (v) } } }
        }
        @if more { p.note { "(cut at " (MAX_STATUS_ROWS) " rows)" } }
    }
}

fn flatten(path: &str, v: &Value, out: &mut Vec<(String, String)>) {
    if out.len() > MAX_STATUS_ROWS {
        return;
    }
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                flatten(&join(k), v, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{path}[{i}]"), v, out);
            }
        }
        Value::String(s) => out.push((path.to_owned(), s.clone())),
        other => out.push((path.to_owned(), other.to_string())),
    }
}

// ───────────── helpers ─────────────

fn page(title: &str, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { (title) }
                    style { (STYLE) }
                }
                body {
                    h1 { a href="/" { "kourier console" } }
                    (body)
                }
            }
        }
        .into_string(),
    )
}

const STYLE: &str = "body{font-family:sans-serif;margin:1em 2em}table{border-collapse:collapse;margin:.5em 0}\
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}\
.error{color:#a00}.note{color:#555}pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap;word-break:break-all}\
h1 a{color:inherit;text-decoration:none}tr.provenance td{color:#555}";

fn error_page(code: StatusCode, message: &str) -> Response {
    (
        code,
        page(
            "kourier console: error",
            html! { p.error { (message) } p { a href="/" { "← back to the console" } } },
        ),
    )
        .into_response()
}

/// Bytes as text when they are UTF-8 without control characters (but tabs and line breaks),
/// else as hex (Spring Kafka's binary provenance headers, for one); `null` for none.
fn bytes_text(bytes: Option<&[u8]>) -> String {
    let text = |s: &str| {
        s.chars()
            .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t'))
    };
    match bytes {
        None => "null".to_owned(),
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) if text(s) => s.to_owned(),
            _ => format!("hex: {}", hex(b)),
        },
    }
}

/// A letter's value: pretty JSON, else UTF-8 text, else a hex dump; cut at
/// [`MAX_VALUE_SHOWN`] bytes.
fn value_view(value: Option<&[u8]>) -> Markup {
    let Some(value) = value else {
        return html! { pre #value.null { "null" } };
    };
    let shown = &value[..value.len().min(MAX_VALUE_SHOWN)];
    let cut = shown.len() < value.len();
    let json = (!cut)
        .then(|| serde_json::from_slice::<Value>(value).ok())
        .flatten()
        .and_then(|json| serde_json::to_string_pretty(&json).ok());
    let (kind, text) = match json {
        Some(pretty) => ("JSON", pretty),
        None => match std::str::from_utf8(shown) {
            Ok(s) => ("UTF-8 text", s.to_owned()),
            // UTF-8 cut in the middle of a character by the bound.
            Err(e) if cut && e.error_len().is_none() => (
                "UTF-8 text",
                String::from_utf8_lossy(&shown[..e.valid_up_to()]).into_owned(),
            ),
            Err(_) => ("bytes (hex)", hex_dump(shown)),
        },
    };
    html! {
        p.note #value-kind { (value.len()) " bytes, shown as " (kind)
            @if cut { " (first " (MAX_VALUE_SHOWN) " bytes)" } }
        pre #value { (text) }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// 16 bytes a line: offset, hex, printable ASCII.
fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}  ", i * 16);
        for b in line {
            let _ = write!(out, "{b:02x} ");
        }
        for _ in line.len()..16 {
            out.push_str("   ");
        }
        out.push(' ');
        out.extend(line.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        }));
        out.push('\n');
    }
    out
}

fn time(t: Option<std::time::SystemTime>) -> String {
    t.and_then(dlt::rfc3339_seconds)
        .unwrap_or_else(|| "-".to_owned())
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_are_escaped() {
        let hostile = "<script>alert(1)</script>";
        let page = value_view(Some(hostile.as_bytes())).into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;"), "{page}");
    }

    #[test]
    fn values_are_decoded() {
        let json = value_view(Some(br#"{"a":1}"#)).into_string();
        assert!(json.contains("shown as JSON"), "{json}");
        let binary = value_view(Some(&[0xff, 0x00, b'a'])).into_string();
        assert!(binary.contains("ff 00 61"), "{binary}");
        assert_eq!(bytes_text(Some(&[0, 0, 0, 3])), "hex: 00000003");
        assert_eq!(bytes_text(Some(b"e-1")), "e-1");
        assert_eq!(bytes_text(None), "null");
    }

    #[test]
    fn another_site_cannot_post() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(cross_site(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(cross_site(&h));
    }

    /// The shape of kourier's health routes' `GET /status` (`kourier::health`).
    #[test]
    fn the_health_status_is_shown_by_part() {
        let v: Value = serde_json::json!({
            "live": true, "ready": false, "reasons": ["breaker open"],
            "consumer": {
                "state": "running", "failure": null, "since_last_poll_ms": 12,
                "connection": "connected", "connection_since": "2026-12-06T23:00:00.000Z",
                "assigned": [{"topic": "notify.v1", "partition": 0}], "paused": [],
                "partitions": [{"topic": "notify.v1", "partition": 0, "committed": 40,
                                "end_offset": 57, "lag": 17, "paused": true}],
                "caught_up": false, "in_flight": 3, "waiting_retry": 1,
                "buffered_records": 9, "buffered_bytes": 900,
                "outcomes": {"handled": 40, "retried": 6,
                             "dead_lettered": {"decode": 0, "permanent": 2,
                                               "retries_exhausted": 1, "panic": 0},
                             "duplicates": 0, "forwarded": [0], "panics": 0, "stalled": 0,
                             "abandoned": 0, "skipped_finished": 0},
                "breaker": {"state": "open", "since": "2026-12-06T23:01:00.000Z", "opened": 1,
                            "probes": 0, "held_failures": 5, "waiting": 3,
                            "open_interval_ms": 5000, "recent": []},
                "destinations": {"tracked": 4, "open": 1, "untracked": 0,
                                 "top": [{"name": "hooks.example", "state": "open",
                                          "gone": false, "since": "2026-12-06T23:01:00.000Z",
                                          "opened": 1, "held_failures": 3, "waiting": 2}]},
            },
        });
        let page = consumer_view("svc", "http://h/status", Ok((200, v))).into_string();
        for shown in [
            "ready: <b class=\"ready\">no</b>",
            "<li>breaker open</li>",
            "<td class=\"lag\">17</td>",
            "outage breaker: <b>open</b>",
            "1 open of 4 tracked",
            "<td>hooks.example</td>",
            "in flight: <b class=\"in-flight\">3</b>",
            "<th>dead_lettered.permanent</th><td>2</td>",
        ] {
            assert!(page.contains(shown), "{shown} not in {page}");
        }
        assert!(!page.contains("not the shape"), "{page}");
    }

    #[test]
    fn unknown_status_shapes_show_as_fields() {
        let v: Value = serde_json::json!({"ok": true, "lag": {"t/0": 5}});
        let page = consumer_view("x", "http://h/status", Ok((200, v))).into_string();
        assert!(page.contains("lag.t/0"), "{page}");
        assert!(page.contains("not the shape"), "{page}");
    }
}
