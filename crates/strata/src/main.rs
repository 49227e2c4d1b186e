//! `strata`: the Strata CSI driver (`serve`), a CSI client for operators, and a benchmark.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use strata::client::commands::{self, CapabilityArgs, SourceArgs};
use strata::client::output::Format;
use strata::endpoint::Endpoint;
use strata::units::parse_size;
use strata::{bench, client, server};

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

#[derive(clap::Args)]
struct ClientArgs {
    /// CSI endpoint to talk to.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/strata/csi.sock"
    )]
    endpoint: Endpoint,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services.
    Serve(server::ServeOptions),
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
    /// Node-side pool maintenance (run as root on the node, with no server on the pool).
    #[command(subcommand)]
    Pool(PoolCommand),
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

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// Size, e.g. 64Mi, 10Gi.
        #[arg(long, default_value = "1Gi", value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        capability: CapabilityArgs,
        #[command(flatten)]
        source: SourceArgs,
        /// StorageClass-style parameter KEY=VALUE, repeatable.
        #[arg(long = "parameter", value_parser = parse_key_value)]
        parameters: Vec<(String, String)>,
    },
    /// Delete a volume.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
    },
    /// List all volumes.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Entries per ListVolumes page.
        #[arg(long, default_value_t = 500)]
        page_size: i32,
    },
    /// Show one volume and its condition.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
    },
    /// Grow a volume (ControllerExpandVolume).
    Expand {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        /// New size, e.g. 2Gi.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Snapshot a volume.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        source_volume_id: String,
    },
    /// Delete a snapshot.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        snapshot_id: String,
    },
    /// List snapshots, optionally of one volume.
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        source_volume_id: Option<String>,
    },
    /// Show one snapshot.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        snapshot_id: String,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Stage a volume at a staging path (format and mount, or attach a block device).
    Stage {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        staging_path: String,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// Unstage a volume.
    Unstage {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        staging_path: String,
    },
    /// Publish a staged volume at a target path.
    Publish {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        staging_path: String,
        #[arg(long)]
        target_path: String,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// Unpublish a volume from a target path.
    Unpublish {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        target_path: String,
    },
    /// Grow the filesystem of a staged volume after a volume expand.
    Expand {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        /// Where the volume is staged or published.
        #[arg(long)]
        path: String,
    },
    /// Usage and condition of a staged or published volume.
    Stats {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        path: String,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Full lifecycle per volume: create, stage, publish, write+fsync, unpublish, unstage, delete.
    Lifecycle {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 100)]
        volumes: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value = "64Mi", value_parser = parse_size)]
        size: u64,
        /// Bytes written and fsynced per volume.
        #[arg(long, default_value = "1Mi", value_parser = parse_size)]
        data: u64,
        /// Directory for staging and target paths.
        #[arg(long, default_value = "/tmp/strata-bench")]
        workdir: PathBuf,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// A mixed workload (create, publish, write, snapshot, list, delete) for a fixed time.
    Churn {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value = "64Mi", value_parser = parse_size)]
        size: u64,
        /// Bytes written and fsynced per write.
        #[arg(long, default_value = "1Mi", value_parser = parse_size)]
        data: u64,
        #[arg(long, default_value = "/tmp/strata-bench")]
        workdir: PathBuf,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// Snapshot and restore volumes holding each data size; verifies the restored data.
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        /// Data sizes, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64Mi,512Mi,2Gi")]
        sizes: Vec<u64>,
        /// Directory for staging paths.
        #[arg(long, default_value = "/tmp/strata-bench")]
        workdir: PathBuf,
    },
    /// Create N volumes, list them all, delete them (unless --keep).
    Scale {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 10_000)]
        volumes: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// ListVolumes page size (0: one page).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// Keep the volumes (to measure startup or RSS with a full pool).
        #[arg(long)]
        keep: bool,
        /// The driver's process id, to report its resident memory.
        #[arg(long)]
        pid: Option<u32>,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(opts) => server::serve(opts.with_defaults()).await,
        Command::Info(c) => commands::info(client::connect(&c.endpoint).await?, c.output).await,
        Command::Pool(PoolCommand::Release { pool }) => server::release_pool(&pool),
        Command::Volume(v) => match v {
            VolumeCommand::Create {
                client: c,
                name,
                size,
                capability,
                source,
                parameters,
            } => {
                let params: HashMap<String, String> = parameters.into_iter().collect();
                let csi = client::connect(&c.endpoint).await?;
                commands::volume_create(csi, name, size, &capability, &source, params, c.output)
                    .await
            }
            VolumeCommand::Delete {
                client: c,
                volume_id,
            } => commands::volume_delete(client::connect(&c.endpoint).await?, volume_id).await,
            VolumeCommand::List {
                client: c,
                page_size,
            } => {
                commands::volume_list(client::connect(&c.endpoint).await?, page_size, c.output)
                    .await
            }
            VolumeCommand::Get {
                client: c,
                volume_id,
            } => {
                commands::volume_get(client::connect(&c.endpoint).await?, volume_id, c.output).await
            }
            VolumeCommand::Expand {
                client: c,
                volume_id,
                size,
            } => {
                commands::volume_expand(
                    client::connect(&c.endpoint).await?,
                    volume_id,
                    size,
                    c.output,
                )
                .await
            }
        },
        Command::Snapshot(s) => match s {
            SnapshotCommand::Create {
                client: c,
                name,
                source_volume_id,
            } => {
                commands::snapshot_create(
                    client::connect(&c.endpoint).await?,
                    name,
                    source_volume_id,
                    c.output,
                )
                .await
            }
            SnapshotCommand::Delete {
                client: c,
                snapshot_id,
            } => commands::snapshot_delete(client::connect(&c.endpoint).await?, snapshot_id).await,
            SnapshotCommand::List {
                client: c,
                source_volume_id,
            } => {
                commands::snapshot_list(
                    client::connect(&c.endpoint).await?,
                    source_volume_id,
                    c.output,
                )
                .await
            }
            SnapshotCommand::Get {
                client: c,
                snapshot_id,
            } => {
                commands::snapshot_get(client::connect(&c.endpoint).await?, snapshot_id, c.output)
                    .await
            }
        },
        Command::Node(n) => match n {
            NodeCommand::Stage {
                client: c,
                volume_id,
                staging_path,
                capability,
            } => {
                commands::node_stage(
                    client::connect(&c.endpoint).await?,
                    volume_id,
                    staging_path,
                    &capability,
                )
                .await
            }
            NodeCommand::Unstage {
                client: c,
                volume_id,
                staging_path,
            } => {
                commands::node_unstage(client::connect(&c.endpoint).await?, volume_id, staging_path)
                    .await
            }
            NodeCommand::Publish {
                client: c,
                volume_id,
                staging_path,
                target_path,
                readonly,
                capability,
            } => {
                commands::node_publish(
                    client::connect(&c.endpoint).await?,
                    volume_id,
                    staging_path,
                    target_path,
                    readonly,
                    &capability,
                )
                .await
            }
            NodeCommand::Unpublish {
                client: c,
                volume_id,
                target_path,
            } => {
                commands::node_unpublish(
                    client::connect(&c.endpoint).await?,
                    volume_id,
                    target_path,
                )
                .await
            }
            NodeCommand::Expand {
                client: c,
                volume_id,
                path,
            } => {
                commands::node_expand(
                    client::connect(&c.endpoint).await?,
                    volume_id,
                    path,
                    c.output,
                )
                .await
            }
            NodeCommand::Stats {
                client: c,
                volume_id,
                path,
            } => {
                commands::node_stats(
                    client::connect(&c.endpoint).await?,
                    volume_id,
                    path,
                    c.output,
                )
                .await
            }
        },
        Command::Bench(b) => match b {
            BenchCommand::Lifecycle {
                client: c,
                volumes,
                concurrency,
                size,
                data,
                workdir,
                capability,
            } => {
                let args = bench::LifecycleArgs {
                    volumes,
                    concurrency,
                    size,
                    data,
                    workdir,
                    capability,
                };
                bench::lifecycle(client::connect(&c.endpoint).await?, args, c.output).await
            }
            BenchCommand::Churn {
                client: c,
                seconds,
                concurrency,
                size,
                data,
                workdir,
                capability,
            } => {
                let args = bench::LifecycleArgs {
                    volumes: 0,
                    concurrency,
                    size,
                    data,
                    workdir,
                    capability,
                };
                bench::churn(client::connect(&c.endpoint).await?, args, seconds, c.output).await
            }
            BenchCommand::Snapshot {
                client: c,
                sizes,
                workdir,
            } => {
                bench::snapshot(
                    client::connect(&c.endpoint).await?,
                    sizes,
                    workdir,
                    c.output,
                )
                .await
            }
            BenchCommand::Scale {
                client: c,
                volumes,
                concurrency,
                page_size,
                keep,
                pid,
            } => {
                bench::scale(
                    client::connect(&c.endpoint).await?,
                    volumes,
                    concurrency,
                    page_size,
                    keep,
                    pid,
                    c.output,
                )
                .await
            }
        },
    }
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
