//! Changed block tracking through the real server (CSI SnapshotMetadata): a raw block volume
//! written at known offsets through its published device, snapshotted, rewritten, discarded
//! and snapshotted again; the allocated ranges and the delta are exactly what was written,
//! on a reflink pool (extent maps) and on a pool that copies (content).

mod common;
#[path = "common/helm.rs"]
mod helm;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata::client::snapshot::{MetadataPage, metadata_pages};
use tonic::Code;

const K: i64 = 1024;
const CAPACITY: i64 = 64 * MIB;

/// Writes `len` bytes of `byte` at `at` on the device, bypassing the page cache.
fn write_direct(device: &str, at: i64, len: i64, byte: u8) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .unwrap();
    // O_DIRECT wants an aligned buffer: a page-aligned slice of a larger one.
    let mut buf = vec![byte; len as usize + 4096];
    let skew = buf.as_ptr().align_offset(4096);
    let aligned = &mut buf[skew..skew + len as usize];
    f.write_all_at(aligned, at as u64).unwrap();
    f.sync_all().unwrap();
}

/// Discards a range of the device (the loop device punches a hole in the image).
fn discard(device: &str, at: i64, len: i64) {
    const BLKDISCARD: libc::c_ulong = 0x1277;
    let f = OpenOptions::new().write(true).open(device).unwrap();
    let range: [u64; 2] = [at as u64, len as u64];
    // SAFETY: BLKDISCARD reads two u64s from the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    assert_eq!(r, 0, "BLKDISCARD: {}", std::io::Error::last_os_error());
}

fn r(offset: i64, size: i64) -> (i64, i64) {
    (offset, size)
}

async fn allocated(
    env: &mut TestEnv,
    snapshot: &str,
    start: i64,
    max: i32,
) -> Result<Vec<MetadataPage>, tonic::Status> {
    metadata_pages(&mut env.csi, None, snapshot, start, max).await
}

async fn delta(
    env: &mut TestEnv,
    base: &str,
    target: &str,
    start: i64,
    max: i32,
) -> Result<Vec<MetadataPage>, tonic::Status> {
    metadata_pages(&mut env.csi, Some(base), target, start, max).await
}

/// Every (offset, size) of an answer's pages, in order.
fn tuples(pages: &[MetadataPage]) -> Vec<(i64, i64)> {
    pages
        .iter()
        .flat_map(|p| &p.block_metadata)
        .map(|b| (b.byte_offset, b.size_bytes))
        .collect()
}

fn joined(ranges: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = vec![];
    for (o, s) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += s,
            _ => out.push((o, s)),
        }
    }
    out
}

/// No overlap and strictly increasing, across every message of the stream.
fn assert_ordered(ranges: &[(i64, i64)]) {
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "{ranges:?}");
    }
    assert!(ranges.iter().all(|r| r.1 > 0));
}

async fn tracks_changed_blocks(kind: PoolKind) {
    let mut env = TestEnv::start_pool(kind).await;
    assert!(
        plugin_services(&mut env.csi)
            .await
            .contains(&(csi::plugin_capability::service::Type::SnapshotMetadataService as i32))
    );
    let cap = block_cap(Mode::SingleNodeWriter);
    let id = env.create("cbt", CAPACITY, cap.clone()).await.volume_id;
    let device = env.mount(&id, "dev", cap.clone()).await;
    write_direct(&device, 0, 64 * K, 1);
    write_direct(&device, MIB, 256 * K, 2);
    write_direct(&device, 8 * MIB, MIB, 3);
    let s1 = env.snapshot("s1", &id).await.unwrap().snapshot_id;
    write_direct(&device, MIB + 64 * K, 64 * K, 9); // an overwrite
    write_direct(&device, 20 * MIB, 128 * K, 4); // a new range
    discard(&device, 8 * MIB + 256 * K, 256 * K); // a discard
    let s2 = env.snapshot("s2", &id).await.unwrap().snapshot_id;

    let pages = allocated(&mut env, &s2, 0, 0).await.unwrap();
    assert!(pages.iter().all(|p| p.volume_capacity_bytes == CAPACITY
        && p.block_metadata_type == csi::BlockMetadataType::VariableLength as i32));
    let all = tuples(&pages);
    assert_eq!(
        all,
        vec![
            r(0, 64 * K),
            r(MIB, 256 * K),
            r(8 * MIB, 256 * K),
            r(8 * MIB + 512 * K, 512 * K),
            r(20 * MIB, 128 * K),
        ],
        "{kind:?}"
    );
    let pages = delta(&mut env, &s1, &s2, 0, 0).await.unwrap();
    let changed = tuples(&pages);
    assert_eq!(
        changed,
        vec![
            r(MIB + 64 * K, 64 * K),
            r(8 * MIB + 256 * K, 256 * K),
            r(20 * MIB, 128 * K),
        ],
        "{kind:?}"
    );

    // One tuple per message: the same union, ordered, no overlap; resumed mid-range, the
    // first tuple ends past the offset and the rest follows.
    let paged = delta(&mut env, &s1, &s2, 0, 1).await.unwrap();
    assert!(paged.iter().all(|p| p.block_metadata.len() <= 1));
    let paged = tuples(&paged);
    assert_ordered(&paged);
    assert_eq!(joined(paged), changed);
    let resumed = delta(&mut env, &s1, &s2, 8 * MIB + 300 * K, 1)
        .await
        .unwrap();
    let resumed = tuples(&resumed);
    assert_eq!(
        joined(resumed),
        vec![r(8 * MIB + 300 * K, 212 * K), r(20 * MIB, 128 * K)]
    );
    let paged = allocated(&mut env, &s2, 0, 2).await.unwrap();
    assert!(paged.iter().all(|p| p.block_metadata.len() <= 2));
    let paged = tuples(&paged);
    assert_ordered(&paged);
    assert_eq!(joined(paged), joined(all));

    // The spec's error rows are in spec.rs, over the fake host and the real server.

    env.unmount(&id, "dev").await;
    for s in [&s1, &s2] {
        env.delete_snapshot(s).await.unwrap();
    }
    env.delete(&id).await.unwrap();
    env.stop();
    env.assert_clean();
}

