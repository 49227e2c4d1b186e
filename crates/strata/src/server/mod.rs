//! `strata serve`: opens the pool, binds the endpoint and serves the three CSI services until
//! SIGTERM or SIGINT, letting in-flight requests finish.

mod listen;
mod options;
mod pool;

pub use options::{BackendKind, MAX_SOCKET_PATH_BYTES, ServeOptions};
pub use pool::{PoolLock, lock_pool, lock_pool_waiting, open_driver, release_pool};

use std::net::SocketAddr;
use std::sync::Arc;

use csi_proto::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer,
    identity_server::IdentityServer, node_server::NodeServer,
    snapshot_metadata_server::SnapshotMetadataServer,
};
use strata_core::Driver;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

use crate::decode_errors::DecodeErrorLayer;
use crate::endpoint::Endpoint;
use crate::http;
use crate::metrics::{Metrics, MetricsLayer};
use crate::peer::client::{Directory, GrpcPeers};
use crate::peer::service::PeerService;
use crate::peer::tls::PeerTls;
use crate::service::{
    ControllerService, GroupControllerService, IdentityService, NodeService, Services,
    SnapshotMetadataService,
};
use crate::transport::Normalized;
use strata_core::peer::Peers;

use listen::{bind_socket, serve_until_stopped};

/// Starts the metrics and health endpoints (one listener when they share an address).
async fn serve_http(
    opts: &ServeOptions,
    driver: &Arc<Driver>,
    metrics: &Arc<Metrics>,
) -> Result<(), String> {
    let mut addresses: Vec<(SocketAddr, bool, bool)> = vec![];
    if let Some(a) = opts.metrics_address {
        addresses.push((a, true, false));
    }
    if let Some(a) = opts.health_address {
        match addresses.iter_mut().find(|(addr, _, _)| *addr == a) {
            Some(entry) => entry.2 = true,
            None => addresses.push((a, false, true)),
        }
    }
    for (addr, serves_metrics, health) in addresses {
        let listener = http::bind(addr).await?;
        tracing::info!(%addr, metrics = serves_metrics, health, "serving HTTP");
        tokio::spawn(http::serve(
            listener,
            http::Endpoints {
                driver: driver.clone(),
                metrics: serves_metrics.then(|| metrics.clone()),
                health,
            },
        ));
    }
    Ok(())
}

/// The gRPC router: the three CSI services over `driver`, behind the metrics and
/// decode-error layers.
pub type CsiRouter = Router<Stack<DecodeErrorLayer, Stack<MetricsLayer, Identity>>>;

pub fn csi_router(driver: Arc<Driver>, metrics: Arc<Metrics>) -> CsiRouter {
    let services = Services {
        driver,
        version: env!("CARGO_PKG_VERSION"),
    };
    // Outermost: metrics record the status the caller finally sees.
    Server::builder()
        .layer(MetricsLayer(metrics))
        .layer(DecodeErrorLayer)
        .add_service(IdentityServer::new(IdentityService(services.clone())))
        .add_service(ControllerServer::new(ControllerService(services.clone())))
        .add_service(GroupControllerServer::new(GroupControllerService(
            services.clone(),
        )))
        .add_service(SnapshotMetadataServer::new(SnapshotMetadataService(
            services.clone(),
        )))
        .add_service(NodeServer::new(NodeService(services)))
}

/// The topology key of this node's volumes.
#[cfg(feature = "kubernetes")]
fn topology_key(opts: &ServeOptions) -> String {
    opts.topology_key
        .clone()
        .unwrap_or_else(|| strata_core::driver::Config::default_topology_key(&opts.driver_name))
}

/// A client of the API server (the pod's service account, or KUBECONFIG), for `flag`.
#[cfg(feature = "kubernetes")]
async fn kube_client(flag: &str) -> Result<kube::Client, String> {
    kube::Client::try_default()
        .await
        .map_err(|e| format!("{flag}: cannot reach the Kubernetes API server: {e}"))
}

/// The other nodes as Kubernetes lists them.
#[cfg(feature = "kubernetes")]
async fn cluster_directory(opts: &ServeOptions, service: &str) -> Result<Directory, String> {
    let topology_key = topology_key(opts);
    let cluster = crate::kube_cluster::KubeCluster::connect(
        &opts.peer.peer_namespace,
        service,
        &opts.driver_name,
        &topology_key,
    )
    .await?;
    // Runs as long as the server: reads of addresses then list nothing.
    drop(cluster.watch_endpoints());
    tracing::info!(service, namespace = %opts.peer.peer_namespace, "peers from Kubernetes");
    Ok(Directory::Cluster(Arc::new(cluster)))
}

#[cfg(not(feature = "kubernetes"))]
async fn cluster_directory(_: &ServeOptions, _: &str) -> Result<Directory, String> {
    Err("--peer-service needs the cargo feature `kubernetes`".into())
}

