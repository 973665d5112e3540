//! The `outbound` import: HTTP requests a plugin makes through the host, to
//! the origins its grant lists ([`crate::tenant::outbound`]).
//!
//! Every request is checked before anything is sent (origin, method,
//! headers, body size, calls left in this reconcile), runs under the
//! shorter of the grant's timeout and what is left of the call's deadline,
//! follows no redirect, goes through no proxy, and has its response body
//! capped. Each one is logged for metrics (`kuwa_outbound_requests_total`)
//! and, in `kuwa plugin test`, recorded in the fixture format, which is also
//! how a test answers requests without a network ([`Transport::Fixtures`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::tenant::outbound::{MAX_REQUEST_BYTES, Origin, OutboundGrant};

/// The WIT types of the `outbound` interface.
pub use crate::plugin::runtime::wit_outbound as wit;

/// Methods a plugin may use.
const METHODS: [&str; 6] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"];

/// Headers the host sets itself (or that would let a plugin smuggle a
/// second request or reach a proxy).
const RESERVED_HEADERS: [&str; 8] = [
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
];

/// Most headers one request may carry.
const MAX_HEADERS: usize = 64;

/// Calls remembered between two drains of the log (more are counted as
/// dropped, never kept).
const MAX_LOGGED: usize = 4_096;

/// One request as recorded (and as a fixture matches it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RecordedRequest {
    /// The method.
    pub method: String,
    /// The URL.
    pub url: String,
    /// The body; in a fixture, when set, the request's body must equal it
    /// (as JSON when both parse as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// One response as recorded (or given by a fixture).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RecordedResponse {
    /// The HTTP status.
    pub status: u16,
    /// Headers (lower-case names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The body.
    #[serde(default)]
    pub body: String,
}

/// A request and what came of it: the format of `kuwa plugin test
/// --outbound FILE` and of the `outbound` list it prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Exchange {
    /// The request.
    pub request: RecordedRequest,
    /// The response, when one came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<RecordedResponse>,
    /// Why none came (recordings only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How requests are answered.
#[derive(Clone)]
pub enum Transport {
    /// Over the network (the HTTP client is built on first use).
    Network(Arc<OnceLock<Result<reqwest::Client, String>>>),
    /// From fixtures: the first exchange whose request matches answers; an
    /// unmatched request fails without touching the network.
    Fixtures(Arc<Vec<Exchange>>),
}

impl Default for Transport {
    fn default() -> Self {
        Self::Network(Arc::default())
    }
}

