//! `tessera`: the operator's command. Parses arguments, then hands over to
//! the command's module; errors are printed as one line and exit 1.

mod args;
mod manage;
mod node;
mod output;
mod size;
mod up;
mod vhost;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(cli));
    if let Err(e) = result {
        eprintln!("error: {}", chain(&e));
        std::process::exit(1);
    }
}

async fn run(cli: args::Cli) -> anyhow::Result<()> {
    use args::Command;
    let global = cli.global;
    match cli.command {
        Command::Up(a) => up::run(a).await,
        Command::Api(args::ApiCommand::Run(a)) => {
            daemon_panics_abort();
            api_run(a).await
        }
        Command::Node(args::NodeCommand::Run(a)) => {
            daemon_panics_abort();
            node::run(&global, a).await
        }
        Command::Node(args::NodeCommand::Format(a)) => node::format(a),
        Command::Vhost(args::VhostCommand::Serve(a)) => vhost::serve(&global, a).await,
        Command::Scrub(a) => vhost::scrub(&global, a).await,
        other => manage::run(&global, other).await,
    }
}

/// `tessera api run`: the API server, its move planner and the repair
/// worker for vDisks nobody has open, until SIGINT or SIGTERM.
async fn api_run(a: args::ApiRunArgs) -> anyhow::Result<()> {
    let bandwidth = a.repair_bandwidth_mib.max(1) << 20;
    let server = tessera_api::start(a.try_into()?).await?;
    let worker = start_repair_worker(&server, bandwidth)?;
    node::shutdown_signal().await;
    tracing::info!("stopping the API server");
    worker.stop().await;
    server.shutdown().await?;
    Ok(())
}

/// The repair worker of a running API server.
pub struct Worker {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Starts the repair worker against the API server `server`.
pub fn start_repair_worker(
    server: &tessera_api::ApiServer,
    bandwidth: u64,
) -> anyhow::Result<Worker> {
    use anyhow::Context;
    let api = tessera_api_client::ApiClient::from_token_file(
        &format!("http://{}", server.addr),
        &server.token_path,
    )
    .context("cannot make an API client for the repair worker")?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(tessera_replicator::worker::run(
        tessera_replicator::worker::WorkerConfig {
            zone: std::sync::Arc::new(api),
            host: node::system_host_name(),
            bandwidth,
            period: std::time::Duration::from_secs(2),
        },
        stopped,
    ));
    Ok(Worker { stop, task })
}

/// `error: outer: inner: innermost`, one line.
fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Levels: error = an operation failed; warn = something is degraded or was
/// retried; info = lifecycle (start, stop, registration); debug = per
/// connection; trace = per request. `RUST_LOG` overrides.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A daemon that panics stops at once rather than limping on with a
/// half-dead runtime: its supervisor restarts it, and its state on disk is
/// crash-safe by design.
fn daemon_panics_abort() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
}
