//! The sandbox on real hostile components, with no cluster: a guest that
//! sleeps in a host call is stopped at its deadline, and so is a `describe`
//! that sleeps.
//!
//! Needs the test plugins built by `cargo xtask plugins --with-test-plugins`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kuwa_host::plugin::loader::{FileError, load_file};
use kuwa_host::plugin::runtime::{CallError, EPOCH_TICK, LoadError, Runtime, wit};
use kuwa_host::tenant::limits::Limits;

fn test_plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("KUWA_TEST_PLUGINS_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-plugins"),
        PathBuf::from,
    );
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask plugins --with-test-plugins` first",
        path.display()
    );
    path
}

/// How late a stopped call may end: one epoch tick plus scheduling on a
/// busy 2-core machine. The point is "at the deadline, not at the sleep's
/// end" (20 s here).
const SLACK: Duration = Duration::from_millis(250);

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_sleeping_in_a_host_call_is_stopped_at_its_deadline() {
    let runtime = Runtime::new(None).unwrap();
    // The sleeper's manifest grants a 500 ms deadline.
    let plugin = load_file(&runtime, &test_plugin("sleeper"), Limits::default())
        .await
        .unwrap();
    let deadline = plugin.limits.deadline;
    assert_eq!(deadline, Duration::from_millis(500));
    let input = wit::Observed {
        parent: r#"{"apiVersion":"test.kuwa.dev/v1","kind":"SleepTest","metadata":{"name":"nap","namespace":"ns","uid":"u"},"spec":{"seconds":20}}"#.into(),
        children: Vec::new(),
        related: Vec::new(),
        context: wit::Context {
            now: "2026-12-01T00:00:00Z".into(),
            trigger: "test".into(),
        },
    };
    for _ in 0..3 {
        let started = Instant::now();
        let result = plugin.reconcile(&input).await;
        let took = started.elapsed();
        println!("sleeper: deadline {deadline:?}, stopped after {took:?} (tick {EPOCH_TICK:?})");
        assert!(
            matches!(result, Err(CallError::Timeout(d)) if d == deadline),
            "{result:?}"
        );
        assert!(took >= deadline - EPOCH_TICK, "stopped early: {took:?}");
        assert!(
            took <= deadline + EPOCH_TICK + SLACK,
            "stopped late: {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_describe_is_refused_within_its_deadline() {
    let runtime = Runtime::new(None).unwrap();
    let limits = Limits::default();
    let started = Instant::now();
    let result = load_file(&runtime, &test_plugin("slow-describe"), limits).await;
    let took = started.elapsed();
    println!(
        "slow-describe: refused after {took:?} (describe deadline {:?})",
        limits.describe_deadline()
    );
    assert!(
        matches!(
            &result,
            Err(FileError::Load(_, LoadError::Call(CallError::Timeout(_))))
        ),
        "{:?}",
        result.err()
    );
    // Loading includes compiling the component (seconds in a debug build);
    // the sleep itself is an hour.
    assert!(took < Duration::from_secs(60), "{took:?}");
}
