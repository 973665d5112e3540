//! # WebServer plugin
//!
//! The kubebuilder talk's example as a kuwa plugin: a `WebServer`
//! (`kuwa.dev/v1alpha1`) holding some HTML becomes
//!
//! * a ConfigMap `<name>-content` with `index.html` = `spec.content`,
//! * an nginx Deployment `<name>` mounting it, with `spec.replicas` and a
//!   `kuwa.dev/content-hash` Pod annotation so a content change rolls the Pods,
//! * a Service `<name>` on port 80.
//!
//! Status carries `readyReplicas`, `observedGeneration` and the conditions
//! `Available`, `Progressing` and `Degraded`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, PodSpec, PodTemplateSpec, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kuwa_sdk::{
    Conditions, Description, Desired, Error, Observed, Reconciler, child_meta, content_hash,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The most a ConfigMap may hold (keys plus values), as the API server
/// enforces it. Content larger than this can never be served.
pub const CONFIG_MAP_MAX_BYTES: usize = 1024 * 1024;

/// The ConfigMap key nginx serves.
const INDEX_KEY: &str = "index.html";

/// Pod annotation carrying the content hash; changing it rolls the Pods.
pub const CONTENT_HASH_ANNOTATION: &str = "kuwa.dev/content-hash";

/// A web server serving one static page.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "kuwa.dev",
    version = "v1alpha1",
    kind = "WebServer",
    plural = "webservers",
    shortname = "ws",
    namespaced,
    status = "WebServerStatus",
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WebServerSpec {
    /// The HTML served as `index.html`.
    pub content: String,
    /// How many nginx Pods to run.
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Which web server software to run.
    #[serde(default)]
    pub software: Software,
}

/// The web server software and its version.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Software {
    /// The server; only nginx for now.
    pub name: SoftwareName,
    /// Image tag of the server.
    #[serde(default = "default_version")]
    pub version: String,
}

/// Supported web servers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SoftwareName {
    /// nginx, serving from `/usr/share/nginx/html`.
    Nginx,
}

fn default_version() -> String {
    "1.27".to_owned()
}

impl Default for Software {
    fn default() -> Self {
        Self {
            name: SoftwareName::Nginx,
            version: default_version(),
        }
    }
}

/// What the plugin observed of the WebServer's children.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebServerStatus {
    /// nginx Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The plugin.
pub struct WebServerPlugin;

fn content_map_name(parent: &WebServer) -> String {
    format!(
        "{}-content",
        parent.metadata.name.as_deref().unwrap_or_default()
    )
}

fn selector_labels(parent: &WebServer) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "webserver".to_owned()),
        (
            "app.kubernetes.io/instance".to_owned(),
            parent.metadata.name.clone().unwrap_or_default(),
        ),
    ])
}

fn validate(spec: &WebServerSpec) -> Result<(), Error> {
    if spec.replicas < 0 {
        return Err(Error::invalid_spec(format!(
            "spec.replicas must be 0 or more, got {}",
            spec.replicas
        )));
    }
    let size = spec.content.len() + INDEX_KEY.len();
    if size > CONFIG_MAP_MAX_BYTES {
        return Err(Error::invalid_spec(format!(
            "spec.content is {} bytes; a ConfigMap holds at most {CONFIG_MAP_MAX_BYTES} bytes",
            spec.content.len()
        )));
    }
    if spec.software.version.is_empty()
        || !spec
            .software
            .version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(Error::invalid_spec(format!(
            "spec.software.version {:?} is not a valid image tag",
            spec.software.version
        )));
    }
    Ok(())
}

fn config_map(parent: &WebServer) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(parent, content_map_name(parent)),
        data: Some(BTreeMap::from([(
            INDEX_KEY.to_owned(),
            parent.spec.content.clone(),
        )])),
        ..ConfigMap::default()
    }
}

