//! The host's HTTP endpoints: `/metrics`, `/healthz` (503 once a core task
//! of the host has died), `/readyz` (200 once every plugin's caches have
//! listed and while the API server answers), and `POST /resync` (queue every parent now, for operators and
//! tests).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::host::Host;

async fn metrics(State(host): State<Arc<Host>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        host.metrics.render(),
    )
}

async fn healthz(State(host): State<Arc<Host>>) -> (StatusCode, String) {
    let dead = host.health.dead();
    if dead.is_empty() {
        (StatusCode::OK, "ok".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("core tasks stopped: {}", dead.join(", ")),
        )
    }
}

async fn readyz(State(host): State<Arc<Host>>) -> (StatusCode, &'static str) {
    if !host.metrics.api_health.is_reachable() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the API server does not answer (see kuwa_api_reachable)",
        )
    } else if host.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}

async fn resync(State(host): State<Arc<Host>>) -> (StatusCode, &'static str) {
    host.resync_all();
    (StatusCode::ACCEPTED, "resync queued")
}

/// Binds `addr` now (so a taken port fails start-up) and serves in the
/// background.
pub async fn serve(
    addr: SocketAddr,
    host: Arc<Host>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/resync", post(resync))
        .with_state(host);
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    }))
}
