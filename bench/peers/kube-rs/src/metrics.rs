//! The counters and the HTTP endpoints: `GET /metrics` (OpenMetrics text)
//! and `GET /readyz` (200 once every watch has listed once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// The peer's counters.
pub struct Metrics {
    registry: Registry,
    /// API write requests sent: applies, status writes, deletes.
    pub writes: Counter,
    /// Reconcile calls.
    pub reconciles: Counter,
    /// Whether the parent and child watches have all listed once.
    pub ready: AtomicBool,
}

impl Metrics {
    /// Registers `peer_writes_total` and `peer_reconciles_total`.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let writes = Counter::default();
        let reconciles = Counter::default();
        registry.register(
            "peer_writes",
            "API write requests sent (applies, status writes, deletes)",
            writes.clone(),
        );
        registry.register("peer_reconciles", "Reconcile calls", reconciles.clone());
        Self {
            registry,
            writes,
            reconciles,
            ready: AtomicBool::new(false),
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn readyz(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}

/// Binds `addr` now (so a taken port fails start-up) and serves in the
/// background.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP server stopped");
        }
    });
    Ok(())
}
