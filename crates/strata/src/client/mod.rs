//! `strata` as a CSI client: talks to any CSI endpoint and prints tables or JSON.

pub mod node;
pub mod output;
pub mod shared;
pub mod snapshot;
pub mod volume;

use csi_proto::{
    controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    identity_client::IdentityClient, node_client::NodeClient,
    snapshot_metadata_client::SnapshotMetadataClient,
};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

use csi_proto as csi;

use crate::endpoint::Endpoint;
use output::{Cell, Format, Rows};

/// Where a client command connects and how it prints: every client command takes these.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// CSI endpoint to talk to.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/strata/csi.sock"
    )]
    pub endpoint: Endpoint,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// `strata info`: a driver's identity, readiness and node.
pub async fn info(args: ClientArgs) -> Result<(), String> {
    let csi = connect(&args.endpoint).await?;
    show_info(csi, args.output).await
}

async fn show_info(mut csi: Csi, format: Format) -> Result<(), String> {
    let info = csi
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .map_err(|s| status_error("GetPluginInfo", s))?
        .into_inner();
    let probe = csi.identity.probe(csi::ProbeRequest {}).await;
    let node = csi
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .map(|r| r.into_inner());
    let mut rows = Rows::new(&["FIELD", "VALUE"]);
    rows.push(vec!["name".into(), info.name.into()]);
    rows.push(vec!["version".into(), info.vendor_version.into()]);
    match probe {
        Ok(p) => rows.push(vec![
            "ready".into(),
            Cell::Bool(p.into_inner().ready.unwrap_or(true)),
        ]),
        Err(s) => {
            rows.push(vec!["ready".into(), Cell::Bool(false)]);
            rows.push(vec!["not_ready_because".into(), s.message().into()]);
        }
    }
    if let Ok(n) = node {
        rows.push(vec!["node_id".into(), n.node_id.into()]);
        rows.push(vec![
            "max_volumes_per_node".into(),
            Cell::Number(n.max_volumes_per_node),
        ]);
    }
    rows.print(format);
    Ok(())
}

/// Clients of the CSI services over one connection.
#[derive(Clone)]
pub struct Csi {
    /// The connection itself, for raw calls.
    pub channel: Channel,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub groups: GroupControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub metadata: SnapshotMetadataClient<Channel>,
}

pub async fn connect(endpoint: &Endpoint) -> Result<Csi, String> {
    let channel = match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is a placeholder: the connector dials the socket.
            TonicEndpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
                .map_err(|e| format!("connect to {endpoint}: {e}"))?
        }
        Endpoint::Tcp(addr) => TonicEndpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?,
    };
    Ok(Csi {
        channel: channel.clone(),
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        groups: GroupControllerClient::new(channel.clone()),
        node: NodeClient::new(channel.clone()),
        metadata: SnapshotMetadataClient::new(channel),
    })
}

/// A CSI status as a one-line error for the terminal.
pub fn status_error(what: &str, s: tonic::Status) -> String {
    format!("{what}: {:?}: {}", s.code(), s.message())
}
