//! `postern-control`: the reference control plane binary. Parses flags,
//! sets up logging to stderr, and runs [`postern_control::app::run`] until
//! Ctrl-C or SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use postern_control::app::{self, CaOptions, ServeOptions};
use tracing_subscriber::EnvFilter;

/// The Postern reference control plane.
#[derive(Debug, Parser)]
#[command(name = "postern-control", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve ADS (SotW and delta) from a YAML mesh file, the access-log
    /// service, and optionally a CA and a rate-limit service.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The YAML mesh description; changes are picked up while running.
    #[arg(long, value_name = "FILE")]
    mesh: PathBuf,
    /// Address for the gRPC server (ADS, ALS and the CA).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15010")]
    listen: SocketAddr,
    /// How often to check the mesh file for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// Run the CA for this trust domain (needs --ca-tokens).
    #[arg(long, value_name = "DOMAIN", requires = "ca_tokens")]
    ca_trust_domain: Option<String>,
    /// YAML list of `{ token, spiffe_id }` the CA authenticates callers by.
    #[arg(long, value_name = "FILE", requires = "ca_trust_domain")]
    ca_tokens: Option<PathBuf>,
    /// Write the CA's root certificate (PEM) to this file.
    #[arg(long, value_name = "FILE", requires = "ca_trust_domain")]
    ca_root_out: Option<PathBuf>,
    /// Print the per-route access-log summary to stdout this often (only
    /// when new entries arrived); 0 turns it off.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    als_summary_interval: Duration,
    /// Serve the Envoy rate-limit service (global rate limits) with the
    /// limits of this YAML file (`domains: [{ domain, descriptors }]`).
    #[arg(long, value_name = "FILE")]
    rate_limits: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let Command::Serve(args) = cli.command;
    let options = ServeOptions {
        mesh: args.mesh,
        listen: args.listen,
        poll: args.poll,
        ca: args
            .ca_trust_domain
            .zip(args.ca_tokens)
            .map(|(trust_domain, tokens)| CaOptions {
                trust_domain,
                tokens,
                root_out: args.ca_root_out,
            }),
        als_summary_interval: args.als_summary_interval,
        rate_limits: args.rate_limits,
    };
    match app::run(options, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(%err, "could not listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "could not listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