impl Transport {
    fn client(
        cell: &OnceLock<Result<reqwest::Client, String>>,
    ) -> Result<&reqwest::Client, String> {
        cell.get_or_init(|| {
            // The host's TLS provider (the CLI installs it too; a second
            // install is a no-op error).
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .user_agent(concat!("kuwa/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
    }
}

/// One call as logged for metrics (and, when recording, the exchange).
#[derive(Debug, Clone)]
pub struct Logged {
    /// The origin called (`-` when refused before one was known to be
    /// granted, so a plugin cannot mint label values).
    pub host: String,
    /// `2xx`..`5xx`, or why no response: `not_allowed`, `invalid`,
    /// `too_many_calls`, `timeout`, `too_large`, `failed`.
    pub result: &'static str,
    /// How long it took.
    pub seconds: f64,
    /// The exchange, when the plugin records.
    pub exchange: Option<Exchange>,
}

/// The calls of one loaded plugin since they were last drained.
#[derive(Default)]
pub struct OutboundLog {
    record: bool,
    calls: Mutex<Vec<Logged>>,
}

impl OutboundLog {
    /// A log that also keeps each exchange (`kuwa plugin test`).
    pub fn recording() -> Self {
        Self {
            record: true,
            calls: Mutex::default(),
        }
    }

    fn push(&self, logged: Logged) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if calls.len() < MAX_LOGGED {
            calls.push(logged);
        }
    }

    /// Takes every call logged so far.
    pub fn take(&self) -> Vec<Logged> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The outbound state of one call into a plugin.
pub struct OutboundCall {
    grant: Arc<OutboundGrant>,
    transport: Transport,
    log: Arc<OutboundLog>,
    ends: Instant,
    calls_left: u32,
}

/// A refused or failed request: the WIT error and its metric label.
struct Failure(wit::Error, &'static str);

fn refuse(label: &'static str, error: wit::Error) -> Failure {
    Failure(error, label)
}

impl OutboundCall {
    /// The outbound state of a call that ends at `ends`.
    pub fn new(
        grant: Arc<OutboundGrant>,
        transport: Transport,
        log: Arc<OutboundLog>,
        ends: Instant,
    ) -> Self {
        let calls_left = grant.max_calls;
        Self {
            grant,
            transport,
            log,
            ends,
            calls_left,
        }
    }

    /// Checks and sends `request`; logs it whatever happens.
    pub async fn send(&mut self, request: wit::Request) -> Result<wit::Response, wit::Error> {
        let started = Instant::now();
        let recorded = RecordedRequest {
            method: request.method.clone(),
            url: request.url.clone(),
            body: request.body.clone(),
        };
        let mut host = "-".to_owned();
        let outcome = self.checked_send(request, &mut host).await;
        let (result, exchange) = match &outcome {
            Ok(r) => (
                status_class(r.status),
                Exchange {
                    request: recorded,
                    response: Some(RecordedResponse {
                        status: r.status,
                        headers: r.headers.iter().cloned().collect(),
                        body: r.body.clone(),
                    }),
                    error: None,
                },
            ),
            Err(Failure(e, label)) => (
                *label,
                Exchange {
                    request: recorded,
                    response: None,
                    error: Some(describe(e)),
                },
            ),
        };
        self.log.push(Logged {
            host,
            result,
            seconds: started.elapsed().as_secs_f64(),
            exchange: self.log.record.then_some(exchange),
        });
        outcome.map_err(|Failure(e, _)| e)
    }

    async fn checked_send(
        &mut self,
        request: wit::Request,
        host: &mut String,
    ) -> Result<wit::Response, Failure> {
        use wit::Error as E;
        let url = url::Url::parse(&request.url).map_err(|e| {
            refuse(
                "not_allowed",
                E::NotAllowed(format!(
                    "{:?} is not an absolute URL ({e}); nothing was sent",
                    crate::plugin::runtime::shortened(&request.url)
                )),
            )
        })?;
        let origin = Origin::of(&url).map_err(|e| {
            refuse(
                "not_allowed",
                E::NotAllowed(format!("{e}; nothing was sent")),
            )
        })?;
        if self.grant.origins.is_empty() {
            return Err(refuse(
                "not_allowed",
                E::NotAllowed(format!(
                    "this plugin's grant allows no outbound calls (no outbound.hosts in its manifest), so not {origin}; nothing was sent"
                )),
            ));
        }
        if !self.grant.allows(&origin) {
            let granted: Vec<String> = self.grant.origins.iter().map(ToString::to_string).collect();
            return Err(refuse(
                "not_allowed",
                E::NotAllowed(format!(
                    "{origin} is not in this plugin's grant (outbound.hosts: [{}]); nothing was sent",
                    granted.join(", ")
                )),
            ));
        }
        *host = origin.to_string();
        if self.calls_left == 0 {
            return Err(refuse(
                "too_many_calls",
                E::TooManyCalls(format!(
                    "this reconcile already made {} requests, as many as its grant allows (outbound.maxCallsPerReconcile)",
                    self.grant.max_calls
                )),
            ));
        }
        self.calls_left -= 1;
        let method = request.method.to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            return Err(refuse(
                "invalid",
                E::InvalidRequest(format!(
                    "method {:?} is not one of {}",
                    crate::plugin::runtime::shortened(&request.method),
                    METHODS.join(", ")
                )),
            ));
        }
        if request.headers.len() > MAX_HEADERS {
            return Err(refuse(
                "invalid",
                E::InvalidRequest(format!(
                    "{} headers; at most {MAX_HEADERS} are allowed",
                    request.headers.len()
                )),
            ));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &request.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                refuse(
                    "invalid",
                    E::InvalidRequest(format!(
                        "{:?} is not a header name",
                        crate::plugin::runtime::shortened(name)
                    )),
                )
            })?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(refuse(
                    "invalid",
                    E::InvalidRequest(format!("the host sets the {name} header itself")),
                ));
            }
            let value = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                refuse(
                    "invalid",
                    E::InvalidRequest(format!("the value of header {name} is not valid")),
                )
            })?;
            headers.append(name, value);
        }
        if request
            .body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_REQUEST_BYTES)
        {
            return Err(refuse(
                "invalid",
                E::InvalidRequest(format!("the body is larger than {MAX_REQUEST_BYTES} bytes")),
            ));
        }
        let left = self.ends.saturating_duration_since(Instant::now());
        let timeout = self.grant.timeout.min(left);
        if timeout.is_zero() {
            return Err(refuse(
                "timeout",
                E::Timeout("the call's deadline has passed; nothing was sent".into()),
            ));
        }
        match &self.transport {
            Transport::Fixtures(exchanges) => answer_from(exchanges, &method, &request),
            Transport::Network(cell) => {
                let client = Transport::client(cell).map_err(|e| refuse("failed", E::Failed(e)))?;
                let method = reqwest::Method::from_bytes(method.as_bytes())
                    .expect("one of the methods above");
                let mut builder = client
                    .request(method, url)
                    .headers(headers)
                    .timeout(timeout);
                if let Some(body) = request.body {
                    builder = builder.body(body);
                }
                let cap = self.grant.max_response_bytes;
                let exchange = async {
                    let mut response = builder.send().await.map_err(|e| network_failure(&e))?;
                    let status = response.status().as_u16();
                    let headers = response
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect();
                    if response.content_length().is_some_and(|n| n > cap as u64) {
                        return Err(too_large(cap));
                    }
                    let mut body = Vec::new();
                    while let Some(chunk) =
                        response.chunk().await.map_err(|e| network_failure(&e))?
                    {
                        if body.len() + chunk.len() > cap {
                            return Err(too_large(cap));
                        }
                        body.extend_from_slice(&chunk);
                    }
                    Ok(wit::Response {
                        status,
                        headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    })
                };
                match tokio::time::timeout(timeout, exchange).await {
                    Ok(result) => result,
                    Err(_) => Err(timed_out(timeout)),
                }
            }
        }
    }
}

