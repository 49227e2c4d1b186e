//! What a run reports: per-RPC throughput and latency percentiles, a scenario's figures,
//! as a table or JSON.

use serde::Serialize;

use crate::client::output::Format;

#[derive(Serialize)]
pub(crate) struct RpcSummary {
    pub(super) rpc: &'static str,
    pub(super) calls: usize,
    pub(super) p50_ms: f64,
    pub(super) p90_ms: f64,
    pub(super) p99_ms: f64,
}

#[derive(Serialize)]
pub(crate) struct Report {
    pub(super) scenario: &'static str,
    pub(super) volumes: usize,
    pub(super) concurrency: usize,
    pub(super) seconds: f64,
    pub(super) volumes_per_second: f64,
    pub(super) rpcs: Vec<RpcSummary>,
    /// The driver's resident memory at points of the run, when its pid was given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) rss_kib: Vec<(&'static str, u64)>,
}

impl Report {
    pub(crate) fn outcome(self) -> Outcome {
        use std::fmt::Write as _;
        let mut table = format!(
            "{}: {} volumes, concurrency {}, {:.2} s, {:.1} volumes/s\n",
            self.scenario, self.volumes, self.concurrency, self.seconds, self.volumes_per_second
        );
        let _ = writeln!(
            table,
            "{:<24} {:>7} {:>9} {:>9} {:>9}",
            "RPC", "CALLS", "P50 ms", "P90 ms", "P99 ms"
        );
        let mut figures = vec![("volumes/s".to_owned(), self.volumes_per_second)];
        for r in &self.rpcs {
            let _ = writeln!(
                table,
                "{:<24} {:>7} {:>9.3} {:>9.3} {:>9.3}",
                r.rpc, r.calls, r.p50_ms, r.p90_ms, r.p99_ms
            );
            figures.push((format!("{} p50 ms", r.rpc), r.p50_ms));
            figures.push((format!("{} p99 ms", r.rpc), r.p99_ms));
        }
        for (when, kib) in &self.rss_kib {
            let _ = writeln!(table, "driver RSS {when}: {:.1} MiB", *kib as f64 / 1024.0);
            figures.push((format!("driver RSS {when} MiB"), *kib as f64 / 1024.0));
        }
        Outcome::measured(&self, table, figures)
    }
}

/// What a scenario found: a report to print for one endpoint, and named figures that
/// `compare` sets side by side; or why it did not run against this driver.
pub(crate) enum Outcome {
    Measured {
        json: serde_json::Value,
        table: String,
        figures: Vec<(String, f64)>,
        /// Set when data read back was not what was written: the run failed.
        failure: Option<String>,
    },
    Skipped(String),
}

impl Outcome {
    pub(crate) fn measured(
        report: &impl Serialize,
        table: String,
        figures: Vec<(String, f64)>,
    ) -> Outcome {
        Outcome::Measured {
            json: serde_json::to_value(report).unwrap_or_default(),
            table,
            figures,
            failure: None,
        }
    }

    /// The run failed because `why` (the report is still printed).
    pub(crate) fn failed(mut self, why: Option<String>) -> Outcome {
        if let Outcome::Measured { failure, .. } = &mut self {
            *failure = why;
        }
        self
    }

    pub(crate) fn print(&self, format: Format) {
        match (self, format) {
            (Outcome::Measured { json, .. }, Format::Json) => {
                println!("{}", serde_json::to_string_pretty(json).unwrap_or_default())
            }
            (Outcome::Measured { table, .. }, Format::Table) => print!("{table}"),
            (Outcome::Skipped(why), Format::Json) => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "skipped": why }))
                    .unwrap_or_default()
            ),
            (Outcome::Skipped(why), Format::Table) => println!("skipped: {why}"),
        }
    }

    pub(super) fn result(&self) -> Result<(), String> {
        match self {
            Outcome::Measured {
                failure: Some(why), ..
            } => Err(why.clone()),
            _ => Ok(()),
        }
    }

    pub(super) fn figures(&self) -> &[(String, f64)] {
        match self {
            Outcome::Measured { figures, .. } => figures,
            Outcome::Skipped(_) => &[],
        }
    }
}
