//! The apply stage: compare what a plugin wants with what the cache holds and
//! write only the difference (DESIGN §2). Steady state costs zero writes.
//!
//! A child is written when it is missing, when the plugin's desired object
//! changed since the host last applied it (tracked by a hash annotation, which
//! also catches fields the plugin stopped setting), or when someone else
//! changed a field the plugin sets (drift: the desired object is no longer a
//! subset of the cached one). Every write is a server-side apply with the
//! plugin's field manager, forced, so the plugin owns exactly what it returns.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions,
    PropagationPolicy,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::plugin::{Gvk, PluginInfo};

/// Annotation on each child: hash of the object the plugin last asked for.
pub const DESIRED_HASH_ANNOTATION: &str = "kuwa.dev/desired-hash";

/// Annotation on each parent: `<plugin>@<version>` that last reconciled it.
pub const PLUGIN_VERSION_ANNOTATION: &str = "kuwa.dev/plugin-version";

/// Label on each child: the plugin that manages it.
pub const PLUGIN_LABEL: &str = "kuwa.dev/plugin";

/// True when every field set in `desired` has the same value in `actual`.
/// Objects may have extra keys in `actual` (defaults, status, fields of other
/// managers); lists must have the same length with each element a subset.
pub fn is_subset(desired: &Value, actual: &Value) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => d.iter().all(|(k, dv)| match a.get(k) {
            Some(av) => is_subset(dv, av),
            None => dv.is_null(),
        }),
        (Value::Array(d), Value::Array(a)) => {
            d.len() == a.len() && d.iter().zip(a).all(|(dv, av)| is_subset(dv, av))
        }
        (Value::Number(d), Value::Number(a)) => d == a || d.as_f64() == a.as_f64(),
        _ => desired == actual,
    }
}

fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<_> = map.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&map[k]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// A stable hash of a JSON value, independent of key order.
pub fn hash_value(value: &Value) -> String {
    let text = canonical(value).to_string();
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}

/// The owner reference the host sets on every child of `parent`.
pub fn owner_reference(parent_gvk: &Gvk, parent: &DynamicObject) -> Value {
    json!({
        "apiVersion": parent_gvk.api_version(),
        "kind": parent_gvk.kind,
        "name": parent.name_any(),
        "uid": parent.uid().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Turns a validated child into the object the host applies: the parent's
/// namespace, the owner reference, the plugin label and the desired hash.
pub fn prepare_child(
    mut object: Value,
    namespace: Option<&str>,
    owner: &Value,
    plugin: &PluginInfo,
) -> Value {
    let meta = object
        .as_object_mut()
        .expect("validated children are objects")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    meta["ownerReferences"] = json!([owner]);
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"][PLUGIN_LABEL] = json!(&*plugin.name);
    if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
        annotations.remove(DESIRED_HASH_ANNOTATION);
    }
    let hash = hash_value(&object);
    let meta = &mut object["metadata"];
    if !meta["annotations"].is_object() {
        meta["annotations"] = json!({});
    }
    meta["annotations"][DESIRED_HASH_ANNOTATION] = json!(hash);
    object
}

/// The cached object as JSON, with its `apiVersion` and `kind`.
pub fn object_json(object: &DynamicObject) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// Whether `desired` (from [`prepare_child`]) must be applied over `cached`.
pub fn needs_apply(desired: &Value, cached: Option<&DynamicObject>) -> bool {
    let Some(cached) = cached else { return true };
    let want = desired["metadata"]["annotations"][DESIRED_HASH_ANNOTATION].as_str();
    let have = cached
        .annotations()
        .get(DESIRED_HASH_ANNOTATION)
        .map(String::as_str);
    if want != have {
        return true;
    }
    let mut cached = object_json(cached);
    // A relisted object may come without its type; compare what matters.
    let mut desired = desired.clone();
    for key in ["apiVersion", "kind"] {
        desired.as_object_mut().map(|o| o.remove(key));
        cached.as_object_mut().map(|o| o.remove(key));
    }
    !is_subset(&desired, &cached)
}

/// Sets condition `type_` in a status's `conditions`, keeping its
/// `lastTransitionTime` when its status does not flip.
pub fn upsert_condition(
    status: &mut Value,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &str,
) {
    if !status.is_object() {
        *status = json!({});
    }
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let text = if value { "True" } else { "False" };
    let conditions = status["conditions"]
        .as_array_mut()
        .expect("just made an array");
    let previous = conditions.iter().position(|c| c["type"] == type_);
    let since = previous
        .and_then(|i| {
            (conditions[i]["status"] == text).then(|| conditions[i]["lastTransitionTime"].clone())
        })
        .filter(|t| t.is_string())
        .unwrap_or_else(|| json!(now));
    let mut condition = json!({
        "type": type_,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        condition["observedGeneration"] = json!(g);
    }
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
    if let Some(g) = generation {
        status["observedGeneration"] = json!(g);
    }
}

/// Where a write goes.
pub struct Target<'a> {
    /// The kind's API resource.
    pub resource: &'a ApiResource,
    /// Its kind, for metrics.
    pub gvk: &'a Gvk,
    /// Namespace (None for cluster-scoped kinds).
    pub namespace: Option<&'a str>,
    /// Object name.
    pub name: &'a str,
}

impl Target<'_> {
    /// A server-side-apply body for the target: its identity plus the given
    /// `metadata` fields (name and namespace are filled in).
    fn apply_body(&self, mut metadata: Value) -> Value {
        metadata["name"] = json!(self.name);
        if let Some(ns) = self.namespace {
            metadata["namespace"] = json!(ns);
        }
        json!({"apiVersion": self.gvk.api_version(), "kind": self.gvk.kind, "metadata": metadata})
    }

    fn api(&self, client: &Client) -> Api<DynamicObject> {
        match self.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, self.resource),
            None => Api::all_with(client.clone(), self.resource),
        }
    }
}

