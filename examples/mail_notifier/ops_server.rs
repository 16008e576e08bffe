//! The notifier's ops endpoint: one HTTP server on `--metrics-addr` for Prometheus and for
//! liveness and readiness probes — kourier's health routes (`kourier::health`, feature
//! `health`) mounted in the example's own axum router, next to a page of its own (`GET /`,
//! an index of the routes).
//!
//! | request | `200` | otherwise |
//! |---|---|---|
//! | `GET /` | this index, plain text | |
//! | `GET /metrics` | kourier's metrics in the Prometheus text format | |
//! | `GET /livez` | the consumer is starting, running (its poll loop going round) or draining at shutdown | `503` once it has stopped or failed |
//! | `GET /readyz` | the consumer runs, reaches the cluster and has at least one partition assigned | `503` with the reasons |
//! | `GET /status` | the consumer's snapshot as JSON (partitions, lag, breaker, in flight, outcomes) | |
//! | anything else | | `404` (`405` for a method other than `GET`/`HEAD`) |
//!
//! The probes answer JSON: `{"ready":true,"reasons":[]}`,
//! `{"ready":false,"reasons":["no partitions assigned"]}`,
//! `{"live":false,"reasons":["consumer stopped"]}` (see `kourier::health` for every reason).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use kourier::health::{ConsumerSlot, Health, HealthServer};
use kourier::{Handler, RetryingConsumer, ShutdownReport};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Builds a Prometheus recorder for kourier's metrics (see `kourier::metrics`) and installs it
/// as the process' global recorder. Call it before the consumer runs: a consumer registers its
/// metrics when it starts. Must be called within a Tokio runtime (it spawns the recorder's
/// upkeep task).
///
/// # Errors
/// When the bucket settings are invalid or a global recorder is already installed.
pub(crate) fn install_prometheus() -> Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        // Histograms (rather than summaries) for handler and commit durations.
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    // What `PrometheusBuilder::install` would do: drain histogram samples now and then, so
    // they do not pile up between scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The consumer the probes report on, set once it is built: until then they answer that it
/// is starting. Cheap to clone; clones share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Probes {
    slot: ConsumerSlot,
}

impl Probes {
    /// Runs `consumer` until `shutdown` resolves (see [`RetryingConsumer::run`]), the probes
    /// reporting on it from now on (kourier's monitor follows it through running, draining,
    /// stopped or failed).
    ///
    /// # Errors
    /// As for [`RetryingConsumer::run`].
    pub(crate) async fn run<H: Handler>(
        self,
        consumer: RetryingConsumer<H>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> kourier::Result<ShutdownReport> {
        self.slot.set(consumer.monitor());
        consumer.run(shutdown).await
    }

    /// The health routes' view of the consumer (`/livez`, `/readyz`, `/status`).
    pub(crate) fn health(&self) -> Health {
        Health::new(self.slot.clone())
    }
}

/// The running server; stops when dropped.
#[derive(Debug)]
pub(crate) struct OpsServer {
    server: HealthServer,
}

/// `GET /`: what the server answers.
const INDEX: &str = "mail_notifier ops: /metrics (Prometheus), /livez, /readyz, /status (JSON)\n";

impl OpsServer {
    /// Listens on `addr` (port `0`: any free port) and serves `/metrics` from `metrics`,
    /// `/livez`, `/readyz` and `/status` from `probes`, and the index at `/`. kourier's
    /// server bounds its connections (`kourier::health::CONNECTION_LIFETIME`,
    /// `MAX_CONNECTIONS`): a slow client cannot hold the probes up.
    ///
    /// # Errors
    /// When it cannot listen on `addr`.
    pub(crate) async fn start(
        addr: SocketAddr,
        metrics: PrometheusHandle,
        probes: Probes,
    ) -> Result<Self> {
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { INDEX }))
            .merge(probes.health().metrics(move || metrics.render()).router());
        let server = kourier::health::serve_router(addr, app)
            .await
            .with_context(|| format!("listening on {addr} for metrics and probes"))?;
        Ok(OpsServer { server })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}
