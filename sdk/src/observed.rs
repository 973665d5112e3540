use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;

/// True when `object` has `K`'s `apiVersion` and `kind`.
pub(crate) fn is_kind<K: k8s_openapi::Resource>(object: &Value) -> bool {
    object["apiVersion"] == K::API_VERSION && object["kind"] == K::KIND
}

/// What the host observed for one parent: its children, related objects and
/// the call context. Typed accessors deserialize on demand.
#[derive(Debug, Clone)]
pub struct Observed {
    children: Vec<Value>,
    related: Vec<Value>,
    now: Time,
    trigger: String,
}

impl Observed {
    /// Builds an observation (the SDK does this from the host's input; tests
    /// may build one by hand).
    pub fn new(
        children: Vec<Value>,
        related: Vec<Value>,
        now: Time,
        trigger: impl Into<String>,
    ) -> Self {
        Self {
            children,
            related,
            now,
            trigger: trigger.into(),
        }
    }

    /// Parses the host's RFC 3339 `now`.
    pub(crate) fn parse_now(now: &str) -> Result<Time, Error> {
        now.parse::<Timestamp>()
            .map(Time)
            .map_err(|e| Error::BadInput(format!("context.now {now:?} is not RFC 3339: {e}")))
    }

    /// The observed children of kind `K`.
    pub fn children<K>(&self) -> Result<Vec<K>, Error>
    where
        K: DeserializeOwned + k8s_openapi::Resource,
    {
        typed(&self.children)
    }

    /// The observed child of kind `K` named `name`, if it exists.
    pub fn child<K>(&self, name: &str) -> Result<Option<K>, Error>
    where
        K: DeserializeOwned + k8s_openapi::Resource,
    {
        self.children
            .iter()
            .find(|c| is_kind::<K>(c) && c["metadata"]["name"] == name)
            .map(|c| parse::<K>(c))
            .transpose()
    }

    /// The related objects of kind `K`.
    pub fn related<K>(&self) -> Result<Vec<K>, Error>
    where
        K: DeserializeOwned + k8s_openapi::Resource,
    {
        typed(&self.related)
    }

    /// All observed children as JSON.
    pub fn children_json(&self) -> &[Value] {
        &self.children
    }

    /// All related objects as JSON.
    pub fn related_json(&self) -> &[Value] {
        &self.related
    }

    /// The host's clock at the start of this call.
    pub fn now(&self) -> &Time {
        &self.now
    }

    /// Why this reconcile runs (for logs).
    pub fn trigger(&self) -> &str {
        &self.trigger
    }
}

fn typed<K>(objects: &[Value]) -> Result<Vec<K>, Error>
where
    K: DeserializeOwned + k8s_openapi::Resource,
{
    objects
        .iter()
        .filter(|o| is_kind::<K>(o))
        .map(parse::<K>)
        .collect()
}

fn parse<K>(object: &Value) -> Result<K, Error>
where
    K: DeserializeOwned + k8s_openapi::Resource,
{
    K::deserialize(object).map_err(|e| {
        Error::BadInput(format!(
            "observed {} {:?} does not parse: {e}",
            K::KIND,
            object["metadata"]["name"]
        ))
    })
}
