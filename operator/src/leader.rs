//! Leader election on a `coordination.k8s.io/v1` Lease, so several replicas can run and exactly
//! one reconciles.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

/// Seconds a leader's Lease stays valid without renewal; a standby takes over after this.
const LEASE_DURATION_SECONDS: u64 = 15;
/// The leader renews this many seconds before its Lease expires.
const LEASE_GRACE_SECONDS: u64 = 5;

pub struct Election {
    /// `true` while this replica holds the Lease.
    pub leadership: watch::Receiver<bool>,
    /// Renews the Lease; releases it once every receiver is dropped.
    pub task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

pub async fn start(
    client: Client,
    namespace: &str,
    lease_name: &str,
    identity: &str,
) -> Result<Election, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, lease_name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await?;
    let (leadership, task) = manager.watch().await;
    Ok(Election { leadership, task })
}

/// Resolves once this replica leads; `false` if the election ended first.
pub async fn acquired(leadership: &mut watch::Receiver<bool>) -> bool {
    leadership.wait_for(|leading| *leading).await.is_ok()
}

/// Resolves once leadership is lost or the election ended.
pub async fn lost(mut leadership: watch::Receiver<bool>) {
    // An error means the election task ended, which also ends leadership.
    let _ = leadership.wait_for(|leading| !*leading).await;
}

/// Resolves once the Lease, after being seen held by someone, is seen with no holder: a leader
/// that shut down released it. kube-lease-manager's standby sleeps until the Lease's expiry
/// before looking again, so without this a clean handover waited the whole Lease duration.
/// Never resolves if the Lease cannot be watched (the standby then takes over at expiry).
pub async fn released(client: Client, namespace: &str, lease_name: &str) {
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={lease_name}"));
    let mut holders = watcher(leases, config)
        .default_backoff()
        .applied_objects()
        .map_ok(|lease| lease.spec.and_then(|s| s.holder_identity))
        .boxed();
    let mut release = Release::default();
    while let Some(holder) = holders.next().await {
        match holder {
            Ok(holder) => {
                if release.observe(holder.as_deref()) {
                    return;
                }
            }
            Err(error) => warn!(%error, "watching the leader Lease"),
        }
    }
    std::future::pending::<()>().await
}

/// Tells a release (held, then not held) from a Lease that was simply never taken.
#[derive(Default)]
struct Release {
    seen_held: bool,
}

impl Release {
    /// `true` when `holder` is the first empty one after a held one.
    fn observe(&mut self, holder: Option<&str>) -> bool {
        let held = holder.is_some_and(|h| !h.is_empty());
        let released = self.seen_held && !held;
        self.seen_held |= held;
        released
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::timeout;

    use super::*;

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn acquired_waits_for_leadership() {
        let (sender, mut receiver) = watch::channel(false);
        assert!(
            timeout(SHORT, acquired(&mut receiver)).await.is_err(),
            "not leader yet"
        );
        sender.send(true).unwrap();
        assert!(timeout(SHORT, acquired(&mut receiver)).await.unwrap());
    }

    #[tokio::test]
    async fn acquired_is_false_when_the_election_ends() {
        let (sender, mut receiver) = watch::channel(false);
        drop(sender);
        assert!(!timeout(SHORT, acquired(&mut receiver)).await.unwrap());
    }

    #[tokio::test]
    async fn lost_waits_until_leadership_ends() {
        let (sender, receiver) = watch::channel(true);
        let lost = tokio::spawn(lost(receiver.clone()));
        tokio::time::sleep(SHORT).await;
        assert!(!lost.is_finished(), "still leading");
        sender.send(false).unwrap();
        timeout(SHORT, lost).await.unwrap().unwrap();

        let (sender, receiver) = watch::channel(true);
        drop(sender);
        timeout(SHORT, super::lost(receiver)).await.unwrap();
    }

    #[test]
    fn a_release_is_a_holder_going_away_not_a_lease_never_taken() {
        let mut release = Release::default();
        assert!(!release.observe(None), "never held");
        assert!(!release.observe(Some("")), "never held");
        assert!(!release.observe(Some("op-a")));
        assert!(!release.observe(Some("op-a")), "renewed");
        assert!(release.observe(None), "released");

        let mut release = Release::default();
        assert!(!release.observe(Some("op-a")));
        assert!(release.observe(Some("")), "released (empty holder)");
    }
}
