//! CSI Identity service.

use csi::identity_server::Identity;
use csi::plugin_capability::{Service, service::Type as ServiceType};
use csi_proto as csi;
use tonic::{Request, Response, Status};

use super::{Services, run};

pub struct IdentityService(pub Services);

fn service(kind: ServiceType) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(Service {
            r#type: kind as i32,
        })),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        let name = self.0.driver.config.driver_name.clone();
        let version = self.0.version.to_owned();
        let backend = self.0.driver.backend_kind().to_owned();
        run("GetPluginInfo", "", move || {
            Ok(csi::GetPluginInfoResponse {
                name,
                vendor_version: version,
                manifest: [("backend".to_owned(), backend)].into(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let groups = self.0.driver.groups.supports_group_snapshots();
        let metadata = self.0.driver.snapshot_metadata.offered();
        run("GetPluginCapabilities", "", move || {
            let mut capabilities = vec![
                service(ServiceType::ControllerService),
                service(ServiceType::VolumeAccessibilityConstraints),
                csi::PluginCapability {
                    r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
                        csi::plugin_capability::VolumeExpansion {
                            r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
                        },
                    )),
                },
            ];
            if groups {
                capabilities.push(service(ServiceType::GroupControllerService));
            }
            if metadata {
                capabilities.push(service(ServiceType::SnapshotMetadataService));
            }
            Ok(csi::GetPluginCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let driver = self.0.driver.clone();
        run("Probe", "", move || {
            driver.probe()?;
            Ok(csi::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}
