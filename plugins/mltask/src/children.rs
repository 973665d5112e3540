//! The children of an `MLTask`: the worker StatefulSet and the headless
//! Service that gives each worker a stable DNS name.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, ResourceRequirements, Service,
    ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kuwa_sdk::child_meta;

use crate::gpus::{GPU_NODE_LABEL, GPU_RESOURCE};
use crate::location::Location;
use crate::{MASTER_PORT, MLTask, Plan, parent_name};

/// Where a training-data claim is mounted (read-only).
pub const DATA_DIR: &str = "/data";
/// Where a model-output claim is mounted.
pub const OUTPUT_DIR: &str = "/output";
/// Where the scratch space is mounted.
pub const SCRATCH_DIR: &str = "/scratch";

/// The label the StatefulSet controller sets to each Pod's ordinal
/// (Kubernetes 1.28+); `RANK` is read from it with the downward API.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

pub(crate) fn workers_service_name(parent: &MLTask) -> String {
    format!("{}-workers", parent_name(parent))
}

fn labels(parent: &MLTask) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "mltask".to_owned()),
        (
            "app.kubernetes.io/instance".to_owned(),
            parent_name(parent).to_owned(),
        ),
    ])
}

fn meta(parent: &MLTask, name: String) -> ObjectMeta {
    let mut meta = child_meta(parent, name);
    meta.labels.get_or_insert_default().extend(labels(parent));
    meta
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn claim_volume(name: &str, claim: &str, read_only: bool) -> Volume {
    Volume {
        name: name.to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only: read_only.then_some(true),
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// The worker container's environment with the volumes and mounts that
/// go with it.
#[derive(Default)]
struct Wiring {
    env: Vec<EnvVar>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
}

impl Wiring {
    /// Adds `location` as env `var`: a URI as is; a claim as volume
    /// `volume` mounted at `dir`, with `var` naming the directory.
    fn location(
        &mut self,
        location: &Location,
        var: &str,
        volume: &str,
        dir: &str,
        read_only: bool,
    ) {
        match location {
            Location::Uri(uri) => self.env.push(env(var, uri.clone())),
            Location::Claim(claim) => {
                self.env.push(env(var, dir));
                self.volumes.push(claim_volume(volume, claim, read_only));
                self.mounts.push(mount(volume, dir, read_only));
            }
        }
    }
}

pub(crate) fn workers_statefulset(parent: &MLTask, plan: &Plan) -> StatefulSet {
    let name = parent_name(parent);
    let namespace = parent.metadata.namespace.as_deref().unwrap_or("default");
    let spec = &parent.spec;
    let selector = labels(parent);

    let rank = EnvVar {
        name: "RANK".to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: format!("metadata.labels['{POD_INDEX_LABEL}']"),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let base_env = vec![
        rank,
        env("WORLD_SIZE", spec.parallelism.to_string()),
        // Rank 0's stable name through the headless Service.
        env(
            "MASTER_ADDR",
            format!("{name}-0.{}.{namespace}.svc", workers_service_name(parent)),
        ),
        env("MASTER_PORT", MASTER_PORT.to_string()),
    ];
    let mut wiring = Wiring {
        env: base_env,
        ..Wiring::default()
    };
    wiring.location(
        &plan.training_data,
        "TRAINING_DATA",
        "training-data",
        DATA_DIR,
        true,
    );
    wiring.location(
        &plan.model_output,
        "MODEL_OUTPUT",
        "model-output",
        OUTPUT_DIR,
        false,
    );
    if let Some(size) = &plan.scratch {
        wiring.env.push(env("SCRATCH_DIR", SCRATCH_DIR));
        wiring.volumes.push(Volume {
            name: "scratch".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(size.clone())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
        wiring.mounts.push(mount("scratch", SCRATCH_DIR, false));
    }
    let Wiring {
        env: env_vars,
        volumes,
        mounts,
    } = wiring;

    let gpus = BTreeMap::from([(
        GPU_RESOURCE.to_owned(),
        Quantity(spec.gpus_per_worker.to_string()),
    )]);
    StatefulSet {
        metadata: meta(parent, name.to_owned()),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.parallelism),
            service_name: Some(workers_service_name(parent)),
            // Distributed training needs every rank up at once; ordered
            // start would deadlock rank 0 waiting for the others.
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
                    node_selector: Some(BTreeMap::from([(
                        GPU_NODE_LABEL.to_owned(),
                        "true".to_owned(),
                    )])),
                    // GPU nodes are commonly tainted so only GPU Pods land there.
                    tolerations: Some(vec![Toleration {
                        key: Some(GPU_RESOURCE.to_owned()),
                        operator: Some("Exists".to_owned()),
                        effect: Some("NoSchedule".to_owned()),
                        ..Toleration::default()
                    }]),
                    containers: vec![Container {
                        name: "worker".to_owned(),
                        image: Some(spec.image.clone()),
                        command: spec.command.clone(),
                        args: spec.args.clone(),
                        env: Some(env_vars),
                        ports: Some(vec![ContainerPort {
                            name: Some("dist".to_owned()),
                            container_port: i32::from(MASTER_PORT),
                            ..ContainerPort::default()
                        }]),
                        resources: Some(ResourceRequirements {
                            requests: Some(gpus.clone()),
                            limits: Some(gpus),
                            ..ResourceRequirements::default()
                        }),
                        volume_mounts: (!mounts.is_empty()).then_some(mounts),
                        ..Container::default()
                    }],
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

pub(crate) fn workers_service(parent: &MLTask) -> Service {
    Service {
        metadata: meta(parent, workers_service_name(parent)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            // Ranks must resolve rank 0 while they rendezvous, before any is ready.
            publish_not_ready_addresses: Some(true),
            selector: Some(labels(parent)),
            ports: Some(vec![ServicePort {
                name: Some("dist".to_owned()),
                port: i32::from(MASTER_PORT),
                target_port: Some(IntOrString::String("dist".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