fn deployment(parent: &WebServer) -> Deployment {
    let name = parent.metadata.name.clone().unwrap_or_default();
    let labels = selector_labels(parent);
    let mut meta = child_meta(parent, name.clone());
    meta.labels.get_or_insert_default().extend(labels.clone());
    let image = format!("nginx:{}", parent.spec.software.version);
    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(parent.spec.replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        CONTENT_HASH_ANNOTATION.to_owned(),
                        content_hash(parent.spec.content.as_bytes()),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "nginx".to_owned(),
                        image: Some(image),
                        ports: Some(vec![ContainerPort {
                            name: Some("http".to_owned()),
                            container_port: 80,
                            ..ContainerPort::default()
                        }]),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "content".to_owned(),
                            mount_path: "/usr/share/nginx/html".to_owned(),
                            read_only: Some(true),
                            ..VolumeMount::default()
                        }]),
                        ..Container::default()
                    }],
                    volumes: Some(vec![Volume {
                        name: "content".to_owned(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: content_map_name(parent),
                            ..ConfigMapVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn service(parent: &WebServer) -> Service {
    let name = parent.metadata.name.clone().unwrap_or_default();
    Service {
        metadata: child_meta(parent, name),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(parent)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: 80,
                target_port: Some(IntOrString::String("http".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Reads the rollout state of the observed Deployment into a status.
fn status(parent: &WebServer, observed: &Observed) -> Result<WebServerStatus, Error> {
    let name = parent.metadata.name.as_deref().unwrap_or_default();
    let generation = parent.metadata.generation;
    let previous = parent
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let want = parent.spec.replicas;
    let deployment = observed.child::<Deployment>(name)?;
    let (ready, rolled_out) = match &deployment {
        None => (0, false),
        Some(d) => {
            let st = d.status.clone().unwrap_or_default();
            let current =
                st.observed_generation.is_some() && st.observed_generation >= d.metadata.generation;
            let spec_matches = d.spec.as_ref().and_then(|s| s.replicas) == Some(want);
            let ready = st.ready_replicas.unwrap_or(0);
            let updated = st.updated_replicas.unwrap_or(0);
            let total = st.replicas.unwrap_or(0);
            (
                ready,
                current && spec_matches && ready == want && updated == want && total == want,
            )
        }
    };
    let conditions = Conditions::new(previous, observed.now(), generation);
    let conditions = if rolled_out {
        conditions
            .set(
                "Available",
                true,
                "ReplicasReady",
                format!("{ready}/{want} replicas ready"),
            )
            .set(
                "Progressing",
                false,
                "RolloutComplete",
                "the Deployment is rolled out",
            )
    } else {
        conditions
            .set(
                "Available",
                false,
                "ReplicasNotReady",
                format!("{ready}/{want} replicas ready"),
            )
            .set(
                "Progressing",
                true,
                "RollingOut",
                "waiting for the Deployment to roll out",
            )
    };
    Ok(WebServerStatus {
        ready_replicas: ready,
        observed_generation: generation,
        conditions: conditions
            .set("Degraded", false, "AsExpected", "the spec is valid")
            .build(),
    })
}

impl Reconciler for WebServerPlugin {
    type Parent = WebServer;
    type Status = WebServerStatus;

    fn describe() -> Description {
        Description::new::<WebServer>("webserver", env!("CARGO_PKG_VERSION"))
            .owns::<ConfigMap>()
            .owns::<Deployment>()
            .owns::<Service>()
    }

    fn reconcile(
        parent: &WebServer,
        observed: &Observed,
    ) -> Result<Desired<WebServerStatus>, Error> {
        validate(&parent.spec)?;
        Ok(Desired::new()
            .child(config_map(parent))
            .child(deployment(parent))
            .child(service(parent))
            .status(status(parent, observed)?))
    }
}

#[cfg(feature = "component")]
kuwa_sdk::export_plugin!(WebServerPlugin);

#[cfg(test)]
mod tests;
