//! `strata`: the Strata CSI driver (`serve`), a CSI client for operators, and a benchmark.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use strata::bench::BenchCommand;
use strata::client::ClientArgs;
use strata::client::node::NodeCommand;
use strata::client::snapshot::SnapshotCommand;
use strata::client::volume::VolumeCommand;
use strata::{client, server};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Strata: a CSI driver for node-local storage, and a CSI client"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "info", env = "STRATA_LOG")]
    log_level: String,
    /// Log format: text for people, json for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services.
    Serve(Box<server::ServeOptions>),
    /// Show a driver's identity, readiness and node info.
    Info(ClientArgs),
    /// Controller operations on volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshot operations.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Node operations: stage, publish, stats.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Benchmarks against any CSI endpoint.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Make the peer service's CA and certificate: print a Secret, or write the files.
    PeerCerts(strata::certs::peer::PeerCertsArgs),
    /// Make the external-snapshot-metadata sidecar's TLS Secret and the
    /// SnapshotMetadataService that tells backup tools where it is and which CA to trust.
    SnapshotMetadataCerts(strata::certs::snapshot_metadata::SnapshotMetadataCertsArgs),
    /// Node-side pool maintenance (run as root on the node, with no server on the pool).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// The Node finalizers of --node-loss (with your kubeconfig).
    #[command(subcommand)]
    NodeLoss(NodeLossCommand),
}

#[derive(Subcommand)]
enum NodeLossCommand {
    /// Remove Strata's finalizer from every Node, or from --node: for an uninstall, after
    /// the DaemonSet is gone (docs/operations.md, "Uninstall"). Other finalizers stay.
    ReleaseFinalizers {
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Unmount a pool image's filesystem and free its loop device (for an uninstall).
    /// Refused while a server serves the pool or a volume of it is in use; deletes nothing.
    Release {
        /// The pool directory the server ran with (--pool).
        #[arg(long)]
        pool: PathBuf,
    },
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(opts) => server::serve(opts.with_defaults()).await,
        Command::Info(c) => client::info(c).await,
        Command::PeerCerts(args) => strata::certs::peer::run(args),
        Command::SnapshotMetadataCerts(args) => strata::certs::snapshot_metadata::run(args),
        Command::Pool(PoolCommand::Release { pool }) => server::release_pool(&pool),
        Command::NodeLoss(NodeLossCommand::ReleaseFinalizers { node }) => {
            release_finalizers(node.as_deref()).await
        }
        Command::Volume(v) => v.run().await,
        Command::Snapshot(s) => s.run().await,
        Command::Node(n) => n.run().await,
        Command::Bench(b) => b.run().await,
    }
}

#[cfg(feature = "kubernetes")]
async fn release_finalizers(node: Option<&str>) -> Result<(), String> {
    let released = strata::kube_node_loss::release_finalizers(node).await?;
    for name in &released {
        println!("node {name}: Strata's finalizer removed");
    }
    if released.is_empty() {
        println!("no Node carries Strata's finalizer");
    }
    Ok(())
}

#[cfg(not(feature = "kubernetes"))]
async fn release_finalizers(_: Option<&str>) -> Result<(), String> {
    Err("node-loss needs the cargo feature `kubernetes`".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    // Two worker threads match the small nodes this runs on; blocking work has its own pool.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("strata: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e}");
            ExitCode::FAILURE
        }
    }
}
