//! Leader election with a `coordination.k8s.io/v1` Lease, the way
//! client-go's and controller-runtime's managers do it: Kubernetes is the
//! coordinator, kuwa adds none of its own.
//!
//! Every replica keeps its watches, caches and queue warm; only the one
//! holding the Lease takes keys from the queue and writes. [`Leadership`]
//! is the switch the workers and the writer read:
//!
//! - [`Role::Standby`]: no key is taken, every write is refused;
//! - [`Role::Leader`]: keys are taken and written;
//! - [`Role::Stopping`]: shutting down while leading: no new key is taken,
//!   reconciles in flight may still write; then the Lease is released.
//!
//! The rules, from client-go: a candidate takes the Lease when it is free
//! (created, released or held by nobody), or when its record has not changed
//! for the holder's `leaseDurationSeconds` as measured by the candidate's own
//! clock since it last saw the record change (never by comparing timestamps
//! of two machines). A leader renews every retry period and steps down on
//! its own once `renew_deadline` has passed since the start of its last
//! successful renewal: as `renew_deadline < lease_duration`, it stops
//! writing before anyone else may start. A released Lease (holder cleared)
//! is taken at once: a standby watches it, so a graceful handover takes one
//! round trip, not a retry period.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// What this host may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Another replica leads (or none does yet): keep caches warm, take no
    /// key, write nothing.
    Standby,
    /// This host leads: take keys and write.
    Leader,
    /// Shutting down while leading: reconciles in flight finish and may
    /// write, no new key is taken.
    Stopping,
}

/// The switch between standing by and leading, read by the workers (may I
/// take a key?) and by the writer (may I write?).
#[derive(Debug)]
pub struct Leadership {
    role: watch::Sender<Role>,
}

impl Leadership {
    /// A host that leads from the start (no election: `kuwa run` from a
    /// shell).
    pub fn always() -> Arc<Self> {
        Arc::new(Self {
            role: watch::Sender::new(Role::Leader),
        })
    }

    /// A host that stands by until an [`Elector`] makes it lead.
    pub fn standby() -> Arc<Self> {
        Arc::new(Self {
            role: watch::Sender::new(Role::Standby),
        })
    }

    /// The role now.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Whether a write may go out now (leading, or finishing the reconciles
    /// in flight before a graceful stop).
    pub fn may_write(&self) -> bool {
        matches!(self.role(), Role::Leader | Role::Stopping)
    }

    /// Follows the role.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Starts a graceful stop: a leader stops taking keys (its reconciles in
    /// flight may finish); a standby stays one.
    pub fn stop(&self) {
        self.role.send_if_modified(|r| {
            let was = *r;
            if was == Role::Leader {
                *r = Role::Stopping;
            }
            was == Role::Leader
        });
    }

    /// The elector won the Lease: lead, unless stopping.
    fn lead(&self) -> bool {
        self.role.send_if_modified(|r| {
            let changed = *r == Role::Standby;
            if changed {
                *r = Role::Leader;
            }
            changed
        })
    }

    /// The Lease is lost or released: stop writing at once.
    fn stand_by(&self) -> bool {
        self.role.send_if_modified(|r| {
            let changed = *r != Role::Standby;
            *r = Role::Standby;
            changed
        })
    }
}

/// Settings of leader election (`kuwa run --leader-elect`).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The Lease's name.
    pub name: String,
    /// The Lease's namespace.
    pub namespace: String,
    /// This replica's identity (the Lease's `holderIdentity`).
    pub identity: String,
    /// How long a standby waits, from the last change it saw of a held
    /// Lease, before taking it.
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often a leader renews and a standby retries.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Checks that the durations can work: `retry_period < renew_deadline <
    /// lease_duration`, whole seconds for the Lease.
    pub fn check(&self) -> anyhow::Result<()> {
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            anyhow::bail!(
                "--leader-retry-period ({}) must be positive and shorter than --leader-renew-deadline ({})",
                fmt(self.retry_period),
                fmt(self.renew_deadline)
            );
        }
        if self.renew_deadline >= self.lease_duration {
            anyhow::bail!(
                "--leader-renew-deadline ({}) must be shorter than --leader-lease-duration ({}): a leader must stop writing before a standby may take over",
                fmt(self.renew_deadline),
                fmt(self.lease_duration)
            );
        }
        if self.lease_duration.subsec_nanos() != 0 || self.lease_duration.as_secs() > 3600 {
            anyhow::bail!(
                "--leader-lease-duration must be whole seconds, at most 1h, got {}",
                fmt(self.lease_duration)
            );
        }
        if !crate::validate::is_dns_subdomain(&self.name) {
            anyhow::bail!(
                "--leader-election-id {:?} is not a valid object name",
                self.name
            );
        }
        if self.identity.is_empty() || self.identity.len() > 128 {
            anyhow::bail!("--leader-identity must be 1-128 characters");
        }
        Ok(())
    }
}

/// A default identity: `$POD_NAME`, else the hostname, with the process id
/// and a few random bits so two hosts on one machine differ.
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "kuwa".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{host}-{}-{:06x}", std::process::id(), nanos & 0xff_ffff)
}

/// What one attempt on the Lease found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// This host holds it (acquired or renewed).
    Held,
    /// Someone else does, or a race was lost.
    Other,
}

/// The change of a Lease record a standby saw last, and when it saw it.
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

/// Competes for the Lease and drives a [`Leadership`].
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    leadership: Arc<Leadership>,
    metrics: Arc<Metrics>,
}

