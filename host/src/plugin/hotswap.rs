//! The plugins directory: loaded at start and watched for changes, through one
//! code path (DESIGN §3, "Hot swap").
//!
//! Every change to a `NAME.wasm` (or its manifest `NAME.yaml`) waits for
//! [`QUIET_PERIOD`] without further changes, so a file still being written is
//! never loaded; dotfiles and other names (`.NAME.wasm.tmp`, `NAME.wasm~`) are
//! ignored. The file is then compiled and described off the async executor
//! and checked against what the same file served before:
//!
//! * if it fails to load, or describes another plugin name or parent kind
//!   ("incompatible"), the version already served keeps serving; the reason
//!   is logged and counted in `kuwa_plugin_load_errors_total{file,reason}`;
//! * if it is good, the file's activator swaps it in with [`Host::activate`]:
//!   reconciles already running finish on the old version, every parent is
//!   requeued, caches and watches stay (no relist). A swap is counted in
//!   `kuwa_plugin_swaps_total{plugin}`;
//! * a removed file unloads its plugin with [`Host::deactivate`], which stops
//!   the watches no other plugin uses.
//!
//! Each file has one activator task that owns its activation: it installs the
//! CRD (with `--install-crds`), retries while a kind is not served yet, and
//! always moves to the newest version it was given, so an older version can
//! never win over a newer one.

// Load errors are the cold path and name what they refuse (paths, kinds);
// boxing them would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::apply::{CrdError, check_crd};
use crate::host::Host;
use crate::plugin::loader::{DirError, FileError, load_file, wasm_files};
use crate::plugin::runtime::{LoadedPlugin, Runtime};
use crate::tenant::limits::Limits;

/// How long a changed path must stay unchanged before it is loaded. Copying a
/// component of a few MiB takes milliseconds; 300 ms of silence means the
/// writer is done (a writer that pauses longer is caught by the size and
/// mtime check around each load, see [`PluginDir`]), and a swap still lands
/// well under a second after the file does.
pub const QUIET_PERIOD: Duration = Duration::from_millis(300);

/// First delay before retrying an activation whose kinds are not served yet
/// (e.g. its CRD is installed later); doubles up to [`MAX_ACTIVATE_RETRY`].
pub const FIRST_ACTIVATE_RETRY: Duration = Duration::from_secs(1);

/// Longest delay between activation retries.
pub const MAX_ACTIVATE_RETRY: Duration = Duration::from_secs(30);

/// Why the plugins directory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The directory is missing or unreadable. Not retryable.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The directory cannot be resolved.
    #[error("cannot resolve plugins directory {path}: {source}")]
    Resolve {
        /// The directory as given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a changed plugin file was not swapped in. The version already served
/// from the file (if any) keeps serving; the file is tried again when it
/// changes.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// It could not be read, compiled, linked or described.
    #[error(transparent)]
    Load(#[from] FileError),
    /// It carries a CRD the host is to install but may not: it defines
    /// another kind than the plugin's parent, or asks for a conversion
    /// webhook.
    #[error("{}: {source}", file.display())]
    Crd {
        /// The file.
        file: PathBuf,
        /// What is wrong with the CRD.
        source: CrdError,
    },
    /// It loaded, but cannot replace what is served (another plugin name or
    /// parent kind, or a name or kind another file serves).
    #[error("{}: incompatible: {why}", file.display())]
    Incompatible {
        /// The file.
        file: PathBuf,
        /// What does not fit.
        why: String,
    },
}

impl Rejection {
    /// One word for metrics: read, manifest, grant, compile, link,
    /// describe, crd or incompatible.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Load(e) => e.reason(),
            Self::Crd { .. } => "crd",
            Self::Incompatible { .. } => "incompatible",
        }
    }
}

/// The plugin file a changed `path` in `dir` concerns: `NAME.wasm` itself,
/// or `NAME.wasm` for its manifest `NAME.yaml`. `None` for anything else:
/// dotfiles (`.NAME.wasm.tmp`, editor locks), other extensions
/// (`NAME.wasm.tmp`, `NAME.wasm~`), the directory itself and subdirectories.
pub fn plugin_file(dir: &Path, path: &Path) -> Option<PathBuf> {
    if path.parent() != Some(dir) {
        return None;
    }
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') {
        return None;
    }
    match path.extension()?.to_str()? {
        "wasm" => Some(path.to_owned()),
        "yaml" => Some(path.with_extension("wasm")),
        _ => None,
    }
}

