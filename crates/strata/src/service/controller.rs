//! CSI Controller service.

use csi::controller_server::Controller;
use csi::controller_service_capability::{Rpc, rpc::Type as RpcType};
use csi_proto as csi;
use strata_core::Error;
use strata_core::controller::CreateVolume;
use strata_core::encryption::Secrets;
use strata_core::model::CapacityRange;
use strata_core::rekey;
use strata_core::validate::ordered;
use tonic::{Request, Response, Status};

use super::convert::{self, capabilities};
use super::{Services, run};

pub struct ControllerService(pub Services);

/// Capabilities this controller offers.
pub const CAPABILITIES: &[RpcType] = &[
    RpcType::CreateDeleteVolume,
    RpcType::ListVolumes,
    RpcType::GetCapacity,
    RpcType::GetVolume,
    RpcType::VolumeCondition,
    RpcType::CreateDeleteSnapshot,
    RpcType::ListSnapshots,
    RpcType::GetSnapshot,
    RpcType::CloneVolume,
    // I/O limits, applied on the volume's node (forwarded there over the peer service).
    RpcType::ModifyVolume,
    // Not ExpandVolume: volumes grow through NodeExpandVolume on the node that holds them
    // (docs/architecture.md). ControllerExpandVolume still answers, for operators.
];

async fn unimplemented<T: Send + 'static>(method: &'static str) -> Result<Response<T>, Status> {
    run(method, "", move || {
        Err(Error::Unimplemented(format!(
            "{method} is not offered by this driver; see ControllerGetCapabilities"
        )))
    })
    .await
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let name = req.name.clone();
        run("CreateVolume", &name, move || {
            let range = req.capacity_range.unwrap_or_default();
            let create = CreateVolume {
                name: req.name,
                capacity: CapacityRange::from_signed(range.required_bytes, range.limit_bytes)?,
                capabilities: capabilities(&req.volume_capabilities)?,
                parameters: ordered(&req.parameters),
                requisite: req
                    .accessibility_requirements
                    .map(|a| a.requisite.iter().map(convert::topology).collect())
                    .unwrap_or_default(),
                content_source: req
                    .volume_content_source
                    .as_ref()
                    .map(convert::content_source)
                    .transpose()?,
                mutable_parameters: ordered(&req.mutable_parameters),
                secrets: Secrets::new(req.secrets),
            };
            let record = driver.controller.create_volume(create)?;
            Ok(csi::CreateVolumeResponse {
                volume: Some(convert::volume(driver.topology(), &record)),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("DeleteVolume", &id, move || {
            driver.controller.delete_volume(&req.volume_id)?;
            Ok(csi::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume").await
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume").await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("ValidateVolumeCapabilities", &id, move || {
            let caps = capabilities(&req.volume_capabilities)?;
            let params = ordered(&req.parameters);
            let mutable = ordered(&req.mutable_parameters);
            let refusal = driver.controller.validate_capabilities(
                &req.volume_id,
                &caps,
                &params,
                &mutable,
            )?;
            Ok(match refusal {
                None => csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                        volume_context: req.volume_context,
                        volume_capabilities: req.volume_capabilities,
                        parameters: req.parameters,
                        mutable_parameters: req.mutable_parameters,
                    }),
                    message: String::new(),
                },
                Some(message) => csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message,
                },
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        run("ListVolumes", "", move || {
            let (page, next) = driver
                .controller
                .list_volumes(req.max_entries, &req.starting_token)?;
            let topology = driver.topology();
            Ok(csi::ListVolumesResponse {
                entries: page
                    .iter()
                    .map(|status| csi::list_volumes_response::Entry {
                        volume: Some(convert::volume(topology.clone(), &status.record)),
                        status: Some(csi::list_volumes_response::VolumeStatus {
                            published_node_ids: vec![],
                            volume_condition: Some(convert::condition(status)),
                        }),
                    })
                    .collect(),
                next_token: next.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        run("GetCapacity", "", move || {
            let caps = capabilities(&req.volume_capabilities)?;
            let topology = req.accessible_topology.as_ref().map(convert::topology);
            let cap =
                driver
                    .controller
                    .capacity(&caps, &ordered(&req.parameters), topology.as_ref())?;
            Ok(csi::GetCapacityResponse {
                available_capacity: cap.available_bytes as i64,
                maximum_volume_size: Some(cap.maximum_volume_bytes as i64),
                minimum_volume_size: Some(cap.minimum_volume_bytes as i64),
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        run("ControllerGetCapabilities", "", || {
            Ok(csi::ControllerGetCapabilitiesResponse {
                capabilities: CAPABILITIES
                    .iter()
                    .map(|t| csi::ControllerServiceCapability {
                        r#type: Some(csi::controller_service_capability::Type::Rpc(Rpc {
                            r#type: *t as i32,
                        })),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let source = req.source_volume_id.clone();
        run("CreateSnapshot", &source, move || {
            let record = driver
                .snapshots
                .create_snapshot(&req.name, &req.source_volume_id)?;
            Ok(csi::CreateSnapshotResponse {
                snapshot: Some(convert::snapshot(&record)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.snapshot_id.clone();
        run("DeleteSnapshot", &id, move || {
            driver.snapshots.delete_snapshot(&req.snapshot_id)?;
            Ok(csi::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        run("ListSnapshots", "", move || {
            let (page, next) = driver.snapshots.list_snapshots(
                req.max_entries,
                &req.starting_token,
                &req.snapshot_id,
                &req.source_volume_id,
            )?;
            Ok(csi::ListSnapshotsResponse {
                entries: page
                    .iter()
                    .map(|s| csi::list_snapshots_response::Entry {
                        snapshot: Some(convert::snapshot(s)),
                    })
                    .collect(),
                next_token: next.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.snapshot_id.clone();
        run("GetSnapshot", &id, move || {
            let record = driver.snapshots.get(&req.snapshot_id)?;
            Ok(csi::GetSnapshotResponse {
                snapshot: Some(convert::snapshot(&record)),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("ControllerExpandVolume", &id, move || {
            let range = req
                .capacity_range
                .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
            if let Some(cap) = &req.volume_capability {
                driver
                    .capabilities
                    .check_capability(&convert::capability(cap)?)?;
            }
            let range = CapacityRange::from_signed(range.required_bytes, range.limit_bytes)?;
            let (capacity, node_expansion_required) =
                driver.controller.expand_volume(&req.volume_id, range)?;
            Ok(csi::ControllerExpandVolumeResponse {
                capacity_bytes: capacity as i64,
                node_expansion_required,
            })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("ControllerGetVolume", &id, move || {
            let status = driver.controller.get_volume(&req.volume_id)?;
            Ok(csi::ControllerGetVolumeResponse {
                volume: Some(convert::volume(driver.topology(), &status.record)),
                status: Some(csi::controller_get_volume_response::VolumeStatus {
                    published_node_ids: vec![],
                    volume_condition: Some(convert::condition(&status)),
                }),
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("ControllerModifyVolume", &id, move || {
            let parameters = ordered(&req.mutable_parameters);
            if rekey::requested(&parameters)? {
                driver
                    .rekey
                    .rekey(&req.volume_id, &Secrets::new(req.secrets))?;
            } else {
                driver
                    .controller
                    .modify_volume(&req.volume_id, &parameters)?;
            }
            Ok(csi::ControllerModifyVolumeResponse {})
        })
        .await
    }
}