/// Makes every API write of the host and counts it.
pub struct Writer {
    client: Client,
    metrics: Arc<Metrics>,
    recorder: Recorder,
}

impl Writer {
    /// A writer reporting events as `kuwa`.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: "kuwa".into(),
            instance: std::env::var("HOSTNAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
        }
    }

    /// Server-side applies `body` as the plugin, forcing ownership.
    pub async fn apply(
        &self,
        plugin: &PluginInfo,
        target: &Target<'_>,
        body: &Value,
    ) -> Result<(), kube::Error> {
        self.metrics
            .api_write(&plugin.name, "apply", &target.gvk.to_string());
        let params = PatchParams::apply(plugin.field_manager()).force();
        target
            .api(&self.client)
            .patch(target.name, &params, &Patch::Apply(body))
            .await?;
        Ok(())
    }

    /// Deletes a child the plugin no longer wants (only the exact object
    /// observed: a uid precondition protects a recreated namesake).
    pub async fn delete(
        &self,
        plugin: &PluginInfo,
        target: &Target<'_>,
        uid: &str,
    ) -> Result<(), kube::Error> {
        self.metrics
            .api_write(&plugin.name, "delete", &target.gvk.to_string());
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        match target.api(&self.client).delete(target.name, &params).await {
            Ok(_) => Ok(()),
            // Already gone, or replaced by a namesake we must not touch.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Server-side applies the parent's `status` subresource.
    pub async fn apply_status(
        &self,
        plugin: &PluginInfo,
        target: &Target<'_>,
        status: &Value,
    ) -> Result<(), kube::Error> {
        self.metrics
            .api_write(&plugin.name, "status", &target.gvk.to_string());
        let mut body = target.apply_body(json!({}));
        body["status"] = status.clone();
        let params = PatchParams::apply(plugin.field_manager()).force();
        target
            .api(&self.client)
            .patch_status(target.name, &params, &Patch::Apply(&body))
            .await?;
        Ok(())
    }

    /// Records on a parent which plugin version reconciled it, as the
    /// annotation [`PLUGIN_VERSION_ANNOTATION`] (its own field manager, so
    /// it never disturbs the plugin's fields).
    pub async fn set_version_annotation(
        &self,
        plugin: &PluginInfo,
        target: &Target<'_>,
        value: &str,
    ) -> Result<(), kube::Error> {
        self.metrics
            .api_write(&plugin.name, "annotate", &target.gvk.to_string());
        let body = target.apply_body(json!({"annotations": {PLUGIN_VERSION_ANNOTATION: value}}));
        let params = PatchParams::apply(&format!("{}-version", plugin.field_manager())).force();
        target
            .api(&self.client)
            .patch(target.name, &params, &Patch::Apply(&body))
            .await?;
        Ok(())
    }

    /// Adds or removes the host's finalizer on a parent. A field manager of
    /// its own means applying an empty list removes only our entry.
    pub async fn set_finalizer(
        &self,
        plugin: &PluginInfo,
        target: &Target<'_>,
        present: bool,
    ) -> Result<(), kube::Error> {
        self.metrics
            .api_write(&plugin.name, "finalizer", &target.gvk.to_string());
        let finalizers: Vec<String> = if present {
            vec![plugin.finalizer_name()]
        } else {
            Vec::new()
        };
        let body = target.apply_body(json!({"finalizers": finalizers}));
        let params = PatchParams::apply(&format!("{}-finalizer", plugin.field_manager())).force();
        match target
            .api(&self.client)
            .patch(target.name, &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 && !present => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Records an event on `parent`. Failures are logged, never fatal.
    pub async fn event(
        &self,
        plugin: &str,
        parent: &DynamicObject,
        resource: &ApiResource,
        warning: bool,
        reason: &str,
        message: &str,
    ) {
        self.metrics
            .api_write(plugin, "event", "events.k8s.io/v1/Event");
        let reference: ObjectReference = parent.object_ref(resource);
        let mut note = message.to_owned();
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(plugin, reason, error = %e, "could not record event");
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    #[test]
    fn subset_ignores_server_defaults_but_not_changes() {
        let desired = json!({"spec": {"replicas": 3, "ports": [{"port": 80}]}});
        let actual = json!({"spec": {"replicas": 3, "ports": [{"port": 80, "protocol": "TCP"}], "x": 1}, "status": {}});
        assert!(is_subset(&desired, &actual));
        assert!(!is_subset(&json!({"spec": {"replicas": 4}}), &actual));
        // A list that gained or lost an element is a change.
        assert!(!is_subset(
            &json!({"spec": {"ports": [{"port": 80}, {"port": 81}]}}),
            &actual
        ));
        assert!(!is_subset(&json!({"spec": {"missing": "x"}}), &actual));
        assert!(is_subset(&json!({"spec": {"missing": null}}), &actual));
    }

    #[test]
    fn hash_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).unwrap();
        assert_eq!(hash_value(&a), hash_value(&b));
        assert_ne!(hash_value(&a), hash_value(&json!({"a": 2})));
    }

    fn info() -> PluginInfo {
        let mut i = PluginInfo::placeholder();
        i.name = Arc::from("webserver");
        i
    }

    fn cached_from(desired: &Value) -> DynamicObject {
        let mut v = desired.clone();
        v["metadata"]["uid"] = json!("u1");
        v["metadata"]["resourceVersion"] = json!("7");
        v["data"]["defaulted"] = json!("by the server");
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn unchanged_children_need_no_apply() {
        let owner = json!({"apiVersion": "kuwa.dev/v1alpha1", "kind": "WebServer", "name": "w", "uid": "p"});
        let child = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}});
        let desired = prepare_child(child.clone(), Some("ns"), &owner, &info());
        assert_eq!(desired["metadata"]["namespace"], "ns");
        assert_eq!(desired["metadata"]["ownerReferences"][0]["uid"], "p");
        assert_eq!(desired["metadata"]["labels"][PLUGIN_LABEL], "webserver");
        assert!(needs_apply(&desired, None));
        let cached = cached_from(&desired);
        assert!(
            !needs_apply(&desired, Some(&cached)),
            "an applied child with server defaults is unchanged"
        );

        // The plugin asks for something else: new hash.
        let mut changed = child.clone();
        changed["data"]["k"] = json!("v2");
        assert!(needs_apply(
            &prepare_child(changed, Some("ns"), &owner, &info()),
            Some(&cached)
        ));

        // The plugin stops setting a field: new hash, so the apply removes it.
        let mut fewer = child.clone();
        fewer["data"] = json!({});
        assert!(needs_apply(
            &prepare_child(fewer, Some("ns"), &owner, &info()),
            Some(&cached)
        ));

        // Someone edited a field the plugin owns: drift.
        let mut drifted = cached.clone();
        drifted.data["data"]["k"] = json!("edited");
        assert!(needs_apply(&desired, Some(&drifted)));
    }

    #[test]
    fn relisted_objects_without_type_meta_compare_equal() {
        let owner = json!({"apiVersion": "kuwa.dev/v1alpha1", "kind": "WebServer", "name": "w", "uid": "p"});
        let child = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}});
        let desired = prepare_child(child, Some("ns"), &owner, &info());
        let mut cached = cached_from(&desired);
        cached.types = None;
        assert!(!needs_apply(&desired, Some(&cached)));
    }

    #[test]
    fn conditions_keep_their_transition_time() {
        let mut status = json!({"readyReplicas": 1});
        upsert_condition(
            &mut status,
            "Degraded",
            true,
            "InvalidSpec",
            "bad",
            Some(2),
            "t1",
        );
        assert_eq!(status["conditions"][0]["lastTransitionTime"], "t1");
        assert_eq!(status["observedGeneration"], 2);
        upsert_condition(
            &mut status,
            "Degraded",
            true,
            "InvalidSpec",
            "still bad",
            Some(3),
            "t2",
        );
        assert_eq!(status["conditions"][0]["lastTransitionTime"], "t1");
        assert_eq!(status["conditions"][0]["message"], "still bad");
        upsert_condition(
            &mut status,
            "Degraded",
            false,
            "AsExpected",
            "",
            Some(3),
            "t3",
        );
        assert_eq!(status["conditions"][0]["lastTransitionTime"], "t3");
        assert_eq!(status["conditions"].as_array().unwrap().len(), 1);
        assert_eq!(status["readyReplicas"], 1);
    }

    #[test]
    fn object_json_includes_metadata() {
        let o = DynamicObject {
            types: None,
            metadata: ObjectMeta {
                name: Some("x".into()),
                ..ObjectMeta::default()
            },
            data: json!({"spec": {}}),
        };
        let v = object_json(&o);
        assert_eq!(v["metadata"]["name"], "x");
        assert!(v["spec"].is_object());
    }
}
