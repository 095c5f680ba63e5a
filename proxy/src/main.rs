//! The `postern` binary: parses the command line, sets up the runtime,
//! telemetry and signals, and runs the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postern::config::file::XdsProtocolFile;
use postern::config::{BootstrapOverrides, Config, ConfigError};
use postern::demo::{self, Demo, DemoOptions};
use postern::sidecar::app_probe::{AppProbes, StatusServer};
use postern::sidecar::{inject, iptables, wait_ready, webhook};
use postern::{telemetry, Proxy};

/// jemalloc returns freed pages to the kernel (see `.cargo/config.toml` for
/// its settings); glibc's malloc keeps the holes a burst leaves between
/// live blocks resident for good.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "A service-mesh sidecar proxy and API gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Runtime log format: text or json.
    #[arg(long, global = true, env = "POSTERN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Runtime log filter, e.g. `info` or `info,postern=debug` (default: RUST_LOG, else info);
    /// changeable later with admin `POST /logging?level=...`.
    #[arg(long, global = true, env = "POSTERN_LOG_LEVEL")]
    log_level: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy from a static YAML config, a control plane, or both.
    Run(Bootstrap),
    /// Check a config file (and flags) and report every problem with its field path.
    Validate(Bootstrap),
    /// Run a small mesh in this process: the reference control plane and
    /// CA, two example services and their sidecars, with mTLS and policies.
    Demo {
        /// Address of the edge listener (on the frontend's sidecar).
        #[arg(long, default_value = "127.0.0.1:10000")]
        listen: SocketAddr,
        /// Address of the frontend sidecar's admin server; the reviews
        /// sidecars take the next two ports.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Address of the control plane (ADS, CA, access-log collector).
        #[arg(long, default_value = "127.0.0.1:15010")]
        control_plane: SocketAddr,
    },
    /// Install, print (--dry-run) or remove (--cleanup) the nat rules that
    /// capture a pod's TCP; run by the sidecar's init container.
    Iptables(iptables::IptablesArgs),
    /// Add the sidecar to Kubernetes manifests, or serve that as an admission webhook.
    Inject(inject::InjectArgs),
    /// Wait until a proxy's admin server answers GET /ready with 200.
    WaitReady(wait_ready::WaitReadyArgs),
}

/// Where config comes from: a file, flags and environment variables.
#[derive(clap::Args)]
struct Bootstrap {
    /// Config file (static resources, identity, xDS server); optional with --xds-address.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Node id sent to the control plane.
    #[arg(long, env = "POSTERN_NODE_ID")]
    node_id: Option<String>,
    /// Node cluster sent to the control plane.
    #[arg(long, env = "POSTERN_NODE_CLUSTER")]
    node_cluster: Option<String>,
    /// xDS control plane, http://host:port or https://host:port.
    #[arg(long, env = "POSTERN_XDS_ADDRESS")]
    xds_address: Option<String>,
    /// xDS protocol: sotw or delta.
    #[arg(long, env = "POSTERN_XDS_PROTOCOL", value_parser = ["sotw", "delta"])]
    xds_protocol: Option<String>,
    /// Admin server address.
    #[arg(long, env = "POSTERN_ADMIN_ADDRESS")]
    admin_address: Option<SocketAddr>,
    /// This workload's name in metrics (`telemetry.workload.name`).
    #[arg(long, env = "POSTERN_WORKLOAD_NAME")]
    workload_name: Option<String>,
    /// This workload's namespace in metrics (`telemetry.workload.namespace`).
    #[arg(long, env = "POSTERN_WORKLOAD_NAMESPACE")]
    workload_namespace: Option<String>,
    /// This workload's `app` label (`telemetry.workload.app`).
    #[arg(long, env = "POSTERN_APP")]
    app: Option<String>,
    /// This workload's `version` label (`telemetry.workload.version`).
    #[arg(long, env = "POSTERN_APP_VERSION")]
    app_version: Option<String>,
    /// Ports never sniffed on capture listeners, e.g. `3306,9000-9100` (`opaque_ports`).
    #[arg(long, env = "POSTERN_OPAQUE_PORTS", value_parser = parse_opaque_ports)]
    opaque_ports: Option<OpaquePorts>,
    /// Writable directory for the last-known-good dynamic config (`state_dir`).
    #[arg(long, env = "POSTERN_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// How long outbound listeners keep accepting once a drain starts, e.g. `5s` (`outbound_drain_wait`).
    #[arg(long, env = "POSTERN_OUTBOUND_DRAIN_WAIT", value_parser = humantime::parse_duration)]
    outbound_drain_wait: Option<std::time::Duration>,
    /// Plaintext status server for the app's rewritten kubelet probes, e.g. `0.0.0.0:15020`.
    #[arg(long, env = "POSTERN_STATUS_ADDRESS")]
    status_address: Option<SocketAddr>,
    /// The app's original probes as JSON, by `/app-health/...` path (written by `postern inject`).
    #[arg(long, env = "POSTERN_APP_PROBES", value_name = "JSON", value_parser = parse_app_probes, requires = "status_address")]
    app_probes: Option<AppProbes>,
}

