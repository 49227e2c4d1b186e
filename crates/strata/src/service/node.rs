//! CSI Node service.

use csi::node_server::Node;
use csi::node_service_capability::{Rpc, rpc::Type as RpcType};
use csi_proto as csi;
use strata_core::model::CapacityRange;
use strata_core::node::{PublishVolume, StageVolume, Usage};
use strata_core::validate::{absolute_path, required_str};
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
            required_str("volume_id", &req.volume_id)?;
            let stage = StageVolume {
                staging_path: absolute_path("staging_target_path", &req.staging_target_path)?,
                capability: required_capability(req.volume_capability.as_ref())?,
                volume_id: req.volume_id,
            };
            driver.stage_volume(stage)?;
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
            required_str("volume_id", &req.volume_id)?;
            let path = absolute_path("staging_target_path", &req.staging_target_path)?;
            driver.unstage_volume(&req.volume_id, &path)?;
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
            required_str("volume_id", &req.volume_id)?;
            let publish = PublishVolume {
                target_path: absolute_path("target_path", &req.target_path)?,
                capability: required_capability(req.volume_capability.as_ref())?,
                staging_path: match req.staging_target_path.as_str() {
                    "" => None,
                    p => Some(absolute_path("staging_target_path", p)?),
                },
                read_only: req.readonly,
                volume_id: req.volume_id,
            };
            driver.publish_volume(publish)?;
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
            required_str("volume_id", &req.volume_id)?;
            let path = absolute_path("target_path", &req.target_path)?;
            driver.unpublish_volume(&req.volume_id, &path)?;
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
            required_str("volume_id", &req.volume_id)?;
            let stats = driver.volume_stats(&req.volume_id, &req.volume_path)?;
            use csi::volume_usage::Unit;
            let usage = |unit: Unit, total: u64, available: u64, used: u64| csi::VolumeUsage {
                available: available as i64,
                total: total as i64,
                used: used as i64,
                unit: unit as i32,
            };
            let usage = match stats.usage {
                Some(Usage::Filesystem(u)) => vec![
                    usage(Unit::Bytes, u.total_bytes, u.available_bytes, u.used_bytes),
                    usage(Unit::Inodes, u.total_inodes, u.free_inodes, u.used_inodes),
                ],
                Some(Usage::Block { total_bytes }) => vec![usage(Unit::Bytes, total_bytes, 0, 0)],
                None => vec![],
            };
            Ok(csi::NodeGetVolumeStatsResponse {
                usage,
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
            required_str("volume_id", &req.volume_id)?;
            if let Some(cap) = &req.volume_capability {
                driver.check_capability(&convert::capability(cap)?)?;
            }
            let range = req
                .capacity_range
                .map(|r| CapacityRange::from_signed(r.required_bytes, r.limit_bytes))
                .transpose()?
                .unwrap_or_default();
            let capacity = driver.node_expand_volume(&req.volume_id, &req.volume_path, range)?;
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
