//! What a volume may be asked to be: access modes, access types, filesystems and their
//! minimum sizes, mount flags, and StorageClass parameters. Every RPC that takes a capability
//! checks it here, each with the code its own error table names.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::filesystem::Filesystem;
use crate::model::{AccessType, Capability, FormatState};
use crate::os::MountOptions;
use crate::validate;

/// StorageClass parameters Kubernetes adds on its own (`csi.storage.k8s.io/...`).
pub const K8S_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

/// The capabilities of this node's backend.
pub struct Capabilities {
    backend: Arc<dyn Backend>,
}

impl Capabilities {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Capabilities { backend }
    }

    /// Whether this driver can serve `cap`; the error says why not.
    pub fn check_capability(&self, cap: &Capability) -> Result<()> {
        if cap.access_mode.is_multi_node() {
            return Err(Error::InvalidArgument(format!(
                "access mode {:?} is not supported: volumes are local to one node",
                cap.access_mode
            )));
        }
        match &cap.access_type {
            AccessType::Block if !self.backend.supports_block() => {
                Err(Error::InvalidArgument(format!(
                    "the {} backend offers filesystem volumes only, not raw block",
                    self.backend.kind()
                )))
            }
            AccessType::Block => Ok(()),
            AccessType::Mount {
                fs_type,
                mount_flags,
                ..
            } => {
                if !self.backend.serves_directories() {
                    Filesystem::requested(fs_type)?;
                }
                MountOptions::parse(mount_flags).map(drop)
            }
        }
    }

    /// Checks a capability at the node: what the volume cannot do is FAILED_PRECONDITION
    /// ("exceeds capabilities"), a malformed field INVALID_ARGUMENT.
    pub(crate) fn check_node_capability(&self, cap: &Capability) -> Result<()> {
        if cap.access_mode.is_multi_node() || (cap.is_block() && !self.backend.supports_block()) {
            return self
                .check_capability(cap)
                .map_err(|e| Error::FailedPrecondition(e.to_string()));
        }
        self.check_capability(cap)
    }

    pub(crate) fn check_parameters(&self, parameters: &BTreeMap<String, String>) -> Result<()> {
        validate::bounded_map("parameters", parameters)?;
        match parameters.keys().find(|k| {
            !k.starts_with(K8S_PARAMETER_PREFIX)
                && *k != crate::encryption::PARAMETER
                && *k != crate::node_loss::PARAMETER
        }) {
            Some(key) => Err(Error::InvalidArgument(format!(
                "unknown parameter {}: Strata takes only {:?} and {:?} (and Kubernetes' own csi.storage.k8s.io/* keys)",
                validate::echo(key),
                crate::encryption::PARAMETER,
                crate::node_loss::PARAMETER,
            ))),
            None => crate::node_loss::OnNodeLoss::from_parameters(parameters).map(drop),
        }
    }

    /// The smallest size the requested filesystems can be made on, and which one needs it
    /// (for backends that format devices; directory backends have no such floor).
    pub(crate) fn filesystem_floor(&self, caps: &[Capability]) -> Result<Option<(String, u64)>> {
        if self.backend.serves_directories() {
            return Ok(None);
        }
        let mut floor: Option<(String, u64)> = None;
        for cap in caps {
            if let AccessType::Mount { fs_type, .. } = &cap.access_type {
                let fs = Filesystem::requested(fs_type)?;
                let min = fs.min_bytes();
                if min > floor.as_ref().map_or(0, |(_, m)| *m) {
                    floor = Some((fs.name().to_owned(), min));
                }
            }
        }
        Ok(floor)
    }

    /// A restore or clone keeps its source's filesystem: a mount capability naming another
    /// one is "Source incompatible" (INVALID_ARGUMENT), refused before any copy rather than
    /// at the first stage. A raw block capability sees the same bytes and is fine.
    pub(crate) fn check_source_filesystem(
        &self,
        caps: &[Capability],
        format: &FormatState,
    ) -> Result<()> {
        let FormatState::Formatted(source_fs) = format else {
            return Ok(());
        };
        if self.backend.serves_directories() {
            return Ok(());
        }
        for cap in caps {
            if let AccessType::Mount { fs_type, .. } = &cap.access_type
                && Filesystem::requested(fs_type)?.name() != source_fs
            {
                return Err(Error::InvalidArgument(format!(
                    "the source holds a {source_fs} filesystem; request fs_type {source_fs} (or a raw block volume) to restore or clone it"
                )));
            }
        }
        Ok(())
    }
}