/// The plugin files a watch event concerns. Reads (the loader's own opens
/// and closes) are not changes; everything else is, including a close after
/// writing.
pub fn changed_files(dir: &Path, event: &Event) -> Vec<PathBuf> {
    let relevant = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Any
        | EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Other => true,
    };
    if !relevant {
        return Vec::new();
    }
    let mut files: Vec<PathBuf> = event
        .paths
        .iter()
        .filter_map(|p| plugin_file(dir, p))
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Changed paths waiting for a quiet period: each is due [`QUIET_PERIOD`]
/// (or the period given) after its last change.
#[derive(Debug)]
pub struct Debouncer {
    quiet: Duration,
    last_change: HashMap<PathBuf, Instant>,
}

impl Debouncer {
    /// A debouncer with quiet period `quiet`.
    pub fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            last_change: HashMap::new(),
        }
    }

    /// Records a change of `path` at `now`, restarting its quiet period.
    pub fn changed(&mut self, path: PathBuf, now: Instant) {
        self.last_change.insert(path, now);
    }

    /// When the next path becomes due, if any is waiting.
    pub fn next_due(&self) -> Option<Instant> {
        self.last_change.values().map(|t| *t + self.quiet).min()
    }

    /// Removes and returns the paths quiet for the whole period at `now`,
    /// sorted.
    pub fn take_due(&mut self, now: Instant) -> Vec<PathBuf> {
        let quiet = self.quiet;
        let mut due: Vec<PathBuf> = self
            .last_change
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= quiet)
            .map(|(p, _)| p.clone())
            .collect();
        due.sort();
        for p in &due {
            self.last_change.remove(p);
        }
        due
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.last_change.is_empty()
    }
}

/// What identifies a file's contents cheaply: its size and modification
/// time. A load is trusted only if the stamp did not move while loading.
type Stamp = (u64, Option<SystemTime>);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()))
}

/// What one plugin file serves.
struct Served {
    /// The version last accepted from the file (active, or being activated
    /// by its activator).
    plugin: Arc<LoadedPlugin>,
    /// The version the activator should serve; `None` unloads.
    wanted: watch::Sender<Option<Arc<LoadedPlugin>>>,
    /// The activator; it ends after unloading.
    activator: JoinHandle<()>,
}

