//! `qmodel-operator`: reconciles `QuantizedModel` resources into qmodel-server Deployments.

mod autoscaler;
mod canary;
mod config;
mod controller;
mod crd;
mod golden;
mod leader;
mod metrics;
mod pod_client;
mod pod_metrics;
mod resources;
mod rollout;
mod status;
#[cfg(test)]
mod testing;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use kube::Client;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use crate::config::OperatorConfig;
use crate::controller::Context;
use crate::metrics::Metrics;

#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the QuantizedModel CustomResourceDefinition as YAML.
    Crd,
    /// Run the controller (the default).
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Operator configuration file (YAML); built-in defaults when absent.
    #[arg(long, env = "QMODEL_OPERATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "QMODEL_OPERATOR_HTTP_ADDR",
        default_value = "0.0.0.0:8081"
    )]
    http_addr: SocketAddr,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "QMODEL_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Take a Lease before reconciling, so several replicas can run.
    #[arg(long, env = "QMODEL_OPERATOR_LEADER_ELECTION", default_value_t = true, action = ArgAction::Set)]
    leader_election: bool,
    #[arg(
        long,
        env = "QMODEL_OPERATOR_LEASE_NAME",
        default_value = "qmodel-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease; defaults to the client's namespace (the pod's own in-cluster).
    #[arg(long, env = "QMODEL_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events; set it to the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reconcile only models in these namespaces (repeat the flag, or comma-separate in the
    /// env); all namespaces when unset.
    #[arg(
        long = "watch-namespace",
        env = "QMODEL_OPERATOR_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    watch_namespaces: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", crd::crd_yaml());
            Ok(())
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = OperatorConfig::load(args.config.as_deref())?;
    let client = Client::try_default()
        .await
        .context("building a Kubernetes client from in-cluster or KUBECONFIG configuration")?;
    let metrics = Arc::new(Metrics::default());

    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding the HTTP server to {}", args.http_addr))?;
    let router = metrics::router(metrics.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            error!(%error, "HTTP server stopped");
        }
    });

    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "qmodel-operator".to_owned());
    let ctx = Arc::new(Context::new(
        client.clone(),
        config,
        metrics.clone(),
        Some(identity.clone()),
    ));

    if !args.leader_election {
        metrics.ready.store(true, Ordering::Relaxed);
        metrics.leader.set(1);
        info!("leader election disabled; reconciling");
        controller::run(ctx, &args.watch_namespaces, termination()).await;
        return Ok(());
    }

    let lease_namespace = args
        .lease_namespace
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let elect = || {
        leader::start(
            client.clone(),
            &lease_namespace,
            &args.lease_name,
            &identity,
        )
    };
    let mut election = elect().await.context("starting leader election")?;
    metrics.ready.store(true, Ordering::Relaxed);
    info!(%identity, lease = %args.lease_name, namespace = %lease_namespace, "waiting for leadership");
    loop {
        tokio::select! {
            acquired = leader::acquired(&mut election.leadership) => {
                anyhow::ensure!(acquired, "leader election ended before this replica became leader");
                break;
            }
            () = leader::released(client.clone(), &lease_namespace, &args.lease_name) => {
                // The leader let go: a fresh election takes the free Lease now, where the
                // current one would sleep until the old holder's expiry.
                info!("the Lease was released; competing for it now");
                drop(election.leadership);
                let _ = election.task.await;
                election = elect().await.context("restarting leader election")?;
            }
            () = termination() => return Ok(()),
        }
    }
    metrics.leader.set(1);
    info!(%identity, "became leader; reconciling");
    let lost = leader::lost(election.leadership.clone());
    controller::run(ctx, &args.watch_namespaces, async move {
        tokio::select! {
            () = lost => {}
            () = termination() => {}
        }
    })
    .await;
    metrics.leader.set(0);
    let still_leader = *election.leadership.borrow();
    // Dropping the last receiver makes the election task release the Lease.
    drop(election.leadership);
    if let Ok(Err(error)) = election.task.await {
        error!(%error, "releasing the Lease failed");
    }
    // A replica that lost its Lease exits non-zero so Kubernetes restarts it as a standby.
    anyhow::ensure!(still_leader, "lost leadership");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("interrupted"),
        () = terminate => info!("terminating"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_defaults_to_run() {
        let cli = Cli::try_parse_from([
            "qmodel-operator",
            "--log-format",
            "json",
            "--leader-election",
            "false",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert!(matches!(cli.run.log_format, LogFormat::Json));
        assert!(!cli.run.leader_election);
        assert_eq!(cli.run.http_addr, "0.0.0.0:8081".parse().unwrap());
    }

    #[test]
    fn cli_has_crd_and_run_subcommands() {
        assert!(matches!(
            Cli::try_parse_from(["qmodel-operator", "crd"])
                .unwrap()
                .command,
            Some(Command::Crd)
        ));
        let cli = Cli::try_parse_from([
            "qmodel-operator",
            "run",
            "--config",
            "/etc/qmodel/config.yaml",
        ])
        .unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.config, Some(PathBuf::from("/etc/qmodel/config.yaml")));
        assert!(args.leader_election);
        assert!(args.watch_namespaces.is_empty(), "cluster-wide by default");
    }

    #[test]
    fn watch_namespaces_repeat_or_comma_separate() {
        let cli = Cli::try_parse_from([
            "qmodel-operator",
            "--watch-namespace",
            "a,b",
            "--watch-namespace",
            "c",
        ])
        .unwrap();
        assert_eq!(cli.run.watch_namespaces, ["a", "b", "c"]);
    }
}
