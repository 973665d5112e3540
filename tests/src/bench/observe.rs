//! Watching the bench namespace: when each WebServer was created and turned
//! ready, when its children appeared, and when they carried a label.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::objects::webserver_resource;

/// The child kinds of a WebServer.
pub const CHILD_KINDS: [&str; 3] = ["ConfigMap", "Deployment", "Service"];

/// What the watches saw, as offsets from the bench's clock.
#[derive(Debug, Default)]
pub struct Seen {
    /// When each WebServer's POST returned.
    pub created: HashMap<String, Duration>,
    /// When each WebServer was first seen ready for its generation.
    pub ready: HashMap<String, Duration>,
    /// Child names per kind, and when each appeared.
    pub children: HashMap<&'static str, HashMap<String, Duration>>,
    /// Children per kind carrying the watched label, and when.
    pub labelled: HashMap<&'static str, HashMap<String, Duration>>,
}

/// Whether a WebServer is ready: its status describes the current
/// generation, `readyReplicas` equals `spec.replicas`, `Available=True`.
pub fn is_ready(ws: &DynamicObject) -> bool {
    let status = &ws.data["status"];
    let want = ws.data["spec"]["replicas"].as_i64().unwrap_or(1);
    status["observedGeneration"].as_i64() == ws.metadata.generation
        && status["readyReplicas"].as_i64() == Some(want)
        && status["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Available" && c["status"] == "True")
        })
}

/// The watches of one namespace, recording into a shared [`Seen`].
pub struct Observer {
    /// What was seen so far.
    pub seen: Arc<Mutex<Seen>>,
    start: Instant,
    tasks: Vec<JoinHandle<()>>,
}

impl Observer {
    /// Starts watching WebServers and their children in `namespace`;
    /// `label` (`key=value`) on children is recorded too. Times are offsets
    /// from `start`.
    pub fn start(client: &Client, namespace: &str, start: Instant, label: Option<&str>) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut tasks = Vec::new();
        let webservers: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &webserver_resource());
        {
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                let mut stream = watcher::watcher(webservers, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(event) = stream.next().await {
                    let now = start.elapsed();
                    let objects = match event {
                        Ok(Event::Apply(o) | Event::InitApply(o)) => vec![o],
                        _ => continue,
                    };
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    for ws in objects {
                        if is_ready(&ws) {
                            s.ready.entry(ws.name_any()).or_insert(now);
                        }
                    }
                }
            }));
        }
        let label = label.map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            (k.to_owned(), v.to_owned())
        });
        macro_rules! watch_kind {
            ($kind:ty, $name:expr) => {{
                let api: Api<PartialObjectMeta<$kind>> = Api::namespaced(client.clone(), namespace);
                let seen = seen.clone();
                let label = label.clone();
                tasks.push(tokio::spawn(async move {
                    let mut stream = watcher::watcher(api, watcher::Config::default())
                        .default_backoff()
                        .boxed();
                    while let Some(event) = stream.next().await {
                        let now = start.elapsed();
                        let o = match event {
                            Ok(Event::Apply(o) | Event::InitApply(o)) => o,
                            _ => continue,
                        };
                        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                        let name = o.name_any();
                        s.children
                            .entry($name)
                            .or_default()
                            .entry(name.clone())
                            .or_insert(now);
                        if let Some((k, v)) = &label
                            && o.labels().get(k) == Some(v)
                        {
                            s.labelled
                                .entry($name)
                                .or_default()
                                .entry(name)
                                .or_insert(now);
                        }
                    }
                }));
            }};
        }
        watch_kind!(ConfigMap, "ConfigMap");
        watch_kind!(Deployment, "Deployment");
        watch_kind!(Service, "Service");
        Self { seen, start, tasks }
    }

    /// Records that WebServer `name` was created now.
    pub fn created(&self, name: &str) {
        let now = self.start.elapsed();
        self.lock().created.insert(name.to_owned(), now);
    }

    /// The observer's clock now.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The shared record, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Seen {
    /// The names every child of the WebServers `parents` would have.
    pub fn child_names(parents: &[String]) -> HashSet<String> {
        parents
            .iter()
            .flat_map(|p| [p.clone(), format!("{p}-content")])
            .collect()
    }

    /// When the last of the parents' children appeared (None: not all yet).
    pub fn last_child(&self, names: &HashSet<String>, expected: usize) -> Option<Duration> {
        Self::last(&self.children, names, expected)
    }

    /// When the last of the parents' children got the label.
    pub fn last_labelled(&self, names: &HashSet<String>, expected: usize) -> Option<Duration> {
        Self::last(&self.labelled, names, expected)
    }

    fn last(
        map: &HashMap<&'static str, HashMap<String, Duration>>,
        names: &HashSet<String>,
        expected: usize,
    ) -> Option<Duration> {
        let times: Vec<Duration> = CHILD_KINDS
            .iter()
            .filter_map(|k| map.get(k))
            .flat_map(|m| {
                m.iter()
                    .filter(|(n, _)| names.contains(*n))
                    .map(|(_, t)| *t)
            })
            .collect();
        (times.len() >= expected)
            .then(|| times.into_iter().max())
            .flatten()
    }
}

/// The value at fraction `q` of sorted `values` (nearest rank).
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// The median of `values`.
pub fn median(values: &[f64]) -> Option<f64> {
    quantile(values, 0.5)
}

/// JSON null for a missing number.
pub fn num(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| {
        serde_json::json!((x * 1000.0).round() / 1000.0)
    })
}
