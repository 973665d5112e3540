//! The `kuwa` command line on real plugin components, with no cluster:
//! `plugin test`, `plugin check`, `crds` (and the drift check of the CRDs
//! committed in `deploy/crds/`).
//!
//! Needs the components built by `cargo xtask plugins` (done by
//! `cargo xtask test`); a missing component fails with that hint.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn plugins_dir() -> PathBuf {
    std::env::var_os("KUWA_PLUGINS_DIR")
        .map_or_else(|| workspace().join("target/plugins"), PathBuf::from)
}

fn component(name: &str) -> PathBuf {
    let path = plugins_dir().join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask plugins` first",
        path.display()
    );
    path
}

fn kuwa(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kuwa"))
        .args(args)
        .env("KUWA_LOG", "warn")
        .output()
        .expect("running kuwa")
}

fn ok_yaml(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "kuwa failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_slice(&out.stdout).expect("kuwa prints YAML")
}

fn plugin_test(plugin: &str, parent: &str, related: &[PathBuf]) -> Output {
    plugin_test_with(plugin, parent, related, &[])
}

/// `plugin test` with `extra` arguments; paths in them are relative to the
/// workspace.
fn plugin_test_with(plugin: &str, parent: &str, related: &[PathBuf], extra: &[&str]) -> Output {
    let wasm = component(plugin);
    let parent = workspace().join(parent);
    let mut args = vec![
        "plugin".as_ref(),
        "test".as_ref(),
        wasm.as_os_str(),
        "--parent".as_ref(),
        parent.as_os_str(),
    ];
    for r in related {
        args.push("--related".as_ref());
        args.push(r.as_os_str());
    }
    let extra: Vec<std::ffi::OsString> = extra
        .iter()
        .map(|a| {
            if a.starts_with("--") {
                (*a).into()
            } else {
                let p = workspace().join(a);
                if p.exists() { p.into() } else { (*a).into() }
            }
        })
        .collect();
    args.extend(extra.iter().map(|a| a.as_os_str()));
    kuwa(&args)
}

fn condition<'a>(out: &'a Value, type_: &str) -> &'a Value {
    out["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {}", out["status"]))
}

const NOW: &str = "2026-03-04T05:06:07Z";

#[test]
fn plugin_test_answers_the_firewall_call_from_a_fixture() {
    let nodes = workspace().join("plugins/securitypolicy/fixtures/nodes.yaml");
    let parent = "plugins/securitypolicy/fixtures/firewall-policy.yaml";
    let out = ok_yaml(&plugin_test_with(
        "securitypolicy",
        parent,
        std::slice::from_ref(&nodes),
        &[
            "--manifest",
            "plugins/securitypolicy/fixtures/grant.yaml",
            "--outbound",
            "plugins/securitypolicy/fixtures/firewall.yaml",
            "--now",
            NOW,
        ],
    ));
    assert_eq!(kinds(&out), ["NetworkPolicy/securitypolicy-sample"]);
    let from: Vec<&str> = out["children"][0]["spec"]["ingress"][0]["from"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ipBlock"]["cidr"].as_str().unwrap())
        .collect();
    assert_eq!(from, ["10.20.0.0/16", "10.126.0.1/32", "10.126.0.2/32"]);
    assert_eq!(out["status"]["firewall"]["ruleId"], "fw-rule-0001");
    let synced = condition(&out, "FirewallSynced");
    assert_eq!(synced["status"], "True", "{synced}");
    assert_eq!(
        synced["lastTransitionTime"], NOW,
        "--now is the plugin's clock"
    );
    assert_eq!(out["outbound"][0]["request"]["method"], "PUT");
    assert_eq!(out["outbound"][0]["response"]["status"], 200);

    // The shipped grant lists no origin: the call is refused, nothing is
    // sent, and the status says so.
    let out = ok_yaml(&plugin_test_with(
        "securitypolicy",
        parent,
        &[nodes],
        &[
            "--outbound",
            "plugins/securitypolicy/fixtures/firewall.yaml",
        ],
    ));
    let synced = condition(&out, "FirewallSynced");
    assert_eq!(
        (&synced["status"], &synced["reason"]),
        (&Value::from("False"), &Value::from("NotAllowed")),
        "{synced}"
    );
    let error = out["outbound"][0]["error"].as_str().unwrap();
    assert!(error.contains("nothing was sent"), "{error}");
    assert!(out["outbound"][0].get("response").is_none());
    assert!(out["status"]["firewall"].get("ruleId").is_none());
}

#[test]
fn plugin_test_runs_ingress_on_its_sample() {
    let backends = workspace().join("plugins/ingress/fixtures/backends.yaml");
    let out = ok_yaml(&plugin_test(
        "ingress",
        "deploy/samples/networking.k8s.io_v1_ingress.yaml",
        &[backends],
    ));
    assert_eq!(
        kinds(&out),
        [
            "ConfigMap/ingress-sample-proxy",
            "Deployment/ingress-sample-proxy"
        ]
    );
    assert_eq!(
        out["children"][0]["metadata"]["ownerReferences"][0]["kind"],
        "Ingress"
    );
    let config = out["children"][0]["data"]["default.conf"].as_str().unwrap();
    assert!(
        config.contains("server 10.128.0.9:80;\n    server 10.128.0.12:80;\n}"),
        "{config}"
    );
    assert_eq!(
        out["status"]["loadBalancer"]["ingress"][0]["ip"],
        "192.0.2.10"
    );
    // Another class: nothing at all.
    let other = ok_yaml(&plugin_test_with(
        "ingress",
        "host/tests/fixtures/ingress-other-class.yaml",
        &[],
        &[],
    ));
    assert!(other["children"].as_array().unwrap().is_empty(), "{other}");
    assert!(other["status"].is_null(), "{other}");
    assert!(other["plan"].as_array().unwrap().is_empty(), "{other}");
}

fn kinds(out: &Value) -> Vec<String> {
    out["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}/{}",
                c["kind"].as_str().unwrap(),
                c["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn plugin_test_prints_the_three_webserver_children() {
    let out = ok_yaml(&plugin_test(
        "webserver",
        "deploy/samples/kuwa.dev_v1alpha1_webserver.yaml",
        &[],
    ));
    assert_eq!(
        kinds(&out),
        [
            "ConfigMap/webserver-sample-content",
            "Deployment/webserver-sample",
            "Service/webserver-sample"
        ]
    );
    let children = out["children"].as_array().unwrap();
    // What the host would apply: the parent's namespace and owner reference.
    for c in children {
        assert_eq!(c["metadata"]["namespace"], "default");
        assert_eq!(c["metadata"]["ownerReferences"][0]["kind"], "WebServer");
        assert_eq!(c["metadata"]["ownerReferences"][0]["controller"], true);
    }
    assert_eq!(children[0]["data"]["index.html"], "hello, ossummit!");
    assert_eq!(children[1]["spec"]["replicas"], 3);
    assert_eq!(out["status"]["readyReplicas"], 0);
}

#[test]
fn plugin_test_runs_memcached_on_its_sample() {
    let out = ok_yaml(&plugin_test(
        "memcached",
        "deploy/samples/kuwa.dev_v1alpha1_memcached.yaml",
        &[],
    ));
    let kinds = kinds(&out);
    for expected in ["StatefulSet/", "ConfigMap/", "Deployment/", "Service/"] {
        assert!(
            kinds.iter().any(|k| k.starts_with(expected)),
            "{expected} missing in {kinds:?}"
        );
    }
    // No backend Pods observed: the proxy config lists no servers yet.
    assert_eq!(out["status"]["readyBackends"], 0);
}

#[test]
fn plugin_test_runs_mltask_on_its_sample_with_gpu_nodes() {
    let nodes = workspace().join("host/tests/fixtures/gpu-nodes.yaml");
    let out = ok_yaml(&plugin_test(
        "mltask",
        "deploy/samples/kuwa.dev_v1alpha1_mltask.yaml",
        &[nodes],
    ));
    let kinds = kinds(&out);
    assert!(
        kinds.iter().any(|k| k.starts_with("StatefulSet/")),
        "{kinds:?}"
    );
    let schedulable = out["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Schedulable")
        .expect("a Schedulable condition");
    assert_eq!(schedulable["status"], "True", "{schedulable}");

    // With no GPU nodes at all, nothing is created and the status says why.
    let out = ok_yaml(&plugin_test(
        "mltask",
        "deploy/samples/kuwa.dev_v1alpha1_mltask.yaml",
        &[],
    ));
    assert!(out["children"].as_array().unwrap().is_empty());
}

#[test]
fn plugin_test_reports_an_invalid_spec() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("bad.yaml");
    std::fs::write(
        &parent,
        "apiVersion: kuwa.dev/v1alpha1\nkind: WebServer\nmetadata: {name: bad}\nspec: {content: x, replicas: -1}\n",
    )
    .unwrap();
    let wasm = component("webserver");
    let out = kuwa(&[
        "plugin".as_ref(),
        "test".as_ref(),
        wasm.as_os_str(),
        "--parent".as_ref(),
        parent.as_os_str(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid spec") && err.contains("replicas"),
        "{err}"
    );
}

#[test]
fn plugin_check_prints_the_description() {
    let wasm = component("webserver");
    let out = ok_yaml(&kuwa(&[
        "plugin".as_ref(),
        "check".as_ref(),
        wasm.as_os_str(),
    ]));
    assert_eq!(out["name"], "webserver");
    assert_eq!(out["parent"]["kind"], "WebServer");
    assert_eq!(out["crd"], "webservers.kuwa.dev");
    assert_eq!(out["children"].as_array().unwrap().len(), 3);
}

#[test]
fn plugin_check_rejects_what_is_not_a_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8]); 3] = [
        ("garbage.wasm", b"definitely not wasm"),
        // A valid core module, but not a component.
        ("core.wasm", b"\0asm\x01\0\0\0"),
        ("empty.wasm", b""),
    ];
    for (name, bytes) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = kuwa(&["plugin".as_ref(), "check".as_ref(), path.as_os_str()]);
        assert!(!out.status.success(), "{name} must be rejected");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a loadable component"), "{name}: {err}");
    }
}

/// The YAML documents a successful `kuwa` printed.
fn ok_documents(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "kuwa failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).expect("kuwa prints YAML")
}

/// Each generated CRD equals its committed copy in `deploy/crds/`.
fn assert_committed_crds(generated: Vec<Value>, regenerate: &str) {
    for crd in generated {
        let name = crd["metadata"]["name"].as_str().unwrap().to_owned();
        let path = workspace().join("deploy/crds").join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "{} is missing; regenerate with `{regenerate}`",
                path.display()
            )
        });
        let committed: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            committed,
            crd,
            "{} drifted; regenerate with `{regenerate}`",
            path.display()
        );
    }
}

#[test]
fn committed_crds_match_the_plugins() {
    let generated = ok_documents(&kuwa(&[
        "crds".as_ref(),
        "--plugins".as_ref(),
        plugins_dir().as_os_str(),
    ]));
    assert_eq!(
        generated.len(),
        4,
        "one CRD per shipped plugin but ingress (its parent is the built-in Ingress)"
    );
    assert_committed_crds(
        generated,
        "kuwa crds --plugins target/plugins --out deploy/crds",
    );
}

/// The RBAC committed in `deploy/rbac.yaml` is exactly what the shipped
/// plugins need (`kuwa rbac`), like the CRDs.
#[test]
fn committed_rbac_matches_the_plugins() {
    let generated = ok_documents(&kuwa(&[
        "rbac".as_ref(),
        "--plugins".as_ref(),
        plugins_dir().as_os_str(),
        "--plugin-resources".as_ref(),
    ]));
    let path = workspace().join("deploy/rbac.yaml");
    let committed: Vec<Value> =
        serde_saphyr::from_multiple(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        committed,
        generated,
        "{} drifted from the plugins; regenerate with `kuwa rbac --plugins target/plugins --plugin-resources > deploy/rbac.yaml`",
        path.display()
    );
    let kinds: Vec<&str> = generated
        .iter()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    );
    let text = serde_json::to_string(&generated).unwrap();
    assert!(!text.contains("secrets"), "no plugin reads Secrets: {text}");
    assert!(
        text.contains("impersonate"),
        "plugin objects' identities: {text}"
    );
    assert!(!text.contains("\"*\""), "no wildcard: {text}");
}

#[test]
fn committed_host_crds_match_the_types() {
    let generated = ok_documents(&kuwa(&["crds".as_ref(), "--host".as_ref()]));
    assert_eq!(generated.len(), 2, "ClusterPlugin and Plugin");
    assert_committed_crds(generated, "kuwa crds --host --out deploy/crds");
}

#[test]
fn rbac_refuses_a_bad_name_and_an_empty_directory() {
    let empty = tempfile::tempdir().unwrap();
    let out = kuwa(&[
        "rbac".as_ref(),
        "--plugins".as_ref(),
        empty.path().as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no plugins"),
        "{out:?}"
    );
    let out = kuwa(&[
        "rbac".as_ref(),
        "--plugins".as_ref(),
        plugins_dir().as_os_str(),
        "--service-account".as_ref(),
        "Not/A Name".as_ref(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--service-account"),
        "{out:?}"
    );
}

#[test]
fn run_refuses_lease_durations_that_cannot_work() {
    let plugins = tempfile::tempdir().unwrap();
    let out = kuwa(&[
        "run".as_ref(),
        "--plugins".as_ref(),
        plugins.path().as_os_str(),
        "--leader-elect".as_ref(),
        "--leader-renew-deadline".as_ref(),
        "20s".as_ref(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--leader-renew-deadline")
            && err.contains("shorter than --leader-lease-duration"),
        "{err}"
    );
}

#[test]
fn run_explains_a_missing_plugins_directory() {
    let out = kuwa(&[
        "run".as_ref(),
        "--plugins".as_ref(),
        "/nonexistent/plugins".as_ref(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/plugins") && err.contains("not a directory"),
        "{err}"
    );
}

#[test]
fn run_refuses_out_of_range_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--max-concurrent-reconciles", "513"),
        ("--max-concurrent-reconciles", "0"),
        ("--plugin-concurrency", "513"),
        ("--call-deadline", "2h"),
    ] {
        let out = kuwa(&[
            "run".as_ref(),
            "--plugins".as_ref(),
            dir.path().as_os_str(),
            flag.as_ref(),
            value.as_ref(),
        ]);
        assert!(!out.status.success(), "{flag} {value} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}

#[test]
fn plugin_test_prints_the_hosts_plan() {
    let out = ok_yaml(&plugin_test(
        "webserver",
        "deploy/samples/kuwa.dev_v1alpha1_webserver.yaml",
        &[],
    ));
    let plan: Vec<&str> = out["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    // Nothing observed yet: every child is created, the status and the
    // version annotation are written.
    assert_eq!(
        plan.iter().filter(|w| w.ends_with("(missing)")).count(),
        3,
        "{plan:?}"
    );
    assert!(
        plan.iter().any(|w| w.starts_with("apply status")),
        "{plan:?}"
    );
    for child in out["children"].as_array().unwrap() {
        assert_eq!(child["metadata"]["labels"]["kuwa.dev/plugin"], "webserver");
    }
}
