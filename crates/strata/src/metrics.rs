//! Prometheus metrics: a tower layer times every gRPC call, and the pool, volume and
//! reconciliation gauges are read from the driver at scrape time. The registry belongs to the
//! server (no process-global state).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use strata_core::Driver;
use strata_core::driver::Startup;
use tonic::codegen::http;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    driver_name: String,
    method_name: String,
    grpc_status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    kind: String,
    finding: String,
}

type HistogramFamily = Family<OperationLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    driver_name: String,
    operations_seconds: HistogramFamily,
    operations_total: Family<OperationLabels, Counter>,
    pool_capacity: Gauge,
    pool_available: Gauge,
    pool_used: Gauge,
    volumes: Gauge,
    snapshots: Gauge,
    groups: Gauge,
    freeze: FreezeGauges,
    peer: PeerGauges,
    moves: MoveGauges,
    reconciliation: Family<FindingLabels, Gauge>,
}

/// Cross-node copies (this node pulling) and reads (other nodes pulling from this one),
/// read from the driver at scrape time.
struct PeerGauges {
    bytes_pulled: Gauge,
    copies_done: Gauge,
    copies_failed: Gauge,
    copies_in_flight: Gauge,
    copy_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    reads_open: Gauge,
}

/// Moves of volumes between nodes, read from the driver at scrape time.
struct MoveGauges {
    arriving: Gauge,
    departing: Gauge,
    moved: Gauge,
    failed: Gauge,
}

/// The freeze windows of group snapshots, read from the driver at scrape time.
struct FreezeGauges {
    groups: Gauge,
    last_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    max_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    over_limit: Gauge,
}

/// Buckets from 0.1 ms to about 13 s, doubling: most Strata calls take well under 10 ms.
fn operation_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// gRPC status names as the Go libraries (and so the CSI sidecars) spell them.
pub fn status_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("Unknown")
}

impl Metrics {
    pub fn new(driver_name: &str) -> Arc<Self> {
        let mut registry = Registry::default();
        let operations_seconds = HistogramFamily::new_with_constructor(operation_histogram);
        registry.register(
            "csi_operations_seconds",
            "Duration of CSI operations by method and gRPC status",
            operations_seconds.clone(),
        );
        let operations_total = Family::<OperationLabels, Counter>::default();
        registry.register(
            "csi_operations",
            "CSI operations by method and gRPC status",
            operations_total.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let pool_capacity = gauge(
            &mut registry,
            "strata_pool_capacity_bytes",
            "Size of the pool's filesystem",
        );
        let pool_available = gauge(
            &mut registry,
            "strata_pool_available_bytes",
            "Free space of the pool's filesystem",
        );
        let pool_used = gauge(
            &mut registry,
            "strata_pool_used_bytes",
            "Used space of the pool's filesystem",
        );
        let volumes = gauge(&mut registry, "strata_volumes", "Volumes in the pool");
        let snapshots = gauge(&mut registry, "strata_snapshots", "Snapshots in the pool");
        let groups = gauge(
            &mut registry,
            "strata_group_snapshots",
            "Group snapshots in the pool",
        );
        let seconds = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            registry.register(name, help, g.clone());
            g
        };
        let freeze = FreezeGauges {
            groups: gauge(
                &mut registry,
                "strata_group_freezes",
                "Group snapshots since startup that froze their volumes' filesystems",
            ),
            last_seconds: seconds(
                &mut registry,
                "strata_group_freeze_last_seconds",
                "How long the last group snapshot kept its filesystems frozen",
            ),
            max_seconds: seconds(
                &mut registry,
                "strata_group_freeze_max_seconds",
                "The longest freeze window of a group snapshot since startup",
            ),
            over_limit: gauge(
                &mut registry,
                "strata_group_freezes_over_limit",
                "Group snapshots since startup dropped because their copies outlasted --freeze-limit-ms",
            ),
        };
        let moves = MoveGauges {
            arriving: gauge(
                &mut registry,
                "strata_moves_arriving",
                "Volumes moving to this node now (pre-copied or being copied, not committed)",
            ),
            departing: gauge(
                &mut registry,
                "strata_moves_departing",
                "Volumes of this node moving to another now",
            ),
            moved: gauge(
                &mut registry,
                "strata_moves",
                "Volumes moved to this node since startup",
            ),
            failed: gauge(
                &mut registry,
                "strata_moves_failed",
                "Rounds of a move to this node that failed since startup (each is retried, and reported on its claim)",
            ),
        };
        let peer = PeerGauges {
            bytes_pulled: gauge(
                &mut registry,
                "strata_peer_pulled_bytes",
                "Bytes copied from other nodes since startup (restores and clones of their sources)",
            ),
            copies_done: gauge(
                &mut registry,
                "strata_peer_copies",
                "Copies from other nodes completed since startup",
            ),
            copies_failed: gauge(
                &mut registry,
                "strata_peer_copies_failed",
                "Copies from other nodes that failed since startup (the caller retries them)",
            ),
            copies_in_flight: gauge(
                &mut registry,
                "strata_peer_copies_in_flight",
                "Copies from other nodes running now",
            ),
            copy_seconds: seconds(
                &mut registry,
                "strata_peer_copy_seconds",
                "Total duration of the completed copies from other nodes",
            ),
            reads_open: gauge(
                &mut registry,
                "strata_peer_reads_open",
                "Reads other nodes hold open on this node now",
            ),
        };
        let reconciliation = Family::<FindingLabels, Gauge>::default();
        registry.register(
            "strata_reconciliation_findings",
            "What the last startup reconciliation found, by object kind and finding",
            reconciliation.clone(),
        );
        Arc::new(Metrics {
            registry,
            driver_name: driver_name.to_owned(),
            operations_seconds,
            operations_total,
            pool_capacity,
            pool_available,
            pool_used,
            volumes,
            snapshots,
            groups,
            freeze,
            peer,
            moves,
            reconciliation,
        })
    }