/// `name@version (sha256 prefix)`, for logs.
fn label(plugin: &LoadedPlugin) -> String {
    format!(
        "{}@{} ({})",
        plugin.info.name,
        plugin.info.version,
        &plugin.sha256[..plugin.sha256.len().min(12)]
    )
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The plugins directory of a running host.
pub struct PluginDir {
    dir: PathBuf,
    host: Arc<Host>,
    runtime: Runtime,
    limits: Limits,
    install_crds: bool,
    served: HashMap<PathBuf, Served>,
}

/// How a loaded file relates to what is served.
enum Fit {
    /// Nothing is served from this file yet.
    New,
    /// The plugin served from `from` (or `path` itself), changed or not.
    Served {
        /// Where it is served from now: `path`, or the file it moved from
        /// (renamed, the old name's removal not processed yet).
        from: PathBuf,
        /// The same bytes, grant and limits as what is served: nothing to
        /// swap.
        unchanged: bool,
    },
}

impl PluginDir {
    /// The directory `dir`, served into `host`: plugins are compiled by
    /// `runtime` with `limits` as per-call defaults; with `install_crds`
    /// every accepted version's CRD is applied before it is activated.
    pub fn new(
        host: Arc<Host>,
        runtime: Runtime,
        dir: &Path,
        limits: Limits,
        install_crds: bool,
    ) -> Result<Self, WatchError> {
        // Watch events carry absolute paths; match them against the same form.
        let dir = std::fs::canonicalize(dir).map_err(|source| WatchError::Resolve {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir,
            host,
            runtime,
            limits,
            install_crds,
            served: HashMap::new(),
        })
    }

    /// Loads every plugin in the directory, waits until each has had its
    /// first activation attempt (CRD installed, caches acquired or a retry
    /// scheduled), then watches the directory for changes in a task.
    ///
    /// The watch starts before the first scan, so a file changed meanwhile is
    /// loaded again after it. If the directory cannot be watched, the plugins
    /// loaded now keep serving without hot swap (logged at error).
    pub async fn serve(mut self) -> Result<JoinHandle<()>, WatchError> {
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event| {
            // The receiver lives as long as the watch loop; after that the
            // host is shutting down.
            let _ = tx.send(event);
        })
        .and_then(|mut w| w.watch(&self.dir, RecursiveMode::NonRecursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot watch the plugins directory; plugin files are loaded once, without hot swap");
                None
            }
        };

        let files: Vec<PathBuf> = wasm_files(&self.dir)?
            .into_iter()
            .filter(|p| plugin_file(&self.dir, p).as_ref() == Some(p))
            .collect();
        if files.is_empty() {
            tracing::warn!(dir = %self.dir.display(), "no plugins (*.wasm) found");
        }
        let mut first_attempts = Vec::new();
        for path in files {
            if let Some(done) = self.sync(&path).await.first_attempt {
                first_attempts.push(done);
            }
        }
        for done in first_attempts {
            // An activator that ended early has nothing more to wait for.
            let _ = done.await;
        }
        Ok(tokio::spawn(async move {
            let Some(watcher) = watcher else {
                // Keep the served plugins: their activators end with `self`.
                std::future::pending::<()>().await;
                return;
            };
            self.watch(watcher, events).await;
        }))
    }

    /// The watch loop: debounces changes and syncs each file when it is due.
    async fn watch(
        mut self,
        _watcher: RecommendedWatcher,
        mut events: mpsc::UnboundedReceiver<notify::Result<Event>>,
    ) {
        tracing::info!(dir = %self.dir.display(), quiet = ?QUIET_PERIOD, "watching the plugins directory");
        let mut debouncer = Debouncer::new(QUIET_PERIOD);
        loop {
            let due = debouncer.next_due();
            tokio::select! {
                event = events.recv() => match event {
                    None => return,
                    Some(Ok(event)) => {
                        let now = Instant::now();
                        if event.need_rescan() {
                            self.rescan(&mut debouncer, now);
                        }
                        for path in changed_files(&self.dir, &event) {
                            debouncer.changed(path, now);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "watch error; rescanning the plugins directory");
                        self.rescan(&mut debouncer, Instant::now());
                    }
                },
                () = sleep_until(due), if due.is_some() => {
                    for path in debouncer.take_due(Instant::now()) {
                        if self.sync(&path).await.still_changing {
                            debouncer.changed(path, Instant::now());
                        }
                    }
                }
            }
        }
    }

    /// Marks every plugin file on disk and every file served as changed
    /// (after the watch lost events).
    fn rescan(&self, debouncer: &mut Debouncer, now: Instant) {
        let on_disk = wasm_files(&self.dir).unwrap_or_default();
        let on_disk = on_disk.iter().filter_map(|p| plugin_file(&self.dir, p));
        for path in on_disk.chain(self.served.keys().cloned()) {
            debouncer.changed(path, now);
        }
    }

    /// Brings what `path` serves in line with the file: loads it if it
    /// exists, unloads its plugin if it does not.
    async fn sync(&mut self, path: &Path) -> Synced {
        let Some(before) = stamp(path).filter(|_| path.is_file()) else {
            self.remove(path).await;
            return Synced::default();
        };
        let loaded = load_file(&self.runtime, path, self.limits).await;
        if stamp(path) != Some(before) {
            tracing::debug!(file = %path.display(), "plugin file changed while loading; waiting for it to settle");
            return Synced {
                still_changing: true,
                first_attempt: None,
            };
        }
        match loaded
            .map_err(Rejection::from)
            .and_then(|plugin| self.check_crd(path, &plugin).map(|()| plugin))
            .and_then(|plugin| self.fit(path, &plugin).map(|fit| (plugin, fit)))
        {
            Ok((plugin, fit)) => self.accept(path, Arc::new(plugin), fit),
            Err(rejection) => {
                self.reject(path, &rejection);
                Synced::default()
            }
        }
    }

    /// When the host installs CRDs and the plugin's grant lets it: whether
    /// the CRD it carries is one it may install.
    fn check_crd(&self, path: &Path, plugin: &LoadedPlugin) -> Result<(), Rejection> {
        match &plugin.info.crd {
            Some(crd) if self.install_crds && plugin.grant.install_crd => {
                check_crd(&plugin.info, crd)
                    .map(|_| ())
                    .map_err(|source| Rejection::Crd {
                        file: path.to_owned(),
                        source,
                    })
            }
            _ => Ok(()),
        }
    }

    /// Whether `plugin`, just loaded from `path`, may be served from it.
    fn fit(&self, path: &Path, plugin: &LoadedPlugin) -> Result<Fit, Rejection> {
        let info = &plugin.info;
        let incompatible = |why: String| Rejection::Incompatible {
            file: path.to_owned(),
            why,
        };
        let mut moved_from = None;
        for (other, served) in &self.served {
            if other == path {
                continue;
            }
            let theirs = &served.plugin.info;
            let same_name = theirs.name == info.name;
            if !other.exists() {
                // Renamed or removed, and not processed yet: a plugin moved
                // here takes the old file's place; another one waits in its
                // activator until the old file's plugin is unloaded.
                if same_name {
                    moved_from = Some(other.clone());
                }
            } else if same_name {
                return Err(incompatible(format!(
                    "plugin {} is already served from {}",
                    info.name,
                    other.display()
                )));
            } else if theirs.parent.same_kind(&info.parent) {
                return Err(incompatible(format!(
                    "{} is already reconciled by plugin {} from {}",
                    info.parent,
                    theirs.name,
                    other.display()
                )));
            }
        }
        let Some(from) = self
            .served
            .contains_key(path)
            .then(|| path.to_owned())
            .or(moved_from)
        else {
            return Ok(Fit::New);
        };
        let old = &self.served[&from].plugin;
        if old.info.name != info.name {
            return Err(incompatible(format!(
                "it served plugin {} and now describes plugin {}; to replace a plugin, remove its file and add the new one",
                old.info.name, info.name
            )));
        }
        if old.info.parent != info.parent {
            return Err(incompatible(format!(
                "plugin {} reconciled {} and now describes {}",
                info.name, old.info.parent, info.parent
            )));
        }
        let unchanged =
            old.sha256 == plugin.sha256 && old.grant == plugin.grant && old.limits == plugin.limits;
        Ok(Fit::Served { from, unchanged })
    }

    fn accept(&mut self, path: &Path, plugin: Arc<LoadedPlugin>, fit: Fit) -> Synced {
        let metrics = &self.host.metrics;
        let load_seconds = plugin.load_time.as_secs_f64();
        let log_loaded = |what: &str| {
            tracing::info!(
                file = %file_name(path),
                plugin = %plugin.info.name,
                version = %plugin.info.version,
                sha256 = %&plugin.sha256[..plugin.sha256.len().min(12)],
                load_ms = u64::try_from(plugin.load_time.as_millis()).unwrap_or(u64::MAX),
                compile_cache = plugin.cache.label(),
                "{what}"
            );
        };
        match fit {
            Fit::Served {
                from,
                unchanged: true,
            } => {
                if from != path {
                    tracing::info!(from = %file_name(&from), to = %file_name(path), plugin = %label(&plugin), "plugin file renamed");
                    let served = self.served.remove(&from).expect("`fit` found it");
                    self.served.insert(path.to_owned(), served);
                } else {
                    tracing::debug!(file = %path.display(), "plugin file unchanged");
                }
                Synced::default()
            }
            Fit::Served {
                from,
                unchanged: false,
            } => {
                log_loaded("new plugin version loaded; swapping it in");
                metrics.plugin_load_time(&plugin.info.name, plugin.cache.label(), load_seconds);
                let served = self.served.remove(&from).expect("`fit` found it");
                served.wanted.send_replace(Some(plugin.clone()));
                self.served
                    .insert(path.to_owned(), Served { plugin, ..served });
                Synced::default()
            }
            Fit::New => {
                log_loaded("plugin loaded");
                metrics.plugin_load_time(&plugin.info.name, plugin.cache.label(), load_seconds);
                let (wanted, rx) = watch::channel(Some(plugin.clone()));
                let (done, first_attempt) = oneshot::channel();
                let activator =
                    tokio::spawn(activator(self.host.clone(), self.install_crds, rx, done));
                self.served.insert(
                    path.to_owned(),
                    Served {
                        plugin,
                        wanted,
                        activator,
                    },
                );
                Synced {
                    still_changing: false,
                    first_attempt: Some(first_attempt),
                }
            }
        }
    }

    fn reject(&self, path: &Path, rejection: &Rejection) {
        let file = file_name(path);
        let reason = rejection.reason();
        self.host.metrics.plugin_load_error(&file, reason);
        match self.served.get(path) {
            Some(served) => tracing::error!(
                file = %file,
                reason = %reason,
                serving = %label(&served.plugin),
                error = %rejection,
                "plugin file not loaded; the version already served keeps serving"
            ),
            None => {
                tracing::error!(file = %file, reason = %reason, error = %rejection, "plugin file not loaded")
            }
        }
    }

    /// Unloads what `path` served and waits until it is unloaded, so a
    /// plugin of the same name added next is never unloaded by mistake.
    async fn remove(&mut self, path: &Path) {
        if let Some(served) = self.served.remove(path) {
            tracing::info!(file = %file_name(path), plugin = %label(&served.plugin), "plugin file removed; unloading the plugin");
            served.wanted.send_replace(None);
            if let Err(e) = served.activator.await {
                tracing::error!(file = %file_name(path), error = %e, "plugin activator failed");
            }
        }
    }
}

