//! The children of a `Memcached`: backends, proxy configuration, proxy and
//! client Service. Quantities are written in the canonical form the API
//! server returns, so the host's diff sees no change when there is none.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kuwa_sdk::child_meta;

use crate::{MEMCACHED_PORT, MEMORY_OVERHEAD_MB, Memcached, PROXY_PORT, parent_name};

/// The ConfigMap key holding mcrouter's configuration.
pub const CONFIG_KEY: &str = "config.json";

/// Proxy Pod-template annotation carrying the hash of [`CONFIG_KEY`];
/// changing it rolls the proxy.
pub const CONFIG_HASH_ANNOTATION: &str = "kuwa.dev/config-hash";

/// The memcached image of the backends.
const MEMCACHED_IMAGE: &str = "memcached:1.6";

/// Where the proxy mounts its configuration.
const CONFIG_DIR: &str = "/etc/mcrouter";

/// Where mcrouter writes its stats files (an emptyDir).
const STATS_DIR: &str = "/var/mcrouter";

pub(crate) fn backend_service_name(parent: &Memcached) -> String {
    format!("{}-backends", parent_name(parent))
}

pub(crate) fn proxy_name(parent: &Memcached) -> String {
    format!("{}-proxy", parent_name(parent))
}

fn labels(parent: &Memcached, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "memcached".to_owned()),
        (
            "app.kubernetes.io/instance".to_owned(),
            parent_name(parent).to_owned(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
    ])
}

fn meta(parent: &Memcached, name: String, component: &str) -> ObjectMeta {
    let mut meta = child_meta(parent, name);
    meta.labels
        .get_or_insert_default()
        .extend(labels(parent, component));
    meta
}

/// `mebibytes` as the API server writes it: the largest binary suffix that
/// keeps the number whole (`80Mi`, `1Gi`, `1040Mi`).
pub(crate) fn canonical_mebibytes(mebibytes: i64) -> String {
    const SUFFIXES: [&str; 5] = ["Mi", "Gi", "Ti", "Pi", "Ei"];
    let (mut value, mut suffix) = (mebibytes, 0);
    while value != 0 && value % 1024 == 0 && suffix + 1 < SUFFIXES.len() {
        value /= 1024;
        suffix += 1;
    }
    format!("{value}{}", SUFFIXES[suffix])
}

fn named_port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        ..ContainerPort::default()
    }
}

pub(crate) fn backend_statefulset(parent: &Memcached) -> StatefulSet {
    let selector = labels(parent, "backend");
    let memory = Quantity(canonical_mebibytes(
        i64::from(parent.spec.memory_mb) + i64::from(MEMORY_OVERHEAD_MB),
    ));
    let resources = BTreeMap::from([("memory".to_owned(), memory)]);
    StatefulSet {
        metadata: meta(parent, parent_name(parent).to_owned(), "backend"),
        spec: Some(StatefulSetSpec {
            replicas: Some(parent.spec.replicas),
            service_name: Some(backend_service_name(parent)),
            // Cache Pods do not depend on each other: start and stop them all at once.
            pod_management_policy: Some("Parallel".to_owned()),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(selector),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "memcached".to_owned(),
                        image: Some(MEMCACHED_IMAGE.to_owned()),
                        args: Some(vec![
                            "-m".to_owned(),
                            parent.spec.memory_mb.to_string(),
                            "-p".to_owned(),
                            MEMCACHED_PORT.to_string(),
                        ]),
                        ports: Some(vec![named_port("memcache", MEMCACHED_PORT)]),
                        // Ready means "accepts connections": only then does
                        // the proxy configuration list the Pod.
                        readiness_probe: Some(Probe {
                            tcp_socket: Some(TCPSocketAction {
                                port: IntOrString::String("memcache".to_owned()),
                                ..TCPSocketAction::default()
                            }),
                            ..Probe::default()
                        }),
                        resources: Some(ResourceRequirements {
                            requests: Some(resources.clone()),
                            limits: Some(resources),
                            ..ResourceRequirements::default()
                        }),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

pub(crate) fn backend_service(parent: &Memcached) -> Service {
    Service {
        metadata: meta(parent, backend_service_name(parent), "backend"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            // Per-Pod DNS names exist before the Pods are ready; readiness
            // is the proxy configuration's business, not DNS's.
            publish_not_ready_addresses: Some(true),
            selector: Some(labels(parent, "backend")),
            ports: Some(vec![ServicePort {
                name: Some("memcache".to_owned()),
                port: i32::from(MEMCACHED_PORT),
                target_port: Some(IntOrString::String("memcache".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub(crate) fn proxy_config_map(parent: &Memcached, config: String) -> ConfigMap {
    ConfigMap {
        metadata: meta(parent, proxy_name(parent), "proxy"),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), config)])),
        ..ConfigMap::default()
    }
}

pub(crate) fn proxy_deployment(parent: &Memcached, config_hash: &str) -> Deployment {
    let selector = labels(parent, "proxy");
    Deployment {
        metadata: meta(parent, proxy_name(parent), "proxy"),
        spec: Some(DeploymentSpec {
            replicas: Some(parent.spec.proxy.replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(selector),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        config_hash.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "mcrouter".to_owned(),
                        image: Some(parent.spec.proxy.image.clone()),
                        command: Some(vec!["mcrouter".to_owned()]),
                        args: Some(vec![
                            format!("--port={PROXY_PORT}"),
                            format!("--config-file={CONFIG_DIR}/{CONFIG_KEY}"),
                            // Nothing persists the failed-delete log in a Pod:
                            // return delete errors to the client instead.
                            "--asynclog-disable".to_owned(),
                            format!("--stats-root={STATS_DIR}/stats"),
                        ]),
                        ports: Some(vec![named_port("mcrouter", PROXY_PORT)]),
                        readiness_probe: Some(Probe {
                            tcp_socket: Some(TCPSocketAction {
                                port: IntOrString::String("mcrouter".to_owned()),
                                ..TCPSocketAction::default()
                            }),
                            ..Probe::default()
                        }),
                        volume_mounts: Some(vec![
                            VolumeMount {
                                name: "config".to_owned(),
                                mount_path: CONFIG_DIR.to_owned(),
                                read_only: Some(true),
                                ..VolumeMount::default()
                            },
                            VolumeMount {
                                name: "stats".to_owned(),
                                mount_path: STATS_DIR.to_owned(),
                                ..VolumeMount::default()
                            },
                        ]),
                        ..Container::default()
                    }],
                    volumes: Some(vec![
                        Volume {
                            name: "config".to_owned(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: proxy_name(parent),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "stats".to_owned(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

pub(crate) fn client_service(parent: &Memcached) -> Service {
    Service {
        metadata: meta(parent, parent_name(parent).to_owned(), "proxy"),
        spec: Some(ServiceSpec {
            selector: Some(labels(parent, "proxy")),
            ports: Some(vec![ServicePort {
                name: Some("memcache".to_owned()),
                port: i32::from(MEMCACHED_PORT),
                target_port: Some(IntOrString::String("mcrouter".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_mebibytes;

    #[test]
    fn mebibytes_take_the_largest_whole_suffix() {
        assert_eq!(canonical_mebibytes(80), "80Mi");
        assert_eq!(canonical_mebibytes(1024), "1Gi");
        assert_eq!(canonical_mebibytes(1040), "1040Mi");
        assert_eq!(canonical_mebibytes(3 * 1024 * 1024), "3Ti");
    }
}
