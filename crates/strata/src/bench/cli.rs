//! The `strata bench` command line: one subcommand per scenario, and running it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::client::Csi;
use crate::client::output::Format;
use crate::client::shared::CapabilityArgs;
use crate::client::{ClientArgs, connect};
use crate::endpoint::Endpoint;
use crate::units::parse_size;

use super::report::Outcome;
use super::run::Run;
use super::steps::LifecycleArgs;
use super::{
    cbt, churn, compare, cross_node, fsgroup, group, io, lifecycle, moves, scale, snapshot,
};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
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
    /// Snapshot and restore volumes holding each data size, written and read back through
    /// the published volumes; verifies the restored data.
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        /// Data sizes, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64Mi,512Mi,2Gi")]
        sizes: Vec<u64>,
        /// Directory for staging and target paths.
        #[arg(long, default_value = "/tmp/strata-bench")]
        workdir: PathBuf,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// Group snapshots of volumes holding data while a writer runs: time per group, the
    /// longest write stall (the freeze window a workload sees), members restored and checked.
    Group {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: group::GroupArgs,
    },
    /// A pod's fsGroup on a volume holding many files: stage and publish with the group the
    /// first and the second time, against the kubelet's recursive walk.
    Fsgroup {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: fsgroup::FsGroupArgs,
    },
    /// The data path: fio-style jobs (4 KiB random read and write at queue depth 32, 1 MiB
    /// sequential read and write at depth 8, direct I/O) on a file in a published volume
    /// and, with --native-dir, on a file in a directory of the pool's own filesystem.
    Io {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: io::IoArgs,
    },
    /// Changed block tracking: the time to stream the allocated ranges of a sparse block
    /// volume's snapshot and the delta to a second one after scattered rewrites (every
    /// rewrite checked to be in it); the driver's peak memory while it streams a very large
    /// sparse volume's answers (--pid).
    Cbt {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: cbt::CbtArgs,
    },
    /// The data path of moving a volume, from the target's side over the peer service
    /// (with the peer certificates): a pre-copy while the volume is in use, a part of it
    /// rewritten, then the final copy of only what changed, timed and checked. `--endpoint`
    /// is the source node's CSI endpoint; nothing is kept.
    Move {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: moves::MoveArgs,
    },
    /// The same scenario against two endpoints, interleaved round by round (so noise on the
    /// machine hits both alike): every figure side by side, with the ratio B/A. The
    /// scenario's own options follow `--`.
    Compare {
        /// lifecycle, churn, snapshot, group, fsgroup, io, cbt or scale.
        scenario: String,
        /// A, then B.
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<Endpoint>,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// The scenario's options (after `--`), e.g. `-- --volumes 50`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A snapshot on one node restored on another over the peer service: throughput next
    /// to plain TCP over the same link (--baseline), memory growth of both servers, data
    /// checked.
    CrossNode {
        /// The node holding the source (its CSI endpoint).
        #[arg(long)]
        from: Endpoint,
        /// The node restoring it.
        #[arg(long)]
        to: Endpoint,
        #[command(flatten)]
        args: cross_node::CrossNodeArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// The other end of `cross-node --baseline`: counts the bytes each connection sends.
    TcpSink {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Connections served before exiting.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Serve TLS with these peer certificates (the other end of `--tls-baseline`).
        #[arg(long)]
        tls_dir: Option<std::path::PathBuf>,
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

impl BenchCommand {
    fn client(&self) -> Option<&ClientArgs> {
        match self {
            BenchCommand::Lifecycle { client, .. }
            | BenchCommand::Churn { client, .. }
            | BenchCommand::Snapshot { client, .. }
            | BenchCommand::Group { client, .. }
            | BenchCommand::Fsgroup { client, .. }
            | BenchCommand::Io { client, .. }
            | BenchCommand::Cbt { client, .. }
            | BenchCommand::Move { client, .. }
            | BenchCommand::Scale { client, .. } => Some(client),
            BenchCommand::Compare { .. }
            | BenchCommand::CrossNode { .. }
            | BenchCommand::TcpSink { .. } => None,
        }
    }

    pub async fn run(self) -> Result<(), String> {
        let Some(ClientArgs { endpoint, output }) = self.client().cloned() else {
            return match self {
                BenchCommand::Compare {
                    scenario,
                    endpoints,
                    rounds,
                    output,
                    args,
                } => compare::compare(&scenario, &endpoints, rounds, &args, output).await,
                BenchCommand::CrossNode {
                    from,
                    to,
                    args,
                    output,
                } => {
                    let outcome =
                        cross_node::cross_node(connect(&from).await?, connect(&to).await?, args)
                            .await?;
                    outcome.print(output);
                    outcome.result()
                }
                BenchCommand::TcpSink {
                    listen,
                    connections,
                    tls_dir,
                } => {
                    let tls = match tls_dir {
                        Some(dir) => {
                            Some(crate::peer::tls::PeerTls::load(&dir)?.rustls_server(&[])?)
                        }
                        None => None,
                    };
                    tokio::task::spawn_blocking(move || {
                        cross_node::tcp_sink(listen, connections, tls)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                }
                _ => Ok(()),
            };
        };
        let outcome = self.measure(connect(&endpoint).await?, output).await?;
        outcome.print(output);
        outcome.result()
    }

    /// Runs the scenario against `csi`; `format` only says whether progress is shown. A run
    /// that fails part-way undoes what it made before it answers.
    pub(crate) async fn measure(self, csi: Csi, format: Format) -> Result<Outcome, String> {
        let run = Arc::new(Run::default());
        let mut undo = csi.clone();
        let result = self.scenario(csi, run.clone(), format).await;
        let Err(e) = result else {
            return result;
        };
        let left = run.undo(&mut undo).await;
        Err(match left.len() {
            0 => format!("{e} (what the run had made is undone)"),
            n => format!(
                "{e}; {n} of what the run made could not be undone, first: {}",
                left[0]
            ),
        })
    }

    async fn scenario(self, csi: Csi, run: Arc<Run>, format: Format) -> Result<Outcome, String> {
        match self {
            BenchCommand::Lifecycle {
                volumes,
                concurrency,
                size,
                data,
                workdir,
                capability,
                ..
            } => {
                let args = LifecycleArgs {
                    volumes,
                    concurrency,
                    size,
                    data,
                    workdir,
                    capability,
                };
                lifecycle::lifecycle(csi, run, args, format).await
            }
            BenchCommand::Churn {
                seconds,
                concurrency,
                size,
                data,
                workdir,
                capability,
                ..
            } => {
                let args = LifecycleArgs {
                    volumes: 0,
                    concurrency,
                    size,
                    data,
                    workdir,
                    capability,
                };
                churn::churn(csi, run, args, seconds, format).await
            }
            BenchCommand::Snapshot {
                sizes,
                workdir,
                capability,
                ..
            } => snapshot::snapshot(csi, &run, sizes, workdir, capability).await,
            BenchCommand::Group { args, .. } => group::group(csi, &run, args).await,
            BenchCommand::Fsgroup { args, .. } => fsgroup::fsgroup(csi, &run, args).await,
            BenchCommand::Io { args, .. } => io::io(csi, &run, args).await,
            BenchCommand::Cbt { args, .. } => cbt::cbt(csi, &run, args).await,
            BenchCommand::Move { args, .. } => moves::moves(csi, &run, args).await,
            BenchCommand::Scale {
                volumes,
                concurrency,
                page_size,
                keep,
                pid,
                ..
            } => scale::scale(csi, run, volumes, concurrency, page_size, keep, pid).await,
            BenchCommand::Compare { .. }
            | BenchCommand::CrossNode { .. }
            | BenchCommand::TcpSink { .. } => {
                Err("this command runs against two endpoints; it is not a scenario of one".into())
            }
        }
    }
}
