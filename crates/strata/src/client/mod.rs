//! `strata` as a CSI client: talks to any CSI endpoint and prints tables or JSON.

pub mod commands;
pub mod output;

use csi_proto::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

use crate::endpoint::Endpoint;

/// Clients of the three services over one connection.
#[derive(Clone)]
pub struct Csi {
    /// The connection itself, for raw calls.
    pub channel: Channel,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
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
                .map_err(|e| format!("connect to {}: {e}", endpoint_name(endpoint)))?
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
        node: NodeClient::new(channel),
    })
}

fn endpoint_name(e: &Endpoint) -> String {
    match e {
        Endpoint::Unix(p) => format!("unix://{}", p.display()),
        Endpoint::Tcp(a) => format!("tcp://{a}"),
    }
}

/// A CSI status as a one-line error for the terminal.
pub fn status_error(what: &str, s: tonic::Status) -> String {
    format!("{what}: {:?}: {}", s.code(), s.message())
}
