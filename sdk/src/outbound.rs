//! HTTP calls to systems outside the cluster, made by the host on the
//! plugin's behalf (the WIT `outbound` import, `kuwa:controller@0.1.1`).
//!
//! Only the origins the plugin's grant lists under `outbound.hosts` can be
//! reached; any other URL fails at once with [`Error::NotAllowed`] and
//! nothing is sent. Every call runs inside the reconcile's deadline.
//!
//! A reconcile may run again at any time, so make every call safe to
//! repeat: PUT the whole desired state rather than POST a change, and read
//! before writing when the remote side can drift.
//!
//! ```text
//! let response = kuwa_sdk::outbound::send(
//!     &Request::put(format!("{endpoint}/rules/{id}")).json(&rule),
//! )?;
//! ```
//!
//! Natively (fixture tests), requests are answered by the responder that
//! [`crate::testing::Fixture::outbound`] installs for the reconcile; with
//! none, every call fails.

use std::fmt;

/// One HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method (`GET`, `PUT`, `POST`, `PATCH`, `DELETE`, `HEAD`).
    pub method: String,
    /// An absolute URL whose origin the grant lists.
    pub url: String,
    /// Headers (name, value).
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    pub body: Option<String>,
}

impl Request {
    /// A request with `method` to `url`.
    pub fn new(method: &str, url: impl Into<String>) -> Self {
        Self {
            method: method.to_owned(),
            url: url.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// A `GET` of `url`.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    /// A `PUT` to `url`.
    pub fn put(url: impl Into<String>) -> Self {
        Self::new("PUT", url)
    }

    /// A `DELETE` of `url`.
    pub fn delete(url: impl Into<String>) -> Self {
        Self::new("DELETE", url)
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets a JSON body (and its content type).
    pub fn json(mut self, body: &impl serde::Serialize) -> Self {
        self.body = Some(serde_json::to_string(body).expect("a JSON body serializes"));
        self.header("content-type", "application/json")
    }
}

/// One HTTP response, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers (lower-case name, value).
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_str(&self.body).map_err(|e| {
            Error::Failed(format!(
                "the response (HTTP {}) is not the JSON expected: {e}",
                self.status
            ))
        })
    }
}

/// Why no response came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The origin is not granted (or the URL is not absolute http/https):
    /// nothing was sent.
    NotAllowed(String),
    /// A malformed request (method, header): nothing was sent.
    InvalidRequest(String),
    /// This reconcile already made as many calls as its grant allows.
    TooManyCalls(String),
    /// No response in time.
    Timeout(String),
    /// The response body is larger than the grant allows.
    TooLarge(String),
    /// Connecting or talking to the server failed.
    Failed(String),
}

impl Error {
    /// A short UpperCamelCase reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAllowed(_) => "NotAllowed",
            Self::InvalidRequest(_) => "InvalidRequest",
            Self::TooManyCalls(_) => "TooManyCalls",
            Self::Timeout(_) => "Timeout",
            Self::TooLarge(_) => "ResponseTooLarge",
            Self::Failed(_) => "RequestFailed",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAllowed(m) => write!(f, "not allowed: {m}"),
            Self::InvalidRequest(m) => write!(f, "invalid request: {m}"),
            Self::TooManyCalls(m) => write!(f, "too many calls: {m}"),
            Self::Timeout(m) => write!(f, "timeout: {m}"),
            Self::TooLarge(m) => write!(f, "response too large: {m}"),
            Self::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Sends `request` through the host and waits for the response.
#[cfg(target_arch = "wasm32")]
pub fn send(request: &Request) -> Result<Response, Error> {
    use crate::wit::kuwa::controller::outbound as w;
    let answer = w::send(&w::Request {
        method: request.method.clone(),
        url: request.url.clone(),
        headers: request.headers.clone(),
        body: request.body.clone(),
    });
    match answer {
        Ok(r) => Ok(Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }),
        Err(e) => Err(match e {
            w::Error::NotAllowed(m) => Error::NotAllowed(m),
            w::Error::InvalidRequest(m) => Error::InvalidRequest(m),
            w::Error::TooManyCalls(m) => Error::TooManyCalls(m),
            w::Error::Timeout(m) => Error::Timeout(m),
            w::Error::TooLarge(m) => Error::TooLarge(m),
            w::Error::Failed(m) => Error::Failed(m),
        }),
    }
}

/// A native stand-in for the host: answers requests in fixture tests.
#[cfg(not(target_arch = "wasm32"))]
pub type Responder = Box<dyn FnMut(&Request) -> Result<Response, Error>>;

#[cfg(not(target_arch = "wasm32"))]
thread_local! {
    static RESPONDER: std::cell::RefCell<Option<Responder>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `responder` answering this thread's [`send`] calls.
#[cfg(not(target_arch = "wasm32"))]
pub fn with_responder<T>(responder: Responder, f: impl FnOnce() -> T) -> T {
    let previous = RESPONDER.with(|r| r.borrow_mut().replace(responder));
    let out = f();
    RESPONDER.with(|r| *r.borrow_mut() = previous);
    out
}

/// Natively: answered by the fixture's responder; without one every call
/// fails, as a plugin without an outbound grant would.
#[cfg(not(target_arch = "wasm32"))]
pub fn send(request: &Request) -> Result<Response, Error> {
    RESPONDER.with(|r| match r.borrow_mut().as_mut() {
        Some(respond) => respond(request),
        None => Err(Error::NotAllowed(
            "no outbound responder in this fixture (Fixture::outbound)".into(),
        )),
    })
}
