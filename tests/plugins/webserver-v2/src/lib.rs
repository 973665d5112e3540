//! Test plugin `webserver-v2`: version `0.2.0-test` of the WebServer plugin,
//! for the hot-swap tests.
//!
//! It reconciles exactly like the shipped plugin (same name, parent kind and
//! children) and labels every child `test.kuwa.dev/v2: "true"`, so a test can see
//! which version wrote each child.

use kuwa_plugin_webserver::{WebServer, WebServerPlugin, WebServerStatus};
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler};
use serde_json::Value;

/// The version this plugin describes.
pub const VERSION: &str = "0.2.0-test";

/// The label every child of this version carries.
pub const LABEL: &str = "test.kuwa.dev/v2";

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = WebServer;
    type Status = WebServerStatus;

    fn describe() -> Description {
        Description {
            version: VERSION.into(),
            ..WebServerPlugin::describe()
        }
    }

    fn reconcile(
        parent: &WebServer,
        observed: &Observed,
    ) -> Result<Desired<WebServerStatus>, Error> {
        let mut desired = WebServerPlugin::reconcile(parent, observed)?;
        for child in desired.children_mut() {
            let labels = &mut child["metadata"]["labels"];
            if !labels.is_object() {
                *labels = Value::Object(Default::default());
            }
            labels[LABEL] = Value::from("true");
        }
        Ok(desired)
    }
}

kuwa_sdk::export_plugin!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_the_webserver_plugin_at_the_new_version() {
        let (v1, v2) = (WebServerPlugin::describe(), Plugin::describe());
        assert_eq!(v2.version, VERSION);
        assert_eq!(
            (v2.name, v2.parent, v2.children),
            (v1.name, v1.parent, v1.children)
        );
    }
}
