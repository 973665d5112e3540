//! Pure decisions, no I/O: how a desired child is prepared for applying,
//! whether it needs applying over the cached object, and whether a status
//! differs from the current one. The same semantics as the kuwa host's plan
//! step, written out again here (the peer does not link the host).

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// Annotation on each child: hash of the object last asked for.
pub const DESIRED_HASH_ANNOTATION: &str = "kuwa.dev/desired-hash";

/// Parses a Kubernetes quantity (`1`, `1000m`, `1.5Gi`, `2e3`) to its value.
fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(s, f)| text.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((text, 1.0));
    let body = number.strip_prefix(['+', '-']).unwrap_or(number);
    let mantissa = body.split(['e', 'E']).next().unwrap_or_default();
    let well_formed = !mantissa.is_empty()
        && mantissa.chars().all(|c| c.is_ascii_digit() || c == '.')
        && mantissa.chars().filter(|c| *c == '.').count() <= 1
        && mantissa.chars().any(|c| c.is_ascii_digit());
    if !well_formed {
        return None;
    }
    number.parse::<f64>().ok().map(|v| v * scale)
}

/// Whether two strings are the same quantity written two ways.
fn same_quantity(a: &str, b: &str) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
        _ => false,
    }
}

/// True when every field set in `desired` has the same value in `actual`:
/// objects may have extra keys in `actual` (defaults, status, other
/// managers' fields); lists must have the same length, element by element a
/// subset; numbers compare by value, and so do strings that are quantities.
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
        (Value::String(d), Value::String(a)) => d == a || same_quantity(d, a),
        _ => desired == actual,
    }
}

/// Same JSON, up to the value-equality of numbers and quantities.
pub fn same(a: &Value, b: &Value) -> bool {
    is_subset(a, b) && is_subset(b, a)
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

/// A stable hash of a JSON value (its canonical text), independent of key
/// order.
pub fn hash_value(value: &Value) -> String {
    let text = canonical(value).to_string();
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}

/// Turns a desired child into the object to apply: the namespace, the
/// controller owner reference and the desired-hash annotation (the hash of
/// the object with the first two set).
pub fn prepare_child(mut object: Value, namespace: &str, owner: &Value) -> Option<Value> {
    let meta = object
        .as_object_mut()?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if !meta.is_object() {
        return None;
    }
    meta["namespace"] = json!(namespace);
    meta["ownerReferences"] = json!([owner]);
    let hash = hash_value(&object);
    let meta = &mut object["metadata"];
    if !meta["annotations"].is_object() {
        meta["annotations"] = json!({});
    }
    meta["annotations"][DESIRED_HASH_ANNOTATION] = json!(hash);
    Some(object)
}

/// Whether `desired` (from [`prepare_child`]) must be applied over `cached`
/// (the cached object as JSON, if any): it is missing, its desired hash
/// changed, or a field it sets drifted.
pub fn needs_apply(desired: &Value, cached: Option<&Value>) -> bool {
    let Some(cached) = cached else {
        return true;
    };
    let annotation = |v: &Value| {
        v["metadata"]["annotations"][DESIRED_HASH_ANNOTATION]
            .as_str()
            .map(str::to_owned)
    };
    annotation(desired) != annotation(cached) || !is_subset(desired, cached)
}

/// Sets condition `type_` in `status.conditions`, keeping its
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
    let Some(conditions) = status["conditions"].as_array_mut() else {
        return;
    };
    let previous = conditions.iter().position(|c| c["type"] == type_);
    let since = previous
        .and_then(|i| {
            (conditions[i]["status"] == text).then(|| conditions[i]["lastTransitionTime"].clone())
        })
        .filter(Value::is_string)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_ignores_extra_fields_and_compares_numbers_by_value() {
        let desired = json!({"spec": {"replicas": 1, "ports": [{"port": 80}]}});
        let actual = json!({"spec": {"replicas": 1.0, "strategy": {},
            "ports": [{"port": 80, "protocol": "TCP"}]}, "status": {}});
        assert!(is_subset(&desired, &actual));
        assert!(!is_subset(&json!({"spec": {"replicas": 2}}), &actual));
        assert!(!is_subset(
            &json!({"spec": {"ports": []}}),
            &json!({"spec": {"ports": [1]}})
        ));
        assert!(is_subset(&json!({"cpu": "1"}), &json!({"cpu": "1000m"})));
    }

    #[test]
    fn hash_is_independent_of_key_order() {
        let a: Value = serde_json::from_str(r#"{"a": 1, "b": {"c": 2, "d": 3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b": {"d": 3, "c": 2}, "a": 1}"#).unwrap();
        assert_eq!(hash_value(&a), hash_value(&b));
        assert_ne!(hash_value(&a), hash_value(&json!({"a": 2})));
    }

    #[test]
    fn a_prepared_child_over_itself_needs_no_apply() {
        let owner = json!({"uid": "u", "controller": true});
        let desired = prepare_child(json!({"metadata": {"name": "x"}}), "ns", &owner).unwrap();
        assert_eq!(desired["metadata"]["namespace"], "ns");
        assert!(desired["metadata"]["annotations"][DESIRED_HASH_ANNOTATION].is_string());
        assert!(needs_apply(&desired, None));
        let mut cached = desired.clone();
        cached["metadata"]["resourceVersion"] = json!("7");
        assert!(!needs_apply(&desired, Some(&cached)));
        cached["metadata"]["annotations"][DESIRED_HASH_ANNOTATION] = json!("old");
        assert!(needs_apply(&desired, Some(&cached)));
    }

    #[test]
    fn a_condition_keeps_its_time_unless_it_flips() {
        let mut status = json!({"conditions": [{"type": "Degraded", "status": "True",
            "lastTransitionTime": "t0"}]});
        upsert_condition(&mut status, "Degraded", true, "R", "m", Some(2), "t1");
        assert_eq!(status["conditions"][0]["lastTransitionTime"], "t0");
        upsert_condition(&mut status, "Degraded", false, "R", "m", Some(2), "t2");
        assert_eq!(status["conditions"][0]["lastTransitionTime"], "t2");
        assert_eq!(status["conditions"].as_array().unwrap().len(), 1);
    }
}