fn parse_app_probes(s: &str) -> Result<AppProbes, String> {
    AppProbes::from_json(s).map_err(|e| e.to_string())
}

/// A port list as one flag value (clap would take a bare `Vec` for a
/// repeated flag).
#[derive(Clone)]
struct OpaquePorts(Vec<postern::config::capture::PortRange>);

fn parse_opaque_ports(s: &str) -> Result<OpaquePorts, String> {
    postern::config::capture::parse_port_list(s).map(OpaquePorts)
}

impl Bootstrap {
    fn load(&self) -> Result<Config, ConfigError> {
        let overrides = BootstrapOverrides {
            node_id: self.node_id.clone(),
            node_cluster: self.node_cluster.clone(),
            xds_address: self.xds_address.clone(),
            xds_protocol: self.xds_protocol.as_deref().map(|p| match p {
                "delta" => XdsProtocolFile::Delta,
                _ => XdsProtocolFile::Sotw,
            }),
            admin_address: self.admin_address,
            workload_name: self.workload_name.clone(),
            workload_namespace: self.workload_namespace.clone(),
            app: self.app.clone(),
            app_version: self.app_version.clone(),
            opaque_ports: self.opaque_ports.clone().map(|ports| ports.0),
            state_dir: self.state_dir.clone(),
            outbound_drain_wait: self.outbound_drain_wait,
        };
        Config::from_bootstrap(self.config.as_deref(), &overrides)
    }

