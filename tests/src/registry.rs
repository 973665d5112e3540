//! A real OCI registry on loopback for the tests: Debian's `docker-registry`
//! (the CNCF distribution registry; `cargo xtask test` installs it), with
//! its storage in a temporary directory, stopped by PID on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::host::{free_port, http};

/// The registry binary Debian's package installs.
pub const BINARY: &str = "/usr/bin/docker-registry";

/// A running registry.
pub struct Registry {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free loopback port and waits for `/v2/`.
    pub async fn start() -> Result<Self> {
        if !std::path::Path::new(BINARY).is_file() {
            bail!(
                "{BINARY} is missing: `cargo xtask test` installs Debian's docker-registry (apt-get install docker-registry)"
            );
        }
        let dir = tempfile::tempdir()?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        let mut registry = Self {
            child,
            addr,
            _dir: dir,
        };
        for _ in 0..200 {
            if let Some(status) = registry.child.try_wait()? {
                bail!("docker-registry exited with {status}");
            }
            if let Ok((200, _)) = http(addr, "GET", "/v2/").await {
                return Ok(registry);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("docker-registry did not answer on {addr} within 10 s")
    }

    /// `oci://<addr>/<path>`.
    pub fn reference(&self, path: &str) -> String {
        format!("oci://{}/{path}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