/// How often the node-loss janitor looks for deleted Nodes (and renews its Lease).
#[cfg(feature = "kubernetes")]
const NODE_LOSS_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// With --node-loss: this node's finalizer, then a round of the janitor every
/// [`NODE_LOSS_PERIOD`] (only the Lease holder acts).
#[cfg(feature = "kubernetes")]
async fn start_node_loss(
    opts: &ServeOptions,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    use strata_core::node_loss::NodeLoss;
    if !opts.node_loss {
        return Ok(None);
    }
    let topology_key = topology_key(opts);
    let client = kube_client("--node-loss").await?;
    let cluster = Arc::new(crate::kube_node_loss::KubeNodeLoss::new(
        client,
        &opts.peer.peer_namespace,
        &opts.driver_name,
        &topology_key,
    ));
    let janitor = Arc::new(NodeLoss::new(cluster, &opts.node_id));
    Ok(Some(tokio::spawn(async move {
        let mut protected = false;
        loop {
            let j = janitor.clone();
            let done = tokio::task::spawn_blocking(move || {
                let protected = protected || {
                    match j.protect() {
                        Ok(()) => {
                            tracing::info!("this node's Node carries Strata's finalizer");
                            true
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not put Strata's finalizer on this node's Node; retrying");
                            false
                        }
                    }
                };
                match j.round() {
                    Ok(round) if !round.nodes_released.is_empty() => {
                        tracing::warn!(?round, "released deleted Nodes");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "the node-loss round stopped; the next one goes on"),
                }
                protected
            })
            .await;
            protected = done.unwrap_or(protected);
            tokio::time::sleep(NODE_LOSS_PERIOD).await;
        }
    })))
}

#[cfg(not(feature = "kubernetes"))]
async fn start_node_loss(
    opts: &ServeOptions,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    match opts.node_loss {
        true => Err("--node-loss needs the cargo feature `kubernetes`".into()),
        false => Ok(None),
    }
}

/// How often moves are advanced on this node (both halves).
#[cfg(feature = "kubernetes")]
const MOVES_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// With --moves: rounds of this node's evacuation and departures, and of its arrivals,
/// every [`MOVES_PERIOD`]. A round runs until it is done (a pre-copy may take minutes);
/// the next of its loop waits for it.
#[cfg(feature = "kubernetes")]
async fn start_moves(
    opts: &ServeOptions,
    driver: &Arc<Driver>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    if !opts.moves {
        return Ok(vec![]);
    }
    let topology_key = topology_key(opts);
    let client = kube_client("--moves").await?;
    let cluster = Arc::new(crate::kube_moves::KubeMoves::new(
        client,
        &opts.driver_name,
        &topology_key,
    ));
    if driver.arrivals.is_none() {
        tracing::warn!(
            "--moves without the peer service: volumes move away from this node, none move to it"
        );
    }
    // This node's volumes leaving it, and volumes arriving: two loops, so that a long
    // pre-copy here never holds up a retirement or an evacuation.
    let leaving = repeat(driver, &cluster, |d, c| {
        match d.evacuation.round(c) {
            Ok(r) if !r.asked.is_empty() || !r.no_room.is_empty() => {
                tracing::info!(?r, "evacuating this node")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the evacuation round stopped; the next one goes on")
            }
        }
        match d.departures.reconcile(c) {
            Ok(r) if r != Default::default() => tracing::info!(?r, "departures"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the departures round stopped; the next one goes on")
            }
        }
    });
    let arriving = repeat(driver, &cluster, |d, c| {
        if let Some(arrivals) = &d.arrivals {
            match arrivals.round(c) {
                Ok(r) if r != Default::default() => tracing::info!(?r, "arrivals"),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the arrivals round stopped; the next one goes on")
                }
            }
        }
    });
    Ok(vec![leaving, arriving])
}

/// Runs `round` off the runtime every [`MOVES_PERIOD`] after the previous one ends.
#[cfg(feature = "kubernetes")]
fn repeat(
    driver: &Arc<Driver>,
    cluster: &Arc<crate::kube_moves::KubeMoves>,
    round: fn(&Driver, &dyn strata_core::moves::MoveCluster),
) -> tokio::task::JoinHandle<()> {
    let (driver, cluster) = (driver.clone(), cluster.clone());
    tokio::spawn(async move {
        loop {
            let (d, c) = (driver.clone(), cluster.clone());
            let _ = tokio::task::spawn_blocking(move || round(&d, c.as_ref())).await;
            tokio::time::sleep(MOVES_PERIOD).await;
        }
    })
}

#[cfg(not(feature = "kubernetes"))]
async fn start_moves(
    opts: &ServeOptions,
    _: &Arc<Driver>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    match opts.moves {
        true => Err("--moves needs the cargo feature `kubernetes`".into()),
        false => Ok(vec![]),
    }
}

/// Most peer requests served at once on one connection.
const PEER_STREAMS_PER_CONNECTION: u32 = 16;