    fn name(&self) -> String {
        self.config
            .as_ref()
            .map_or_else(|| "bootstrap".to_string(), |p| p.display().to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match cli.log_format.as_str() {
        "json" => telemetry::LogFormat::Json,
        _ => telemetry::LogFormat::Text,
    };
    let log_level = cli.log_level.clone();
    let logging = move || telemetry::init_tracing(log_format, log_level.as_deref());
    match cli.command {
        Command::Validate(bootstrap) => match bootstrap.load() {
            Ok(_) => {
                println!("{}: ok", bootstrap.name());
                ExitCode::SUCCESS
            }
            Err(err) => report_config_error(&bootstrap.name(), &err),
        },
        Command::Run(bootstrap) => {
            let config = match bootstrap.load() {
                Ok(config) => config,
                Err(err) => return report_config_error(&bootstrap.name(), &err),
            };
            let status = bootstrap.status_address;
            let probes = bootstrap.app_probes.unwrap_or_default();
            run(logging, || async move {
                // Bound first, so a taken port stops the start before the
                // proxy serves anything.
                let status = match status {
                    Some(address) => Some(StatusServer::bind(address, probes).await?),
                    None => None,
                };
                let proxy = Proxy::start(config).await?;
                if let Some(status) = status {
                    tracing::info!(addr = ?status.local_addr().ok(), "status server listening");
                    tokio::spawn(status.serve());
                }
                Ok((proxy, None))
            })
        }
        Command::Demo {
            listen,
            admin,
            control_plane,
        } => {
            let level = cli
                .log_level
                .or_else(|| std::env::var("RUST_LOG").ok())
                .unwrap_or_else(|| demo::LOG_FILTER.to_owned());
            let logging = move || telemetry::init_tracing(log_format, Some(&level));
            run(logging, || async move {
                let options = DemoOptions {
                    listen,
                    admin,
                    control_plane,
                };
                let demo = Demo::start(options).await?;
                let help = demo.help().to_owned();
                Ok((demo, Some(help)))
            })
        }
        Command::Iptables(args) => exit_with(iptables::run_cli(&args)),
        Command::Inject(args) => match args.command {
            Some(inject::InjectCommand::Webhook(args)) => {
                logging();
                serve_webhook(&args)
            }
            None => exit_with(
                inject::run_cli(args.file.as_deref(), &args.options).map(|out| print!("{out}")),
            ),
        },
        Command::WaitReady(args) => {
            block_on(async move { wait_ready::wait_ready(args.admin_address, args.timeout).await })
        }
    }
}

fn exit_with<E: std::error::Error>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Each message already carries its cause.
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a short helper command on a single-threaded runtime.
fn block_on<E: std::error::Error>(
    future: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => exit_with(runtime.block_on(future)),
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

fn serve_webhook(args: &webhook::WebhookArgs) -> ExitCode {
    block_on(async move {
        let server = webhook::WebhookServer::bind(args).await?;
        tracing::info!(addr = ?server.local_addr().ok(), "injection webhook serving");
        server
            .serve(async {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
                tracing::info!("shutting down");
            })
            .await;
        Ok::<(), webhook::WebhookError>(())
    })
}

fn report_config_error(source: &str, err: &ConfigError) -> ExitCode {
    match err {
        ConfigError::Read { .. } => eprintln!("error: {err}"),
        _ => {
            for field in err.field_errors() {
                eprintln!("error: {source}: {field}");
            }
        }
    }
    ExitCode::FAILURE
}

/// What `run` serves until a signal: one proxy, or the demo's mesh.
trait Served {
    fn drain(&self);
    async fn drained_started(&self);
    async fn wait(self) -> anyhow::Result<()>;
}

impl Served for Proxy {
    fn drain(&self) {
        Proxy::drain(self);
    }

    async fn drained_started(&self) {
        Proxy::drained_started(self).await;
    }

    async fn wait(self) -> anyhow::Result<()> {
        Proxy::wait(self).await
    }
}

impl Served for Demo {
    fn drain(&self) {
        Demo::drain(self);
    }

    async fn drained_started(&self) {
        Demo::drained_started(self).await;
    }

    async fn wait(self) -> anyhow::Result<()> {
        Ok(Demo::wait(self).await?)
    }
}

fn run<S, F, Fut>(logging: impl FnOnce(), start: F) -> ExitCode
where
    S: Served,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(S, Option<String>)>>,
{
    logging();
    telemetry::install_prometheus_recorder();
    // A sidecar is usually given a core or two; let the operator say how many.
    // With one, a single-threaded runtime skips the work-stealing machinery.
    let threads = std::env::var("POSTERN_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let mut runtime = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let (proxy, help) = start().await?;
        if let Some(help) = help {
            println!("{help}");
        }
        wait_for_signal(&proxy).await?;
        proxy.wait().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the drain on SIGTERM or SIGINT; returns at once if a drain was
/// started another way (the admin server), when `wait` takes over.
async fn wait_for_signal(proxy: &impl Served) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = proxy.drained_started() => return Ok(()),
    }
    proxy.drain();
    Ok(())
}
