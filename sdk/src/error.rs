use std::fmt;

/// Why a reconcile failed. Each case maps to one case of the WIT
/// `reconcile-error` variant and tells the host what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The spec can never be reconciled as written. The host applies nothing,
    /// sets `Degraded=True` on the parent with this message, records a Warning
    /// event, and does not retry until the parent changes (or the next resync).
    InvalidSpec(String),
    /// A temporary failure: retried with exponential backoff.
    Transient(String),
    /// The plugin could not understand its input: retried with backoff;
    /// usually a bug or a version skew between plugin and cluster.
    BadInput(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidSpec`].
    pub fn invalid_spec(message: impl Into<String>) -> Self {
        Self::InvalidSpec(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidSpec(m) => write!(f, "invalid spec: {m}"),
            Self::Transient(m) => write!(f, "transient failure: {m}"),
            Self::BadInput(m) => write!(f, "bad input: {m}"),
        }
    }
}

impl std::error::Error for Error {}
