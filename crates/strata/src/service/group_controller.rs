//! CSI GroupController service: group snapshots.

use csi::group_controller_server::GroupController;
use csi::group_controller_service_capability::{Rpc, rpc::Type as RpcType};
use csi_proto as csi;
use strata_core::Error;
use strata_core::validate::ordered;
use tonic::{Request, Response, Status};

use super::convert;
use super::{Services, run};

pub struct GroupControllerService(pub Services);

impl GroupControllerService {
    /// The driver, when its backend offers group snapshots.
    fn driver(&self, method: &str) -> strata_core::Result<std::sync::Arc<strata_core::Driver>> {
        let driver = self.0.driver.clone();
        if driver.groups.supports_group_snapshots() {
            Ok(driver)
        } else {
            Err(Error::Unimplemented(format!(
                "{method}: the {} backend offers no group snapshots (it copies files one by one, so no copy is a single instant); see GroupControllerGetCapabilities",
                driver.backend_kind()
            )))
        }
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        let supported = self.0.driver.groups.supports_group_snapshots();
        run("GroupControllerGetCapabilities", "", move || {
            Ok(csi::GroupControllerGetCapabilitiesResponse {
                capabilities: supported
                    .then_some(csi::GroupControllerServiceCapability {
                        r#type: Some(csi::group_controller_service_capability::Type::Rpc(Rpc {
                            r#type: RpcType::CreateDeleteGetVolumeGroupSnapshot as i32,
                        })),
                    })
                    .into_iter()
                    .collect(),
            })
        })
        .await
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver("CreateVolumeGroupSnapshot");
        let name = req.name.clone();
        run("CreateVolumeGroupSnapshot", &name, move || {
            let group = driver?.groups.create_group_snapshot(
                &req.name,
                &req.source_volume_ids,
                &ordered(&req.parameters),
            )?;
            Ok(csi::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(convert::group_snapshot(&group)),
            })
        })
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver("DeleteVolumeGroupSnapshot");
        let id = req.group_snapshot_id.clone();
        run("DeleteVolumeGroupSnapshot", &id, move || {
            driver?
                .groups
                .delete_group_snapshot(&req.group_snapshot_id, &req.snapshot_ids)?;
            Ok(csi::DeleteVolumeGroupSnapshotResponse {})
        })
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.driver("GetVolumeGroupSnapshot");
        let id = req.group_snapshot_id.clone();
        run("GetVolumeGroupSnapshot", &id, move || {
            let group = driver?
                .groups
                .group_snapshot(&req.group_snapshot_id, &req.snapshot_ids)?;
            Ok(csi::GetVolumeGroupSnapshotResponse {
                group_snapshot: Some(convert::group_snapshot(&group)),
            })
        })
        .await
    }
}
