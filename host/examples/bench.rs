//! Benchmarks behind `docs/benchmarks.md` (no cluster needed):
//!
//! 1. plugin load time per shipped plugin: cold (compile) vs warm (read from
//!    the on-disk compile cache), each in a fresh runtime;
//! 2. per-call cost of one WebServer reconcile on its sample: in a fresh wasm
//!    instance (what the host does) vs the same code compiled natively.
//!
//! `cargo run -p kuwa-host --example bench [--release] -- [PLUGINS_DIR]`
//! (default `target/plugins`, built by `cargo xtask plugins`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kuwa_host::plugin::loader::load_file;
use kuwa_host::plugin::runtime::{Runtime, wit};
use kuwa_host::tenant::limits::Limits;
use kuwa_plugin_webserver::WebServerPlugin;
use kuwa_sdk::testing::Fixture;

const SAMPLE: &str = include_str!("../../deploy/samples/kuwa.dev_v1alpha1_webserver.yaml");

fn median(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    (
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() - 1],
    )
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/plugins"), PathBuf::from);
    let cache = tempfile::tempdir()?;
    const COLD: usize = 5;
    const WARM: usize = 21;
    println!(
        "| plugin | size KiB | cold load ms (min / median / max, n={COLD}) | warm load ms (min / median / max, n={WARM}) | ratio |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for name in ["webserver", "memcached", "mltask"] {
        let path = dir.join(format!("{name}.wasm"));
        let size = std::fs::metadata(&path)?.len() / 1024;
        let cold: Vec<Duration> = (0..COLD)
            .map(|_| {
                let runtime = Runtime::new(None).map_err(|e| anyhow::anyhow!("{e:#}"))?;
                let started = Instant::now();
                rt.block_on(load_file(&runtime, &path, Limits::default()))?;
                Ok(started.elapsed())
            })
            .collect::<anyhow::Result<_>>()?;
        // Fill the cache once, then load in fresh runtimes (no in-memory reuse).
        rt.block_on(load_file(
            &Runtime::new(Some(cache.path())).map_err(|e| anyhow::anyhow!("{e:#}"))?,
            &path,
            Limits::default(),
        ))?;
        let warm: Vec<Duration> = (0..WARM)
            .map(|_| {
                let runtime =
                    Runtime::new(Some(cache.path())).map_err(|e| anyhow::anyhow!("{e:#}"))?;
                let started = Instant::now();
                let p = rt.block_on(load_file(&runtime, &path, Limits::default()))?;
                assert_eq!(p.cache.label(), "hit");
                Ok(started.elapsed())
            })
            .collect::<anyhow::Result<_>>()?;
        let (c0, c1, c2) = median(cold);
        let (w0, w1, w2) = median(warm);
        println!(
            "| {name} | {size} | {} / {} / {} | {} / {} / {} | {:.0}× |",
            ms(c0),
            ms(c1),
            ms(c2),
            ms(w0),
            ms(w1),
            ms(w2),
            c1.as_secs_f64() / w1.as_secs_f64()
        );
    }

    const CALLS: usize = 1000;
    let runtime = Runtime::new(Some(cache.path())).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let plugin = rt.block_on(load_file(
        &runtime,
        &dir.join("webserver.wasm"),
        Limits::default(),
    ))?;
    let mut parent: serde_json::Value = serde_saphyr::from_str(SAMPLE)?;
    parent["metadata"]["namespace"] = "default".into();
    parent["metadata"]["uid"] = "u".into();
    parent["metadata"]["generation"] = 1.into();
    let input = wit::Observed {
        parent: parent.to_string(),
        children: Vec::new(),
        related: Vec::new(),
        context: wit::Context {
            now: "2026-01-01T00:00:00Z".into(),
            trigger: "bench".into(),
        },
    };
    let wasm: Vec<Duration> = (0..CALLS)
        .map(|_| {
            let started = Instant::now();
            let out = rt
                .block_on(plugin.reconcile(&input))
                .expect("call")
                .expect("reconcile");
            std::hint::black_box(out);
            started.elapsed()
        })
        .collect();
    let fixture = Fixture::parent_yaml(SAMPLE);
    let native: Vec<Duration> = (0..CALLS)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(fixture.reconcile::<WebServerPlugin>().expect("reconcile"));
            started.elapsed()
        })
        .collect();
    let (_, wm, _) = median(wasm);
    let (_, nm, _) = median(native);
    println!();
    println!(
        "| WebServer reconcile of the sample (JSON in, 3 children + status out), n={CALLS} | median µs |"
    );
    println!("| --- | --- |");
    println!(
        "| wasm: fresh instance per call (pooling allocator) + call | {} |",
        us(wm)
    );
    println!(
        "| native: same plugin code, same JSON conversion | {} |",
        us(nm)
    );
    println!("| ratio | {:.1}× |", wm.as_secs_f64() / nm.as_secs_f64());
    Ok(())
}
