//! # Ingress plugin
//!
//! The in-house Ingress controller of the talks (seeds 000 and 002) as a
//! kuwa plugin. Its parent is the built-in `networking.k8s.io/v1` Ingress
//! (no CRD of its own); it serves only `spec.ingressClassName: kuwa`, and an
//! Ingress of any other class gets nothing: no child, no status write.
//!
//! For each of its Ingresses it keeps
//!
//! * a ConfigMap `<name>-proxy` with an nginx configuration ([`render`]):
//!   one upstream per backend Service port with the ready endpoint addresses
//!   of its EndpointSlices, a server per host with its paths, TLS by secret
//!   name;
//! * an nginx Deployment `<name>-proxy` mounting it, with the configuration's
//!   hash as a Pod annotation, so a new configuration rolls the proxy;
//!
//! and sets `status.loadBalancer.ingress` to the address the `kuwa`
//! IngressClass names in its `ingress.kuwa.dev/load-balancer-address`
//! annotation (an IP or a hostname).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, PodSpec, PodTemplateSpec,
    SecretVolumeSource, Service, Volume, VolumeMount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{
    Ingress, IngressClass, IngressLoadBalancerIngress, IngressLoadBalancerStatus, IngressStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kuwa_sdk::{
    Description, Desired, Error, Observed, Reconciler, RelatedMapping, child_meta, content_hash,
};

pub mod render;

/// The class this controller serves.
pub const CLASS: &str = "kuwa";

/// The IngressClass annotation naming the address to publish in
/// `status.loadBalancer`.
pub const ADDRESS_ANNOTATION: &str = "ingress.kuwa.dev/load-balancer-address";

/// The Pod annotation carrying the configuration's hash.
pub const CONFIG_HASH_ANNOTATION: &str = "ingress.kuwa.dev/config-hash";

/// The proxy image.
pub const PROXY_IMAGE: &str = "nginx:1.27";

/// The plugin.
pub struct IngressPlugin;

/// The name of an Ingress's children.
pub fn proxy_name(ingress: &Ingress) -> String {
    format!(
        "{}-proxy",
        ingress.metadata.name.as_deref().unwrap_or_default()
    )
}

fn selector_labels(ingress: &Ingress) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "kuwa-ingress-proxy".to_owned(),
        ),
        (
            "app.kubernetes.io/instance".to_owned(),
            ingress.metadata.name.clone().unwrap_or_default(),
        ),
    ])
}

fn config_map(ingress: &Ingress, config: &str) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(ingress, proxy_name(ingress)),
        data: Some(BTreeMap::from([(
            "default.conf".to_owned(),
            config.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

fn deployment(ingress: &Ingress, config: &str, tls_secrets: &[String]) -> Deployment {
    let name = proxy_name(ingress);
    let labels = selector_labels(ingress);
    let mut meta = child_meta(ingress, name.clone());
    meta.labels.get_or_insert_default().extend(labels.clone());
    let mut mounts = vec![VolumeMount {
        name: "config".to_owned(),
        mount_path: "/etc/nginx/conf.d".to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "config".to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: name.clone(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    for (i, secret) in tls_secrets.iter().enumerate() {
        let volume = format!("tls-{i}");
        mounts.push(VolumeMount {
            name: volume.clone(),
            mount_path: format!("{}/{secret}", render::TLS_DIR),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: volume,
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let mut ports = vec![ContainerPort {
        name: Some("http".to_owned()),
        container_port: 80,
        ..ContainerPort::default()
    }];
    if !tls_secrets.is_empty() {
        ports.push(ContainerPort {
            name: Some("https".to_owned()),
            container_port: 443,
            ..ContainerPort::default()
        });
    }
    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        content_hash(config.as_bytes()),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "nginx".to_owned(),
                        image: Some(PROXY_IMAGE.to_owned()),
                        ports: Some(ports),
                        volume_mounts: Some(mounts),
                        ..Container::default()
                    }],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The `kuwa` IngressClass's published address, if any.
fn published_address(classes: &[IngressClass]) -> Option<String> {
    classes
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(CLASS))?
        .metadata
        .annotations
        .as_ref()?
        .get(ADDRESS_ANNOTATION)
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
}

fn load_balancer(address: &str) -> IngressStatus {
    let entry = if address.parse::<std::net::IpAddr>().is_ok() {
        IngressLoadBalancerIngress {
            ip: Some(address.to_owned()),
            ..IngressLoadBalancerIngress::default()
        }
    } else {
        IngressLoadBalancerIngress {
            hostname: Some(address.to_owned()),
            ..IngressLoadBalancerIngress::default()
        }
    };
    IngressStatus {
        load_balancer: Some(IngressLoadBalancerStatus {
            ingress: Some(vec![entry]),
        }),
    }
}

/// Whether this controller serves `ingress`.
pub fn is_ours(ingress: &Ingress) -> bool {
    ingress
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        == Some(CLASS)
}

impl Reconciler for IngressPlugin {
    type Parent = Ingress;
    type Status = IngressStatus;

    fn describe() -> Description {
        Description::for_kind::<Ingress>("ingress", env!("CARGO_PKG_VERSION"))
            .owns::<ConfigMap>()
            .owns::<Deployment>()
            .watches::<Service>(RelatedMapping::AllInNamespace)
            .watches::<EndpointSlice>(RelatedMapping::AllInNamespace)
            .watches::<IngressClass>(RelatedMapping::AllInCluster)
    }

    fn reconcile(ingress: &Ingress, observed: &Observed) -> Result<Desired<IngressStatus>, Error> {
        if !is_ours(ingress) {
            // Another controller's: no children (any left from when it was
            // ours are removed by the host) and no status.
            return Ok(Desired::new());
        }
        let services: Vec<Service> = observed.related()?;
        let slices: Vec<EndpointSlice> = observed.related()?;
        let classes: Vec<IngressClass> = observed.related()?;
        let plan = render::plan(ingress, &services, &slices)?;
        let config = render::nginx(ingress, &plan);
        let desired = Desired::new()
            .child(config_map(ingress, &config))
            .child(deployment(ingress, &config, &plan.tls_secrets));
        // Without an address the published one (if any) is withdrawn.
        let status = match published_address(&classes) {
            Some(address) => load_balancer(&address),
            None => IngressStatus {
                load_balancer: Some(IngressLoadBalancerStatus::default()),
            },
        };
        Ok(desired.status(status))
    }
}

#[cfg(feature = "component")]
kuwa_sdk::export_plugin!(IngressPlugin);

#[cfg(test)]
mod tests;