impl Elector {
    /// An elector for `config` driving `leadership`.
    pub fn new(
        client: kube::Client,
        config: LeaseConfig,
        leadership: Arc<Leadership>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            leadership,
            metrics,
        }
    }

    /// The leadership this elector drives.
    pub fn leadership(&self) -> Arc<Leadership> {
        self.leadership.clone()
    }

    /// Runs the election until aborted: one task competing for the Lease,
    /// one watching it to wake the first when it changes (a release is seen
    /// at once).
    pub fn spawn(&self) -> JoinHandle<()> {
        let wake = Arc::new(Notify::new());
        let watch = {
            let api = self.api.clone();
            let wake = wake.clone();
            let name = self.config.name.clone();
            tokio::spawn(async move {
                let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
                let mut events = watcher(api, config).default_backoff().boxed();
                while let Some(event) = events.next().await {
                    if event.is_ok() {
                        wake.notify_one();
                    }
                }
            })
        };
        let elector = self.clone();
        tokio::spawn(async move {
            elector.compete(&wake).await;
            watch.abort();
        })
    }

    async fn compete(&self, wake: &Notify) {
        let mut observed: Option<Observed> = None;
        // While leading: when leading ends unless renewed.
        let mut valid_until: Option<Instant> = None;
        let mut last_error: Option<String> = None;
        loop {
            let started = Instant::now();
            if valid_until.is_some_and(|until| started >= until) {
                valid_until = None;
                self.step_down("the lease was not renewed within the renew deadline");
            }
            let attempt = self.attempt(&mut observed);
            let outcome = match valid_until {
                Some(until) => tokio::select! {
                    r = tokio::time::timeout(self.config.renew_deadline, attempt) => Some(r),
                    () = tokio::time::sleep_until(until) => None,
                },
                None => Some(tokio::time::timeout(self.config.renew_deadline, attempt).await),
            };
            match outcome {
                Some(Ok(Ok(Attempt::Held))) => {
                    last_error = None;
                    valid_until = Some(started + self.config.renew_deadline);
                    if self.leadership.lead() {
                        self.metrics.set_leader(true);
                        tracing::info!(lease = %self.lease_name(), identity = %self.config.identity, "leading");
                    }
                }
                Some(Ok(Ok(Attempt::Other))) => {
                    last_error = None;
                    if valid_until.take().is_some() {
                        self.step_down("another replica holds the lease");
                    }
                }
                Some(Ok(Err(e))) => {
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!(lease = %self.lease_name(), error = %e, "leader election: the lease could not be read or written");
                        last_error = Some(e);
                    }
                }
                Some(Err(_)) => {
                    tracing::warn!(lease = %self.lease_name(), "leader election: no answer from the API server within the renew deadline");
                }
                // The renew deadline passed while the request was pending:
                // stepped down at the top of the loop.
                None => {}
            }
            // A renew deadline passed meanwhile is acted on at the top of
            // the loop, at once: the sleep below ends by then.
            let next = started + self.config.retry_period;
            match valid_until {
                Some(until) => tokio::time::sleep_until(next.min(until)).await,
                None => tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = wake.notified() => {}
                },
            }
        }
    }

    fn step_down(&self, why: &str) {
        if self.leadership.stand_by() {
            self.metrics.set_leader(false);
            tracing::warn!(lease = %self.lease_name(), reason = why, "lost the lease: standing by, no more writes");
        }
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    fn spec(&self, transitions: i32) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs() as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One try: create the Lease, renew it, take it over, or find it held.
    async fn attempt(&self, observed: &mut Option<Observed>) -> Result<Attempt, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Other),
                Err(e) => Err(e),
            };
        };
        let rv = lease.metadata.resource_version.clone();
        if observed.as_ref().is_none_or(|o| o.resource_version != rv) {
            *observed = Some(Observed {
                resource_version: rv,
                at: Instant::now(),
            });
        }
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = match holder {
            Some(h) if h == self.config.identity => LeaseSpec {
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                lease_duration_seconds: Some(self.config.lease_duration.as_secs() as i32),
                ..spec
            },
            Some(_) => {
                let duration = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.config.lease_duration, Duration::from_secs);
                let seen = observed.as_ref().map_or_else(Instant::now, |o| o.at);
                if seen.elapsed() < duration {
                    return Ok(Attempt::Other);
                }
                self.spec(transitions.saturating_add(1))
            }
            None => self.spec(transitions.saturating_add(1)),
        };
        lease.spec = Some(new_spec);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Other),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this host holds it (holder cleared, so a
    /// standby takes it at once), and stands by. Call after the reconciles
    /// in flight have finished and the election task is stopped.
    pub async fn release(&self) -> Result<bool, kube::Error> {
        self.step_down("released");
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig {
            name: "kuwa".into(),
            namespace: "kuwa-system".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    #[test]
    fn durations_must_let_a_leader_stop_before_a_standby_starts() {
        assert!(config().check().is_ok());
        let mut c = config();
        c.renew_deadline = Duration::from_secs(15);
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .contains("shorter than --leader-lease-duration")
        );
        let mut c = config();
        c.retry_period = Duration::from_secs(10);
        assert!(c.check().is_err());
        let mut c = config();
        c.lease_duration = Duration::from_millis(15_500);
        assert!(c.check().is_err());
        let mut c = config();
        c.name = "Not A Name".into();
        assert!(c.check().is_err());
    }

    #[test]
    fn roles_move_only_the_way_they_may() {
        let l = Leadership::standby();
        assert!(!l.may_write());
        l.stop();
        assert_eq!(
            l.role(),
            Role::Standby,
            "a standby stopping stays a standby"
        );
        assert!(l.lead());
        assert!(l.may_write());
        l.stop();
        assert_eq!(l.role(), Role::Stopping);
        assert!(l.may_write(), "reconciles in flight may still finish");
        assert!(!l.lead(), "a stopping host does not lead again");
        assert!(l.stand_by());
        assert!(!l.may_write());
        assert!(Leadership::always().may_write());
    }
}