#[tokio::test]
async fn changed_blocks_from_shared_extents_on_a_reflink_pool() {
    tracks_changed_blocks(PoolKind::ImageOnXfs).await;
}

#[tokio::test]
async fn changed_blocks_by_content_on_a_pool_that_copies() {
    tracks_changed_blocks(PoolKind::ImageOnHost).await;
}

#[tokio::test]
async fn backends_without_a_block_layout_do_not_offer_the_service() {
    let mut env = TestEnv::start_pool(PoolKind::DirOnExt4).await;
    assert!(
        !plugin_services(&mut env.csi)
            .await
            .contains(&(csi::plugin_capability::service::Type::SnapshotMetadataService as i32))
    );
    assert_eq!(
        code(allocated(&mut env, "snap-0123456789abcdef", 0, 0).await),
        Code::FailedPrecondition
    );
    env.stop();
}

/// Checks with openssl that `cert` is signed by `ca` for the Service's name, as backup tools
/// dial it, and that `key` is its key.
fn check_sidecar_certificate(ca: &[u8], cert: &[u8], key: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let (ca_p, cert_p, key_p) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca_p, ca).unwrap();
    std::fs::write(&cert_p, cert).unwrap();
    std::fs::write(&key_p, key).unwrap();
    let verified = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-verify_hostname"])
        .arg("strata-snapshot-metadata.strata-system")
        .arg("-CAfile")
        .arg(&ca_p)
        .arg(&cert_p)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let public = |args: &[&str], file: &std::path::Path| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    };
    assert_eq!(
        public(&["x509", "-noout", "-pubkey", "-in"], &cert_p),
        public(&["pkey", "-pubout", "-in"], &key_p),
        "the key is the certificate's"
    );
}

/// The sidecar's certificate and the SnapshotMetadataService, from `strata
/// snapshot-metadata-certs` and from the Helm chart at install: the certificate is for the
/// Service's name and signed by the CA the SnapshotMetadataService gives backup tools.
#[test]
fn the_sidecars_certificate_is_for_its_service_and_signed_by_the_advertised_ca() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("snapshot-metadata-certs")
        .output()
        .unwrap();
    assert!(out.status.success());
    let cli = String::from_utf8(out.stdout).unwrap();
    let chart = helm::render(&[
        "--set",
        "snapshotMetadata.enabled=true",
        "--show-only",
        "templates/snapshot-metadata-tls.yaml",
    ]);
    for text in [&cli, &chart] {
        assert!(text.contains("kind: SnapshotMetadataService"), "{text}");
        assert!(text.contains("address: strata-snapshot-metadata.strata-system:6443"));
        assert!(text.contains("audience: strata.csi.dev"));
        check_sidecar_certificate(
            &helm::data(text, "caCert"),
            &helm::data(text, "tls.crt"),
            &helm::data(text, "tls.key"),
        );
    }
}
