//! A minimal CSI driver, served in the test's own process: volumes are directories, publish
//! is a bind mount, and it offers nothing else: no staging, no snapshots, no group
//! snapshots, no VOLUME_MOUNT_GROUP. What `strata bench` must work against, as it must
//! against any driver (the reference hostpath driver has no staging either).

use std::path::{Path, PathBuf};
use std::process::Command;

use csi::controller_service_capability::{Rpc, rpc::Type as RpcType};
use csi_proto as csi;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct MinimalCsi {
    root: PathBuf,
}

/// Serves a [`MinimalCsi`] keeping its volumes under `root`, on the unix socket `socket`.
pub fn serve(root: &Path, socket: &Path) {
    let driver = MinimalCsi {
        root: root.to_owned(),
    };
    std::fs::create_dir_all(root).unwrap();
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(csi::identity_server::IdentityServer::new(driver.clone()))
            .add_service(csi::controller_server::ControllerServer::new(
                driver.clone(),
            ))
            .add_service(csi::node_server::NodeServer::new(driver))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
}

impl MinimalCsi {
    fn volume(&self, id: &str) -> Result<PathBuf, Status> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(Status::invalid_argument("bad volume id"));
        }
        Ok(self.root.join(id))
    }
}

fn run(cmd: &mut Command) -> Result<(), Status> {
    let out = cmd.output().map_err(|e| Status::internal(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Status::internal(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

fn is_mount_point(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path))
}

/// The RPCs this driver does not offer, answered UNIMPLEMENTED (written out as
/// `async_trait` expands them, since a macro's output is not rewritten by it).
macro_rules! not_offered {
    ($($name:ident($req:ident) -> $resp:ident;)*) => {$(
        fn $name<'life0, 'async_trait>(
            &'life0 self,
            _: Request<csi::$req>,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Response<csi::$resp>, Status>>
                    + Send
                    + 'async_trait,
            >,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async { Err(Status::unimplemented(stringify!($name))) })
        }
    )*};
}

#[tonic::async_trait]
impl csi::identity_server::Identity for MinimalCsi {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: "minimal.csi.test".into(),
            vendor_version: "0".into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{Service, Type, service::Type as S};
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![csi::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: S::ControllerService as i32,
                })),
            }],
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for MinimalCsi {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_capabilities.iter().any(|c| {
            matches!(
                c.access_type,
                Some(csi::volume_capability::AccessType::Block(_))
            )
        }) {
            return Err(Status::invalid_argument("filesystem volumes only"));
        }
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument("no snapshots or clones"));
        }
        let id = format!("mini-{}", req.name);
        std::fs::create_dir_all(self.volume(&id)?).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(csi::Volume {
                volume_id: id,
                capacity_bytes: req.capacity_range.map_or(0, |r| r.required_bytes),
                ..Default::default()
            }),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let dir = self.volume(&request.into_inner().volume_id)?;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(Response::new(csi::DeleteVolumeResponse {})),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Response::new(csi::DeleteVolumeResponse {}))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn list_volumes(
        &self,
        _: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| Status::internal(e.to_string()))?
            .flatten()
            .map(|e| csi::list_volumes_response::Entry {
                volume: Some(csi::Volume {
                    volume_id: e.file_name().to_string_lossy().into_owned(),
                    ..Default::default()
                }),
                status: None,
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token: String::new(),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let rpc = |t: RpcType| csi::ControllerServiceCapability {
            r#type: Some(csi::controller_service_capability::Type::Rpc(Rpc {
                r#type: t as i32,
            })),
        };
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: vec![rpc(RpcType::CreateDeleteVolume), rpc(RpcType::ListVolumes)],
        }))
    }

    not_offered! {
        controller_publish_volume(ControllerPublishVolumeRequest) -> ControllerPublishVolumeResponse;
        controller_unpublish_volume(ControllerUnpublishVolumeRequest) -> ControllerUnpublishVolumeResponse;
        validate_volume_capabilities(ValidateVolumeCapabilitiesRequest) -> ValidateVolumeCapabilitiesResponse;
        get_capacity(GetCapacityRequest) -> GetCapacityResponse;
        create_snapshot(CreateSnapshotRequest) -> CreateSnapshotResponse;
        delete_snapshot(DeleteSnapshotRequest) -> DeleteSnapshotResponse;
        list_snapshots(ListSnapshotsRequest) -> ListSnapshotsResponse;
        get_snapshot(GetSnapshotRequest) -> GetSnapshotResponse;
        controller_expand_volume(ControllerExpandVolumeRequest) -> ControllerExpandVolumeResponse;
        controller_get_volume(ControllerGetVolumeRequest) -> ControllerGetVolumeResponse;
        controller_modify_volume(ControllerModifyVolumeRequest) -> ControllerModifyVolumeResponse;
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for MinimalCsi {
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if !req.staging_target_path.is_empty() {
            return Err(Status::invalid_argument("this driver does not stage"));
        }
        let source = self.volume(&req.volume_id)?;
        if !is_mount_point(&req.target_path) {
            std::fs::create_dir_all(&req.target_path)
                .map_err(|e| Status::internal(e.to_string()))?;
            run(Command::new("mount")
                .arg("--bind")
                .arg(&source)
                .arg(&req.target_path))?;
        }
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let target = request.into_inner().target_path;
        if is_mount_point(&target) {
            run(Command::new("umount").arg(&target))?;
        }
        let _ = std::fs::remove_dir(&target);
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: "mini".into(),
            ..Default::default()
        }))
    }

    not_offered! {
        node_stage_volume(NodeStageVolumeRequest) -> NodeStageVolumeResponse;
        node_unstage_volume(NodeUnstageVolumeRequest) -> NodeUnstageVolumeResponse;
        node_get_volume_stats(NodeGetVolumeStatsRequest) -> NodeGetVolumeStatsResponse;
        node_expand_volume(NodeExpandVolumeRequest) -> NodeExpandVolumeResponse;
    }
}
