use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use qmodel_server::backend::{error_line, load};
use qmodel_server::config::ServeArgs;
use qmodel_server::quantize;
use qmodel_server::service::Service;
use qmodel_server::threads::ComputeThreads;
use qmodel_server::{grpc, http};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model artifact over HTTP (TEI, OpenAI and Cohere APIs) and, with --grpc-port,
    /// gRPC (TEI's).
    Serve(ServeArgs),
    /// Convert a Hugging Face / sentence-transformers checkpoint into a model artifact.
    Quantize(quantize::QuantizeArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Quantize(args) => quantize::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmodel-server: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Load (errors exit before the port is bound), bind, warm up, then ready. On SIGTERM or
/// SIGINT: `/ready` turns 503 at once, requests are still served for `--shutdown-grace`, then
/// accepting stops, every accepted request finishes, and the process exits 0.
fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    init_logging(args.json_output);
    let threads = ComputeThreads::detect(args.inference_threads);
    // SAFETY: no other thread exists yet (the runtime is built below), so nothing can read
    // the environment concurrently. candle and rayon size their pools from
    // RAYON_NUM_THREADS, the int8 kernels' pool from QMODEL_THREADS.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.count.to_string());
        std::env::set_var("QMODEL_THREADS", threads.count.to_string());
    }
    let model = load(&args.model_dir, args.device)?;
    // Logged only now: a server that cannot load prints nothing but its one-line error (the
    // pod's termination message).
    tracing::info!(threads = threads.count, reason = %threads.reason, "compute threads");
    let app = Service::new(model, args.limits.clone(), &args.prompts, threads)?;
    if let Some(kernel) = app.cpu_kernel() {
        tracing::info!(kernel, "int8 and f32 CPU kernels");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        tracing::info!(addr = %listener.local_addr()?, "listening");
        let grpc_listener = match args.grpc_port {
            Some(port) => {
                let listener = tokio::net::TcpListener::bind((args.host.as_str(), port))
                    .await
                    .with_context(|| format!("binding {}:{port} (gRPC)", args.host))?;
                tracing::info!(grpc_addr = %listener.local_addr()?, "gRPC listening");
                Some(listener)
            }
            None => None,
        };

        let (warm_up_failed, failed) = tokio::sync::oneshot::channel();
        let warming = app.clone();
        tokio::spawn(async move {
            match warming.warm_up().await {
                Ok(()) => tracing::info!("warmed up; ready"),
                Err(e) => {
                    let _ = warm_up_failed.send(e);
                }
            }
        });
        // Serving ends on a signal (after the grace period), or when warm-up failed (then
        // with its error); both servers stop together.
        let (stop_error, stop_error_rx) = tokio::sync::oneshot::channel();
        let mut signals = Signals::install()?;
        let grace = args.shutdown_grace;
        let draining = app.clone();
        let (stopping, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                () = signals.next() => {
                    draining.withdraw_readiness();
                    if !grace.is_zero() {
                        tracing::info!(?grace, "stopping: /ready answers 503; still serving for the grace period");
                        tokio::select! {
                            () = tokio::time::sleep(grace) => {}
                            () = signals.next() => tracing::info!("second signal: grace period cut short"),
                        }
                    }
                    tracing::info!("shutting down: finishing accepted requests");
                }
                Ok(e) = failed => {
                    let _ = stop_error.send(e);
                }
            }
            let _ = stopping.send(true);
        });
        let stop = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|&stop| stop).await;
            }
        };
        let grpc_server = grpc_listener.map(|listener| grpc::serve(app.clone(), listener, stop()));
        let http_server = http::serve(app.clone(), listener, stop());
        match grpc_server {
            Some(grpc_server) => {
                tokio::try_join!(http_server, grpc_server)?;
            }
            None => http_server.await?,
        }
        match stop_error_rx.await {
            Ok(e) => Err(e.context("warm-up failed")),
            Err(_) => Ok(()),
        }
    })?;
    // Outside the runtime: this joins the batching thread.
    app.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT, installed before serving so none is missed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
