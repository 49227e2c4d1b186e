//! `strata bench`: load generator against any CSI endpoint. Reports throughput and latency
//! percentiles per RPC; nothing here asserts on time. One module per scenario; what they
//! share (timing, the report, bringing a volume up and down) is here.

mod aio;
mod cbt;
mod churn;
mod cli;
mod compare;
mod cpu;
mod cross_node;
mod fsgroup;
mod group;
mod io;
mod lifecycle;
mod moves;
mod report;
mod run;
mod scale;
mod snapshot;
mod steps;

pub use cli::BenchCommand;
pub(crate) use report::*;
pub(crate) use run::*;
pub use steps::LifecycleArgs;
pub(crate) use steps::*;
