//! CSI Node service.

use csi::node_server::Node;
use csi::node_service_capability::{Rpc, rpc::Type as RpcType};
use csi_proto as csi;
use strata_core::encryption::Secrets;
use strata_core::io_limits::Consumer;
use strata_core::model::CapacityRange;
use strata_core::node::{EphemeralVolume, PublishVolume, StageVolume, is_ephemeral};
use strata_core::validate::ordered;
use tonic::{Request, Response, Status};

use super::convert::{self, required_capability};
use super::{Services, run};

pub struct NodeService(pub Services);

pub const CAPABILITIES: &[RpcType] = &[
    RpcType::StageUnstageVolume,
    RpcType::GetVolumeStats,
    RpcType::VolumeCondition,
    RpcType::SingleNodeMultiWriter,
    RpcType::ExpandVolume,
    RpcType::VolumeMountGroup,
];

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("NodeStageVolume", &id, move || {
            let stage = StageVolume {
                staging_path: req.staging_target_path,
                capability: required_capability(req.volume_capability.as_ref())?,
                volume_id: req.volume_id,
                secrets: Secrets::new(req.secrets),
            };
            driver.node.stage_volume(stage)?;
            Ok(csi::NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("NodeUnstageVolume", &id, move || {
            driver
                .node
                .unstage_volume(&req.volume_id, &req.staging_target_path)?;
            Ok(csi::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("NodePublishVolume", &id, move || {
            let context = ordered(&req.volume_context);
            if is_ephemeral(&context) {
                driver.node.publish_ephemeral(EphemeralVolume {
                    handle: req.volume_id,
                    target_path: req.target_path,
                    attributes: context,
                    capability: required_capability(req.volume_capability.as_ref())?,
                    read_only: req.readonly,
                })?;
                return Ok(csi::NodePublishVolumeResponse {});
            }
            let publish = PublishVolume {
                consumer: Consumer::from_context(&context)?,
                target_path: req.target_path,
                capability: required_capability(req.volume_capability.as_ref())?,
                staging_path: req.staging_target_path,
                read_only: req.readonly,
                volume_id: req.volume_id,
            };
            driver.node.publish_volume(publish)?;
            Ok(csi::NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("NodeUnpublishVolume", &id, move || {
            driver
                .node
                .unpublish_volume(&req.volume_id, &req.target_path)?;
            Ok(csi::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("NodeGetVolumeStats", &id, move || {
            let stats = driver.node.volume_stats(&req.volume_id, &req.volume_path)?;
            Ok(csi::NodeGetVolumeStatsResponse {
                usage: convert::usage(stats.usage),
                volume_condition: Some(convert::volume_condition(stats.abnormal)),
            })
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.driver.clone();
        let id = req.volume_id.clone();
        run("NodeExpandVolume", &id, move || {
            if let Some(cap) = &req.volume_capability {
                driver
                    .capabilities
                    .check_capability(&convert::capability(cap)?)?;
            }
            let range = req
                .capacity_range
                .map(|r| CapacityRange::from_signed(r.required_bytes, r.limit_bytes))
                .transpose()?
                .unwrap_or_default();
            let capacity =
                driver
                    .node
                    .node_expand_volume(&req.volume_id, &req.volume_path, range)?;
            Ok(csi::NodeExpandVolumeResponse {
                capacity_bytes: capacity as i64,
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        run("NodeGetCapabilities", "", || {
            Ok(csi::NodeGetCapabilitiesResponse {
                capabilities: CAPABILITIES
                    .iter()
                    .map(|t| csi::NodeServiceCapability {
                        r#type: Some(csi::node_service_capability::Type::Rpc(Rpc {
                            r#type: *t as i32,
                        })),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let driver = self.0.driver.clone();
        run("NodeGetInfo", "", move || {
            Ok(csi::NodeGetInfoResponse {
                node_id: driver.config.node_id.clone(),
                max_volumes_per_node: driver.config.max_volumes_per_node,
                accessible_topology: Some(convert::csi_topology(driver.topology())),
            })
        })
        .await
    }
}
