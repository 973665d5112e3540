//! A tiny firewall API on loopback, the stand-in for a cloud firewall in the
//! SecurityPolicy tests: it stores rules, records every request, and can be
//! told to fail.
//!
//! * `PUT /v1/rules/{name}` stores the JSON body and answers `{"id": ...}`
//!   (503 while failing);
//! * `GET /v1/rules/{name}` answers the rule or 404;
//! * `DELETE /v1/rules/{name}` removes it (404 if absent).
//!
//! One request per connection (`Connection: close`); the server task ends
//! when the handle drops.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The method.
    pub method: String,
    /// The path.
    pub path: String,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Default)]
struct State {
    rules: BTreeMap<String, Value>,
    seen: Vec<Seen>,
    failing: bool,
}

/// A running firewall API.
pub struct Firewall {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Firewall {
    /// Starts the server on a free loopback port.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`, the origin to grant.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The API's base URL, for `spec.firewall.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("{}/v1", self.origin())
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Makes every PUT answer 503 (or not).
    pub fn set_failing(&self, failing: bool) {
        self.with(|s| s.failing = failing);
    }

    /// The stored rule `name`.
    pub fn rule(&self, name: &str) -> Option<Value> {
        self.with(|s| s.rules.get(name).cloned())
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[header_end..(header_end + length).min(buf.len())];
    let (status, reply) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            at: Instant::now(),
        });
        match (method.as_str(), path.strip_prefix("/v1/rules/")) {
            (_, None) | (_, Some("")) => (404, json!({"error": "no such path"})),
            ("PUT", Some(_)) if s.failing => (503, json!({"error": "firewall unavailable"})),
            ("PUT", Some(name)) => match serde_json::from_slice::<Value>(body) {
                Ok(rule) => {
                    s.rules.insert(name.to_owned(), rule);
                    (200, json!({"id": format!("fw-{name}")}))
                }
                Err(e) => (400, json!({"error": e.to_string()})),
            },
            ("GET", Some(name)) => match s.rules.get(name) {
                Some(rule) => (200, rule.clone()),
                None => (404, json!({"error": "no such rule"})),
            },
            ("DELETE", Some(name)) => match s.rules.remove(name) {
                Some(_) => (200, json!({})),
                None => (404, json!({"error": "no such rule"})),
            },
            _ => (405, json!({"error": "method not allowed"})),
        }
    };
    let body = reply.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