    pub fn observe(&self, method: &str, code: i32, seconds: f64) {
        let labels = OperationLabels {
            driver_name: self.driver_name.clone(),
            method_name: method.to_owned(),
            grpc_status_code: status_name(code).to_owned(),
        };
        self.operations_seconds
            .get_or_create(&labels)
            .observe(seconds);
        self.operations_total.get_or_create(&labels).inc();
    }

    /// Records the startup reconciliation's findings.
    pub fn record_startup(&self, startup: &Startup) {
        self.reconciliation
            .get_or_create(&FindingLabels {
                kind: "loop_device".into(),
                finding: "detached_orphan".into(),
            })
            .set(startup.detached_orphan_loops.len() as i64);
        for (kind, r) in [
            ("volume", &startup.volumes),
            ("snapshot", &startup.snapshots),
            ("group_snapshot", &startup.groups),
        ] {
            for (finding, n) in [
                ("rolled_back_create", r.rolled_back_creates.len()),
                ("completed_delete", r.completed_deletes.len()),
                ("repaired", r.repaired.len()),
                ("quarantined", r.quarantined.len()),
            ] {
                self.reconciliation
                    .get_or_create(&FindingLabels {
                        kind: kind.into(),
                        finding: finding.into(),
                    })
                    .set(n as i64);
            }
        }
        self.reconciliation
            .get_or_create(&FindingLabels {
                kind: "snapshot".into(),
                finding: "released_group_member".into(),
            })
            .set(startup.released_group_members.len() as i64);
    }

    /// The Prometheus text exposition, with gauges read from the driver now.
    pub fn render(&self, driver: &Driver) -> String {
        if let Ok(u) = driver.pool_usage() {
            self.pool_capacity.set(u.total_bytes as i64);
            self.pool_available.set(u.available_bytes as i64);
            self.pool_used.set(u.used_bytes as i64);
        }
        self.volumes.set(driver.volume_count() as i64);
        self.snapshots.set(driver.snapshots.count() as i64);
        self.groups.set(driver.groups.count() as i64);
        let f = driver.freeze_figures();
        self.freeze.groups.set(f.groups as i64);
        self.freeze.last_seconds.set(f.last_micros as f64 / 1e6);
        self.freeze.max_seconds.set(f.max_micros as f64 / 1e6);
        self.freeze.over_limit.set(f.over_limit as i64);
        if let Some(remote) = &driver.remote {
            use std::sync::atomic::Ordering::Relaxed;
            let c = remote.figures();
            self.peer
                .bytes_pulled
                .set(c.bytes_pulled.load(Relaxed) as i64);
            self.peer
                .copies_done
                .set(c.copies_done.load(Relaxed) as i64);
            self.peer
                .copies_failed
                .set(c.copies_failed.load(Relaxed) as i64);
            self.peer
                .copies_in_flight
                .set(c.copies_in_flight.load(Relaxed) as i64);
            self.peer
                .copy_seconds
                .set(c.copy_millis.load(Relaxed) as f64 / 1e3);
        }
        self.peer.reads_open.set(driver.exports.open_reads() as i64);
        self.moves
            .departing
            .set(driver.departures.departing().len() as i64);
        if let Some(arrivals) = &driver.arrivals {
            use std::sync::atomic::Ordering::Relaxed;
            self.moves.arriving.set(arrivals.arriving().len() as i64);
            let f = arrivals.figures();
            self.moves.moved.set(f.moved.load(Relaxed) as i64);
            self.moves.failed.set(f.failed.load(Relaxed) as i64);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        out
    }
}

/// Tower layer that times each gRPC call and counts it by method and status.
#[derive(Clone)]
pub struct MetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            // Unary errors come as trailers-only responses, with grpc-status in the headers;
            // a successful unary call carries it in the trailers, so no header means OK.
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                Err(_) => 2,
            };
            metrics.observe(&method, code, start.elapsed().as_secs_f64());
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_match_the_go_spelling() {
        assert_eq!(status_name(0), "OK");
        assert_eq!(status_name(3), "InvalidArgument");
        assert_eq!(status_name(16), "Unauthenticated");
        assert_eq!(status_name(99), "Unknown");
    }
}
