//! Test plugin `noisy`: attacks output validation and the log import
//! (hole 8). A `NoisyTest` (`test.kuwa.dev/v1`) always yields a ConfigMap
//! `<name>-ok`, and by `spec.mode`:
//!
//! * `events`: also 10,000 Normal events with reason `Spam` (an event flood),
//! * `reason`: also one event whose reason `not a reason!!` is not
//!   UpperCamelCase,
//! * `finalizer`: the ConfigMap carries `metadata.finalizers:
//!   [example.com/block]` (a child that blocks namespace deletion),
//! * `label`: the ConfigMap carries the host's own label
//!   `kuwa.dev/plugin: webserver` (posing as another plugin's child),
//! * `log`: logs 5,000 lines of 8 KiB each through the host's log import,
//!   then answers normally,
//! * anything else: nothing more.
//!
//! Every log line starts with [`LOG_MARKER`] so a test can count the lines
//! that reached the host's log.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Event, Observed, Reconciler, child_meta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuwa.dev",
    version = "v1",
    kind = "NoisyTest",
    namespaced,
    status = "NoisyTestStatus"
)]
pub struct NoisyTestSpec {
    /// What to add to the one good ConfigMap.
    #[serde(default)]
    pub mode: String,
}

/// Status of the test kind: room for the host's `Degraded` condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
pub struct NoisyTestStatus {
    /// Conditions (the host's `Degraded`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Events returned in `events` mode.
pub const SPAM_EVENTS: usize = 10_000;
/// Lines logged in `log` mode.
pub const LOG_LINES: usize = 5_000;
/// Bytes of each line logged in `log` mode.
pub const LOG_LINE_BYTES: usize = 8 * 1024;
/// The start of every line logged in `log` mode.
pub const LOG_MARKER: &str = "noisy-log-line";

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = NoisyTest;
    type Status = NoisyTestStatus;

    fn describe() -> Description {
        Description::new::<NoisyTest>("test-noisy", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(
        parent: &NoisyTest,
        _observed: &Observed,
    ) -> Result<Desired<NoisyTestStatus>, Error> {
        let name = parent.metadata.name.clone().unwrap_or_default();
        let mut ok = ConfigMap {
            metadata: child_meta(parent, format!("{name}-ok")),
            data: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
            ..ConfigMap::default()
        };
        let mut desired = Desired::new();
        match parent.spec.mode.as_str() {
            "events" => {
                for i in 0..SPAM_EVENTS {
                    desired = desired.event(Event::normal("Spam", format!("spam {i}")));
                }
            }
            "reason" => {
                desired = desired.event(Event::normal("not a reason!!", "a bad reason"));
            }
            "finalizer" => {
                ok.metadata.finalizers = Some(vec!["example.com/block".to_owned()]);
            }
            "label" => {
                ok.metadata
                    .labels
                    .get_or_insert_with(BTreeMap::new)
                    .insert("kuwa.dev/plugin".to_owned(), "webserver".to_owned());
            }
            "log" => {
                let padding = "x".repeat(LOG_LINE_BYTES);
                for i in 0..LOG_LINES {
                    let mut line = format!("{LOG_MARKER} parent={name} i={i} ");
                    let room = LOG_LINE_BYTES.saturating_sub(line.len());
                    line.push_str(&padding[..room]);
                    kuwa_sdk::log::info(&line);
                }
            }
            _ => {}
        }
        Ok(desired.child(ok))
    }
}

kuwa_sdk::export_plugin!(Plugin);
