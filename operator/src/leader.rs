//! Leader election on a `coordination.k8s.io/v1` Lease, so several replicas can run and exactly
//! one reconciles.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
}