fn timed_out(after: Duration) -> Failure {
    refuse(
        "timeout",
        wit::Error::Timeout(format!("no response within {after:?}")),
    )
}

fn too_large(cap: usize) -> Failure {
    refuse(
        "too_large",
        wit::Error::TooLarge(format!(
            "the response body is larger than {cap} bytes (outbound.maxResponseBytes)"
        )),
    )
}

fn network_failure(e: &reqwest::Error) -> Failure {
    if e.is_timeout() {
        return refuse("timeout", wit::Error::Timeout(format!("{e}")));
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    refuse("failed", wit::Error::Failed(message))
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// One line for an error (recordings, `kuwa plugin test`).
pub fn describe(e: &wit::Error) -> String {
    match e {
        wit::Error::NotAllowed(m) => format!("not allowed: {m}"),
        wit::Error::InvalidRequest(m) => format!("invalid request: {m}"),
        wit::Error::TooManyCalls(m) => format!("too many calls: {m}"),
        wit::Error::Timeout(m) => format!("timeout: {m}"),
        wit::Error::TooLarge(m) => format!("too large: {m}"),
        wit::Error::Failed(m) => format!("failed: {m}"),
    }
}

fn same_body(fixture: &str, sent: Option<&str>) -> bool {
    let Some(sent) = sent else {
        return false;
    };
    match (
        serde_json::from_str::<serde_json::Value>(fixture),
        serde_json::from_str::<serde_json::Value>(sent),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => fixture == sent,
    }
}

fn answer_from(
    exchanges: &[Exchange],
    method: &str,
    request: &wit::Request,
) -> Result<wit::Response, Failure> {
    let found = exchanges.iter().find(|x| {
        x.request.method.eq_ignore_ascii_case(method)
            && x.request.url == request.url
            && x.request
                .body
                .as_deref()
                .is_none_or(|b| same_body(b, request.body.as_deref()))
    });
    match found {
        Some(Exchange {
            response: Some(r), ..
        }) => Ok(wit::Response {
            status: r.status,
            headers: r.headers.clone().into_iter().collect(),
            body: r.body.clone(),
        }),
        Some(Exchange { error: Some(e), .. }) => {
            Err(refuse("failed", wit::Error::Failed(e.clone())))
        }
        _ => Err(refuse(
            "failed",
            wit::Error::Failed(format!(
                "no fixture answers {method} {} (kuwa plugin test --outbound FILE; or --live to send it)",
                request.url
            )),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::outbound::ManifestOutbound;

    fn call(hosts: &[&str], transport: Transport, deadline: Duration) -> OutboundCall {
        let grant = OutboundGrant::from_manifest(
            ManifestOutbound {
                hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
                max_calls_per_reconcile: Some(2),
                ..ManifestOutbound::default()
            },
            &|m: String| m,
        )
        .unwrap();
        OutboundCall::new(
            Arc::new(grant),
            transport,
            Arc::new(OutboundLog::recording()),
            Instant::now() + deadline,
        )
    }

    fn get(url: &str) -> wit::Request {
        wit::Request {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    fn fixtures() -> Transport {
        Transport::Fixtures(Arc::new(vec![Exchange {
            request: RecordedRequest {
                method: "put".into(),
                url: "http://127.0.0.1:9/rules/a".into(),
                body: Some(r#"{"b": 2, "a": 1}"#.into()),
            },
            response: Some(RecordedResponse {
                status: 200,
                headers: BTreeMap::new(),
                body: r#"{"id":"r-1"}"#.into(),
            }),
            error: None,
        }]))
    }

    #[tokio::test]
    async fn an_unlisted_origin_is_refused_before_anything_is_sent() {
        // The network transport: a request that got through would fail to
        // connect (port 9 on loopback), not be refused.
        let mut c = call(
            &["http://127.0.0.1:9"],
            Transport::default(),
            Duration::from_secs(1),
        );
        for url in [
            "http://127.0.0.1:10/",
            "https://127.0.0.1:9/",
            "http://localhost:9/",
            "/rules",
            "unix:/x",
        ] {
            match c.send(get(url)).await {
                Err(wit::Error::NotAllowed(m)) => assert!(m.contains("nothing was sent"), "{m}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        let logged = c.log.take();
        assert_eq!(logged.len(), 5);
        assert!(
            logged
                .iter()
                .all(|l| l.host == "-" && l.result == "not_allowed")
        );
        // Refusals use up no call: the grant's two are still there.
        assert_eq!(c.calls_left, 2);
    }

    #[tokio::test]
    async fn fixtures_answer_matching_requests_and_calls_are_capped() {
        let mut c = call(&["http://127.0.0.1:9"], fixtures(), Duration::from_secs(1));
        let put = wit::Request {
            method: "PUT".into(),
            url: "http://127.0.0.1:9/rules/a".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(r#"{"a":1,"b":2}"#.into()),
        };
        let r = c.send(put.clone()).await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, r#"{"id":"r-1"}"#));
        // Another body matches no fixture.
        let other = wit::Request {
            body: Some(r#"{"a":2}"#.into()),
            ..put.clone()
        };
        match c.send(other).await {
            Err(wit::Error::Failed(m)) => assert!(m.contains("no fixture answers PUT"), "{m}"),
            x => panic!("{x:?}"),
        }
        match c.send(put).await {
            Err(wit::Error::TooManyCalls(m)) => assert!(m.contains("maxCallsPerReconcile"), "{m}"),
            x => panic!("{x:?}"),
        }
        let logged = c.log.take();
        let results: Vec<_> = logged.iter().map(|l| (l.host.as_str(), l.result)).collect();
        assert_eq!(
            results,
            [
                ("http://127.0.0.1:9", "2xx"),
                ("http://127.0.0.1:9", "failed"),
                ("http://127.0.0.1:9", "too_many_calls")
            ]
        );
        let first = logged[0].exchange.as_ref().unwrap();
        assert_eq!(first.response.as_ref().unwrap().status, 200);
    }

    #[tokio::test]
    async fn bad_requests_are_refused_with_a_reason() {
        let mut c = call(&["http://127.0.0.1:9"], fixtures(), Duration::from_secs(1));
        let mut r = get("http://127.0.0.1:9/");
        r.method = "CONNECT".into();
        assert!(
            matches!(c.send(r).await, Err(wit::Error::InvalidRequest(m)) if m.contains("CONNECT"))
        );
        let mut r = get("http://127.0.0.1:9/");
        r.headers = vec![("Host".into(), "evil.test".into())];
        c.calls_left = 2;
        assert!(
            matches!(c.send(r).await, Err(wit::Error::InvalidRequest(m)) if m.contains("host"))
        );
        let mut r = get("http://127.0.0.1:9/");
        r.headers = vec![("x-a".into(), "line\r\nInjected: 1".into())];
        c.calls_left = 2;
        assert!(matches!(
            c.send(r).await,
            Err(wit::Error::InvalidRequest(_))
        ));
    }

    #[tokio::test]
    async fn a_slow_server_times_out_inside_the_deadline() {
        // A listener that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let origin = format!("http://127.0.0.1:{port}");
        let mut c = call(&[&origin], Transport::default(), Duration::from_millis(300));
        let started = Instant::now();
        let r = c.send(get(&format!("{origin}/slow"))).await;
        assert!(matches!(r, Err(wit::Error::Timeout(_))), "{r:?}");
        // The call's deadline (300 ms), not the grant's 2 s timeout.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        hold.abort();
    }
}