/// Starts the peer service on `listener`: mutual TLS on every connection, so no call is
/// ever served in clear text or to a caller without a certificate from the peer CA.
fn serve_peers(
    listener: std::net::TcpListener,
    tls: &PeerTls,
    driver: Arc<Driver>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let addr = listener
        .local_addr()
        .map_err(|e| format!("--peer-listen: {e}"))?;
    let listener = TcpListener::from_std(listener).map_err(|e| format!("--peer-listen: {e}"))?;
    // TLS is the listener's: each connection is handshaken there, then handed to tonic or
    // served as a bulk read.
    let (incoming, accepting) =
        crate::peer::listener::accept(listener, tls, driver.exports.clone())?;
    let router = Server::builder()
        .max_concurrent_streams(PEER_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(PeerService::server(driver.exports.clone()));
    tracing::info!(%addr, "serving the peer service (mutual TLS)");
    // Reads whose reader died are closed once idle, whether or not anyone calls again.
    let exports = driver.exports.clone();
    let sweep = (exports.limits().idle / 4).clamp(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(30),
    );
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(sweep).await;
            let exports = exports.clone();
            let _ = tokio::task::spawn_blocking(move || exports.expire()).await;
        }
    });
    Ok(tokio::spawn(async move {
        let served = router.serve_with_incoming(incoming).await;
        accepting.abort();
        if let Err(e) = served {
            tracing::error!(error = %e, "the peer service stopped");
        }
    }))
}

pub async fn serve(opts: ServeOptions) -> Result<(), String> {
    opts.validate()?;
    // A TCP address that cannot be bound fails now, before the pool is touched.
    let tcp = match &opts.endpoint {
        Endpoint::Tcp(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| format!("--endpoint: cannot listen on tcp://{addr}: {e}"))?,
        ),
        Endpoint::Unix(_) => None,
    };
    // The peer service's certificates and listener, checked before the pool is touched.
    let peer_tls = match opts.peer.peer_tls_dir.as_deref() {
        Some(dir) if opts.peer.peer_tls_optional && !PeerTls::present(dir) => {
            tracing::warn!(dir = %dir.display(),
                "no peer certificates: the peer service is off (no restores or clones across nodes); make the Secret with `strata peer-certs` and restart");
            None
        }
        Some(dir) => Some(PeerTls::load(dir)?),
        None => None,
    };
    let peer_listener = match opts.peer.peer_listen.filter(|_| peer_tls.is_some()) {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| format!("--peer-listen: cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    let directory = match (&peer_tls, &opts.peer.peer_service) {
        (None, _) => None,
        (Some(_), Some(service)) => Some(cluster_directory(&opts, service).await?),
        (Some(_), None) if !opts.peer.peers.is_empty() => {
            Some(Directory::Static(opts.peer.addresses()?))
        }
        (Some(_), None) => None,
    };
    let peers: Option<Arc<dyn Peers>> = match (&peer_tls, directory) {
        (Some(tls), Some(directory)) => Some(Arc::new(GrpcPeers::new(
            &opts.node_id,
            directory,
            tls.clone(),
            opts.peer.timeout(),
            tokio::runtime::Handle::current(),
        ))),
        _ => None,
    };
    let (driver, startup, _pool_lock) = open_driver(&opts, peers)?;
    let driver = Arc::new(driver);
    let metrics = Metrics::new(&opts.driver_name);
    metrics.record_startup(&startup);
    serve_http(&opts, &driver, &metrics).await?;
    let peer_server = match (peer_listener, peer_tls) {
        (Some(listener), Some(tls)) => Some(serve_peers(listener, &tls, driver.clone())?),
        _ => None,
    };
    let node_loss = start_node_loss(&opts).await?;
    let moves = start_moves(&opts, &driver).await?;
    let router = csi_router(driver.clone(), metrics);
    tracing::info!(endpoint = ?opts.endpoint, node_id = %opts.node_id, driver = %opts.driver_name,
        backend = driver.backend_kind(), "serving CSI");
    let result = match &opts.endpoint {
        Endpoint::Unix(path) => {
            let (listener, socket) = bind_socket(path)?;
            let listener = UnixListener::from_std(listener)
                .map_err(|e| format!("listen on {}: {e}", path.display()))?;
            // Clients put anything in `:authority` on a unix socket; see `transport`.
            let incoming = UnixListenerStream::new(listener).map(|c| c.map(Normalized::new));
            let result = serve_until_stopped(router, incoming).await;
            drop(socket);
            result
        }
        Endpoint::Tcp(addr) => {
            let listener = tcp
                .map(TcpListener::from_std)
                .transpose()
                .map_err(|e| format!("listen on {addr}: {e}"))?
                .ok_or_else(|| format!("no listener for {addr}"))?;
            serve_until_stopped(router, TcpListenerStream::new(listener)).await
        }
    };
    for task in [peer_server, node_loss].into_iter().flatten().chain(moves) {
        task.abort();
    }
    // Let queued removals of deleted volumes finish before exiting.
    driver.shut_down();
    tracing::info!("stopped");
    result
}