/// The outcome of one [`PluginDir::sync`].
#[derive(Default)]
struct Synced {
    /// The file changed while it was being loaded: try again after a quiet
    /// period.
    still_changing: bool,
    /// For a newly served file: resolves after its first activation attempt.
    first_attempt: Option<oneshot::Receiver<()>>,
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
    }
}

/// Serves the version `wanted` names, until it names none (the file was
/// removed) or its sender is dropped: installs the CRD when asked to,
/// activates with retries while kinds are not served, and moves to a newer
/// version as soon as one is given, even mid-retry. `first_attempt` fires
/// after the first activation attempt.
async fn activator(
    host: Arc<Host>,
    install_crds: bool,
    mut wanted: watch::Receiver<Option<Arc<LoadedPlugin>>>,
    first_attempt: oneshot::Sender<()>,
) {
    let mut first_attempt = Some(first_attempt);
    let mut active: Option<Arc<LoadedPlugin>> = None;
    'versions: loop {
        let Some(plugin) = wanted.borrow_and_update().clone() else {
            break;
        };
        let name = plugin.info.name.clone();
        // A standby installs nothing: the leader does. Until this host
        // leads, activation waits for the kind to be served (or the lead).
        let mut crd_pending = install_crds && plugin.info.crd.is_some();
        let mut delay = FIRST_ACTIVATE_RETRY;
        loop {
            if crd_pending && host.leadership().may_write() {
                crd_pending = false;
                match host.install_crd(&plugin).await {
                    Ok(Some(crd)) => tracing::info!(plugin = %name, crd = %crd, "CRD installed"),
                    Ok(None) => {}
                    Err(CrdError::NotGranted) => {
                        tracing::info!(plugin = %name, "the plugin's grant does not let the host install its CRD (installCrd); it must be installed already")
                    }
                    Err(CrdError::NotLeader) => crd_pending = true,
                    Err(e) => tracing::error!(plugin = %name, error = %e, "CRD not installed"),
                }
            }
            let result = host.activate(plugin.clone()).await;
            if let Some(done) = first_attempt.take() {
                let _ = done.send(());
            }
            match result {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(plugin = %name, version = %plugin.info.version, error = %e, retry_in = ?delay, "plugin not active yet");
                    // Waiting for the leader to install the CRD: taking the
                    // lead ourselves is a reason to retry at once.
                    let mut role = host.leadership().subscribe();
                    let led = async move {
                        if crd_pending {
                            let _ = role.changed().await;
                        } else {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = led => {}
                        changed = wanted.changed() => match changed {
                            Ok(()) => continue 'versions,
                            Err(_) => break 'versions,
                        },
                    }
                    delay = (delay * 2).min(MAX_ACTIVATE_RETRY);
                }
            }
        }
        if let Some(old) = active.replace(plugin.clone()) {
            host.metrics.plugin_swapped(&name);
            tracing::info!(plugin = %name, from = %label(&old), to = %label(&plugin), "plugin swapped");
        }
        if wanted.changed().await.is_err() {
            break;
        }
    }
    if let Some(plugin) = active {
        host.deactivate(&plugin.info.name).await;
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};

    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from("/srv/plugins")
    }

    fn event(kind: EventKind, names: &[&str]) -> Event {
        let mut event = Event::new(kind);
        for n in names {
            event = event.add_path(dir().join(n));
        }
        event
    }

    #[test]
    fn only_plugin_files_and_their_manifests_count() {
        let d = dir();
        let wasm = d.join("webserver.wasm");
        assert_eq!(plugin_file(&d, &wasm), Some(wasm.clone()));
        assert_eq!(plugin_file(&d, &d.join("webserver.yaml")), Some(wasm));
        for ignored in [
            ".webserver.wasm.tmp",
            "webserver.wasm.tmp",
            "webserver.wasm~",
            ".#webserver.wasm",
            ".webserver.wasm",
            "README.md",
            "4913",
        ] {
            assert_eq!(plugin_file(&d, &d.join(ignored)), None, "{ignored}");
        }
        assert_eq!(plugin_file(&d, &d), None);
        assert_eq!(plugin_file(&d, &d.join("sub/other.wasm")), None);
        assert_eq!(plugin_file(&d, Path::new("/elsewhere/x.wasm")), None);
    }

    #[test]
    fn reads_are_not_changes_but_writes_renames_and_removals_are() {
        let d = dir();
        let ws = vec![d.join("webserver.wasm")];
        assert!(
            changed_files(
                &d,
                &event(
                    EventKind::Access(AccessKind::Open(AccessMode::Any)),
                    &["webserver.wasm"]
                )
            )
            .is_empty()
        );
        assert!(
            changed_files(
                &d,
                &event(
                    EventKind::Access(AccessKind::Close(AccessMode::Read)),
                    &["webserver.wasm"]
                )
            )
            .is_empty()
        );
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert_eq!(
                changed_files(&d, &event(kind, &["webserver.wasm"])),
                ws,
                "{kind:?}"
            );
        }
        // `mv .webserver.wasm.tmp webserver.wasm`: only the target counts.
        assert_eq!(
            changed_files(
                &d,
                &event(
                    EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                    &[".webserver.wasm.tmp", "webserver.wasm"]
                )
            ),
            ws
        );
        // A file and its manifest in one event: one plugin file.
        assert_eq!(
            changed_files(
                &d,
                &event(EventKind::Any, &["webserver.yaml", "webserver.wasm"])
            ),
            ws
        );
    }

    #[test]
    fn a_path_is_due_only_after_a_quiet_period_since_its_last_change() {
        let quiet = Duration::from_millis(300);
        let mut d = Debouncer::new(quiet);
        let t0 = Instant::now();
        let a = PathBuf::from("a.wasm");
        let b = PathBuf::from("b.wasm");
        assert!(d.is_empty());
        assert_eq!(d.next_due(), None);

        // A write in several chunks: each chunk restarts the period.
        d.changed(a.clone(), t0);
        d.changed(a.clone(), t0 + Duration::from_millis(200));
        d.changed(b.clone(), t0 + Duration::from_millis(250));
        assert_eq!(d.next_due(), Some(t0 + Duration::from_millis(500)));
        assert!(d.take_due(t0 + Duration::from_millis(400)).is_empty());
        assert_eq!(
            d.take_due(t0 + Duration::from_millis(500)),
            std::slice::from_ref(&a)
        );
        assert_eq!(d.next_due(), Some(t0 + Duration::from_millis(550)));
        assert!(d.take_due(t0 + Duration::from_millis(549)).is_empty());
        assert_eq!(
            d.take_due(t0 + Duration::from_millis(550)),
            std::slice::from_ref(&b)
        );
        assert!(d.is_empty());

        // Both quiet at once: both due, in a stable order.
        d.changed(b.clone(), t0);
        d.changed(a.clone(), t0);
        assert_eq!(d.take_due(t0 + quiet), [a, b]);
        assert!(d.take_due(t0 + quiet * 10).is_empty());
    }

    #[test]
    fn rejections_have_one_word_reasons() {
        let incompatible = Rejection::Incompatible {
            file: "webserver.wasm".into(),
            why: "plugin webserver reconciled a and now describes b".into(),
        };
        assert_eq!(incompatible.reason(), "incompatible");
        let unreadable = Rejection::from(FileError::Read(
            "webserver.wasm".into(),
            std::io::Error::other("gone"),
        ));
        assert_eq!(unreadable.reason(), "read");
    }
}
