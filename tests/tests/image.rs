//! The image `cargo xtask image` builds (issue 11, done-when 4): `skopeo
//! inspect` accepts the OCI layout; the `/kuwa` in its layer is statically
//! linked and, taken out of the layer, runs against the real local control
//! plane with the image's own plugins.
//!
//! `cargo xtask test` builds the image first and passes its layout as
//! `KUWA_IMAGE_DIR` (and its tag as `KUWA_IMAGE_TAG`).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use kuwa_e2e::host::{KuwaHost, metric_sample};
use kuwa_e2e::{TestNamespace, client, kubeconfig_path};
use serde_json::Value;

fn layout() -> Result<(PathBuf, String)> {
    let dir = std::env::var_os("KUWA_IMAGE_DIR")
        .map(PathBuf::from)
        .context("KUWA_IMAGE_DIR is not set: run the suite with `cargo xtask test` (it builds the image)")?;
    let tag = std::env::var("KUWA_IMAGE_TAG").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into());
    ensure!(
        dir.join("index.json").is_file(),
        "{} is not an image layout",
        dir.display()
    );
    Ok((dir, tag))
}

fn blob(dir: &std::path::Path, digest: &str) -> Result<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:").context("digest algorithm")?;
    Ok(std::fs::read(dir.join("blobs/sha256").join(hex))?)
}

#[tokio::test(flavor = "multi_thread")]
async fn image_layout_is_inspectable_and_its_binary_static() -> Result<()> {
    let (dir, tag) = layout()?;
    let reference = format!("oci:{}:{tag}", dir.display());
    let out = Command::new("skopeo")
        .args(["inspect", &reference])
        .output()
        .context("running skopeo (cargo xtask image --inspect installs it)")?;
    ensure!(
        out.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: Value = serde_json::from_slice(&out.stdout)?;
    println!(
        "skopeo inspect {reference}:\n{}",
        serde_json::to_string_pretty(&inspected)?
    );
    assert_eq!(inspected["Os"], "linux");
    assert_eq!(inspected["Architecture"], "amd64");
    let layers = inspected["Layers"].as_array().context("Layers")?;
    assert_eq!(layers.len(), 1, "one layer");

    // The layer, as a registry would serve it: check every digest on the way.
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("manifest digest")?;
    let manifest_bytes = blob(&dir, manifest_digest)?;
    let manifest: Value = serde_json::from_slice(&manifest_bytes)?;
    let layer_digest = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer digest")?;
    ensure!(
        layers[0] == layer_digest,
        "skopeo and the manifest agree on the layer"
    );
    let gz = blob(&dir, layer_digest)?;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice()).read_to_end(&mut tar)?;
    let unpacked = tempfile::tempdir()?;
    tar::Archive::new(tar.as_slice()).unpack(unpacked.path())?;
    let kuwa = unpacked.path().join("kuwa");
    let size = std::fs::metadata(&kuwa)
        .context("/kuwa in the layer")?
        .len();
    let wasm_in = |dir: &std::path::Path| -> Result<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        out.sort();
        Ok(out)
    };
    let plugins = wasm_in(&unpacked.path().join("plugins"))?;
    let names = |ps: &[PathBuf]| -> Vec<String> {
        ps.iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    };
    let shipped = wasm_in(
        kuwa_e2e::host::plugin("webserver")?
            .parent()
            .context("the shipped plugins directory")?,
    )?;
    ensure!(
        names(&plugins) == names(&shipped) && plugins.len() == 5,
        "the image carries the 5 shipped plugins: {:?}, shipped {:?}",
        names(&plugins),
        names(&shipped)
    );
    for p in &plugins {
        ensure!(
            p.with_extension("yaml").is_file(),
            "{} has its grant beside it",
            p.display()
        );
    }

    // Statically linked: the dynamic loader says so, and there is none to name.
    let ldd = Command::new("ldd")
        .arg(&kuwa)
        .output()
        .context("running ldd")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    ensure!(
        said.contains("statically linked") || said.contains("not a dynamic executable"),
        "ldd /kuwa: {said}"
    );
    let dynamic = Command::new("ldd").arg(std::env::current_exe()?).output()?;
    ensure!(
        String::from_utf8_lossy(&dynamic.stdout).contains("libc.so"),
        "the same check tells a dynamic executable apart"
    );
    println!(
        "/kuwa: {:.1} MiB, statically linked ({}); layer {:.1} MiB compressed; {} plugins",
        size as f64 / f64::from(1 << 20),
        said.trim(),
        gz.len() as f64 / f64::from(1 << 20),
        plugins.len()
    );

    // The binary out of the image runs: TLS to the API server, its plugins
    // load from the image's own directory.
    let client = client().await?;
    // It installs no CRD (like the Deployment in deploy/): the committed
    // ones, as `kubectl apply -k deploy/` would.
    for file in std::fs::read_dir(kuwa_e2e::workspace_root().join("deploy/crds"))? {
        let path = file?.path();
        if path.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&path)?;
            let crd: Value = serde_saphyr::from_str(&text)
                .with_context(|| format!("{} is not YAML", path.display()))?;
            kuwa_e2e::objects::apply_crd(&client, &crd).await?;
        }
    }
    let ns = TestNamespace::new(&client, "image").await?;
    let kubeconfig = tokio::task::spawn_blocking(kubeconfig_path).await??;
    let host = KuwaHost::start_binary(&kuwa, &kubeconfig, &ns.name, &plugins).await;
    let host = match host {
        Ok(h) => h,
        Err(e) => bail!("the image's kuwa did not start: {e:#}"),
    };
    let metrics = host.metrics().await?;
    let loaded = metrics
        .lines()
        .filter(|l| l.starts_with("kuwa_plugin_info{"))
        .count();
    ensure!(
        loaded == plugins.len(),
        "all {} plugins loaded from the image:\n{metrics}",
        plugins.len()
    );
    ensure!(metric_sample(&metrics, "kuwa_watch_lists_total", &[]).is_some_and(|n| n > 0.0));
    drop(host);
    ns.cleanup().await;
    Ok(())
}
