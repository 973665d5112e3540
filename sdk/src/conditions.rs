use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Builds a status `conditions` list the Kubernetes way: each condition
/// keeps its `lastTransitionTime` unless its status flips, so an unchanged
/// world yields an identical status (and the host writes nothing).
#[derive(Debug, Clone)]
pub struct Conditions<'a> {
    previous: &'a [Condition],
    now: Time,
    observed_generation: Option<i64>,
    out: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    /// Starts from the parent's current conditions (`previous`), the call's
    /// `now`, and the parent's `metadata.generation`.
    pub fn new(previous: &'a [Condition], now: &Time, observed_generation: Option<i64>) -> Self {
        Self {
            previous,
            now: now.clone(),
            observed_generation,
            out: Vec::new(),
        }
    }

    /// Sets condition `type_` to `status` with a reason and message.
    pub fn set(
        mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        let status = if status { "True" } else { "False" }.to_owned();
        let last_transition_time = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| self.now.clone());
        self.out.retain(|c| c.type_ != type_);
        self.out.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.into(),
            last_transition_time,
            observed_generation: self.observed_generation,
        });
        self
    }

    /// The finished list, in the order the conditions were set.
    pub fn build(self) -> Vec<Condition> {
        self.out
    }
}
