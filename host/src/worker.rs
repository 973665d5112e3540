//! The workers: take keys from the queue, run a reconcile for each (at most
//! `max_concurrent` at once), and always report the outcome — a reconcile
//! that panics fails only its own key (counted, logged, backed off), and the
//! key is never left "in flight" for ever. Keys are taken only while the
//! host leads ([`Role::Leader`]); a standby's keys wait in the queue.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::Semaphore;

use crate::leader::Role;
use crate::metrics::Metrics;
use crate::queue::{Outcome, QueueKey, WorkQueue};

/// Serves keys from `queue` until the task is aborted, running `reconcile`
/// for each with at most `max_concurrent` in flight, while `role` is
/// [`Role::Leader`].
pub async fn serve<F, Fut>(
    queue: Arc<WorkQueue>,
    metrics: Arc<Metrics>,
    mut role: tokio::sync::watch::Receiver<Role>,
    max_concurrent: usize,
    reconcile: F,
) where
    F: Fn(QueueKey, &'static str) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let reconcile = Arc::new(reconcile);
    let slots = Arc::new(Semaphore::new(max_concurrent.max(1)));
    loop {
        if role.wait_for(|r| *r == Role::Leader).await.is_err() {
            return;
        }
        // A slot first, then a key: a key taken while waiting for a slot
        // would count as in flight for its plugin and skew the fair shares.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Taking a key is cancel-safe: stop waiting as soon as the host
        // no longer leads.
        let next = tokio::select! {
            next = queue.next() => Some(next),
            _ = role.wait_for(|r| *r != Role::Leader) => None,
        };
        let Some((key, trigger)) = next else {
            continue;
        };
        let queue = queue.clone();
        let metrics = metrics.clone();
        let reconcile = reconcile.clone();
        tokio::spawn(async move {
            let run = reconcile(key.clone(), trigger);
            let outcome = match AssertUnwindSafe(run).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    metrics.reconcile_panic(&key.plugin);
                    tracing::error!(object = %key, panic = %message, "reconcile panicked; the key backs off");
                    Outcome::Failure
                }
            };
            queue.done(&key, outcome);
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_panicking_reconcile_fails_only_its_key() {
        let queue = Arc::new(WorkQueue::new());
        queue.with(|q| q.set_plugin(Arc::from("p"), Some(4), Duration::from_secs(60)));
        let metrics = Arc::new(Metrics::new());
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let leadership = crate::leader::Leadership::always();
        let worker = tokio::spawn(serve(
            queue.clone(),
            metrics.clone(),
            leadership.subscribe(),
            2,
            move |key, _| {
                let done = done_tx.clone();
                async move {
                    if key.name == "boom" {
                        panic!("host bug");
                    }
                    let _ = done.send(key.name.clone());
                    Outcome::Success {
                        requeue_after: None,
                    }
                }
            },
        ));
        let key = |name: &str| QueueKey {
            plugin: Arc::from("p"),
            namespace: None,
            name: name.into(),
        };
        queue.add(key("boom"), "event");
        queue.add(key("fine"), "event");
        let got = tokio::time::timeout(Duration::from_secs(5), done_rx.recv())
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("fine"));
        // The panicked key was reported done (failed): it is in backoff, not
        // stuck in flight.
        tokio::time::timeout(Duration::from_secs(5), async {
            while queue.with(|q| q.failures(&key("boom"))) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the panicked key is reported as failed");
        assert!(
            metrics
                .render()
                .contains("kuwa_reconcile_panics_total{plugin=\"p\"} 1")
        );
        worker.abort();
    }
}
