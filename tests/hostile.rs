//! Hostile input: requests that are not protobuf, and randomly generated requests full of
//! escape attempts, thrown at every RPC. Every answer must be a spec status with a message
//! (never UNKNOWN or INTERNAL), and nothing outside the allowed directories may change.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut};
use common::*;
use csi_proto as csi;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends and receives raw bytes, to put arbitrary payloads on the wire.
#[derive(Default)]
struct RawCodec;
struct RawCoder;

impl Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;
    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }
    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

async fn raw_call(env: &TestEnv, path: &'static str, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(env.csi.channel.clone());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    match grpc.unary(tonic::Request::new(body), path, RawCodec).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_valid_protobuf_are_invalid_argument() {
    let env = TestEnv::start().await;
    // Field 1 (name) holding bytes that are not UTF-8.
    let not_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    assert_eq!(
        raw_call(&env, "/csi.v1.Controller/CreateVolume", not_utf8.clone()).await,
        Code::InvalidArgument
    );
    assert_eq!(
        raw_call(&env, "/csi.v1.Node/NodeStageVolume", not_utf8).await,
        Code::InvalidArgument
    );
    // A length prefix running past the end.
    let truncated = vec![0x0a, 0x7f, b'a'];
    assert_eq!(
        raw_call(&env, "/csi.v1.Controller/DeleteVolume", truncated).await,
        Code::InvalidArgument
    );
    assert!(env.pool_entries().is_empty());
}

/// Strings an attacker would try for ids, names and paths.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("..".to_string()),
        Just("../../../etc/passwd".to_string()),
        Just("/".to_string()),
        Just("/etc/shadow".to_string()),
        Just("/proc/self/root/etc".to_string()),
        Just("vol-0123456789abcdef01234567".to_string()),
        Just("vol-../../../../../../etc/x".to_string()),
        Just("snap-0123456789abcdef01234567".to_string()),
        Just("a\0b".to_string()),
        Just("relative/path".to_string()),
        "[a-z./-]{0,40}",
        "/tmp/[a-z./]{0,30}",
        "/var/tmp/strata-canary/[a-z.]{0,12}",
        "\\PC{0,20}",
        (129usize..400).prop_map(|n| "x".repeat(n)),
        (4000usize..5000).prop_map(|n| format!("/tmp/{}", "y/".repeat(n / 2))),
    ]
}

fn hostile_capability() -> impl Strategy<Value = Option<csi::VolumeCapability>> {
    use csi::volume_capability::{AccessType, BlockVolume, MountVolume, access_mode::Mode};
    let access = prop_oneof![
        Just(None),
        Just(Some(AccessType::Block(BlockVolume {}))),
        (
            hostile_string(),
            proptest::collection::vec(
                prop_oneof![
                    Just("suid".to_string()),
                    Just("dev".to_string()),
                    Just("bind".to_string()),
                    Just("noatime".to_string()),
                    hostile_string()
                ],
                0..3,
            )
        )
            .prop_map(
                |(fs_type, mount_flags)| Some(AccessType::Mount(MountVolume {
                    fs_type,
                    mount_flags,
                    volume_mount_group: String::new(),
                }))
            ),
    ];
    let mode = prop_oneof![Just(None), (-2i32..12).prop_map(Some)];
    prop_oneof![
        Just(None),
        (access, mode).prop_map(|(access_type, mode)| Some(csi::VolumeCapability {
            access_type,
            access_mode: mode.map(|m| csi::volume_capability::AccessMode { mode: m }),
        })),
    ]
    .prop_map(|c| {
        c.map(|mut c| {
            if c.access_mode.as_ref().is_some_and(|m| m.mode == 99) {
                c.access_mode = Some(csi::volume_capability::AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                });
            }
            c
        })
    })
}

#[derive(Debug, Clone)]
struct Case {
    rpc: u8,
    a: String,
    b: String,
    c: String,
    n: i64,
    m: i64,
    cap: Option<csi::VolumeCapability>,
    use_real_volume: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u8..17,
        hostile_string(),
        hostile_string(),
        hostile_string(),
        any::<i64>(),
        any::<i64>(),
        hostile_capability(),
        any::<bool>(),
    )
        .prop_map(|(rpc, a, b, c, n, m, cap, use_real_volume)| Case {
            rpc,
            a,
            b,
            c,
            n,
            m,
            cap,
            use_real_volume,
        })
}

async fn run_case(env: &mut TestEnv, real: &str, case: Case) -> Code {
    let id = if case.use_real_volume {
        real.to_string()
    } else {
        case.a.clone()
    };
    let range = Some(csi::CapacityRange {
        required_bytes: case.n,
        limit_bytes: case.m,
    });
    let c = &mut env.csi;
    let r: Result<(), tonic::Status> = match case.rpc {
        0 => c
            .controller
            .create_volume(csi::CreateVolumeRequest {
                name: case.a,
                capacity_range: range,
                volume_capabilities: case.cap.into_iter().collect(),
                parameters: [(case.b, case.c)].into(),
                ..Default::default()
            })
            .await
            .map(drop),
        1 => c
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                secrets: Default::default(),
            })
            .await
            .map(drop),
        2 => c
            .controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: case.n as i32,
                starting_token: case.b,
            })
            .await
            .map(drop),
        3 => c
            .controller
            .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id })
            .await
            .map(drop),
        4 => c
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id,
                capacity_range: range,
                volume_capability: case.cap,
                ..Default::default()
            })
            .await
            .map(drop),
        5 => c
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id,
                name: case.b,
                ..Default::default()
            })
            .await
            .map(drop),
        6 => c
            .controller
            .list_snapshots(csi::ListSnapshotsRequest {
                max_entries: case.n as i32,
                starting_token: case.b,
                snapshot_id: case.c,
                source_volume_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        7 => c
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id,
                staging_target_path: case.b,
                volume_capability: case.cap,
                ..Default::default()
            })
            .await
            .map(drop),
        8 => c
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id,
                staging_target_path: case.b,
            })
            .await
            .map(drop),
        9 => c
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id,
                staging_target_path: case.b,
                target_path: case.c,
                volume_capability: case.cap,
                readonly: case.n % 2 == 0,
                ..Default::default()
            })
            .await
            .map(drop),
        10 => c
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id,
                target_path: case.b,
            })
            .await
            .map(drop),
        11 => c
            .node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id,
                volume_path: case.b,
                staging_target_path: case.c,
            })
            .await
            .map(drop),
        12 => c
            .node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id,
                volume_path: case.b,
                capacity_range: range,
                ..Default::default()
            })
            .await
            .map(drop),
        13 => c
            .groups
            .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: case.b,
                source_volume_ids: vec![id, case.c],
                parameters: [(case.a, String::new())].into(),
                ..Default::default()
            })
            .await
            .map(drop),
        14 => c
            .groups
            .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: case.b,
                snapshot_ids: vec![id, case.c],
                secrets: Default::default(),
            })
            .await
            .map(drop),
        15 => c
            .groups
            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: case.b,
                snapshot_ids: vec![id, case.c],
                secrets: Default::default(),
            })
            .await
            .map(drop),
        _ => c
            .controller
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id,
                volume_capabilities: case.cap.into_iter().collect(),
                ..Default::default()
            })
            .await
            .map(drop),
    };
    match r {
        Ok(()) => Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty(), "{s:?}");
            s.code()
        }
    }
}

fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.path());
            out.extend(tree(&e.path()));
        }
    }
    out.sort();
    out
}

#[test]
fn random_hostile_requests_get_spec_answers_and_touch_nothing_outside() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let canary = PathBuf::from("/var/tmp/strata-canary");
    fs::create_dir_all(&canary).unwrap();
    fs::write(canary.join("keep"), b"keep").unwrap();
    let before = tree(&canary);
    let env = std::cell::RefCell::new(rt.block_on(TestEnv::start()));
    let real = rt
        .block_on(env.borrow_mut().create("real", 16 * MIB, ext4()))
        .volume_id;
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let codes = std::cell::RefCell::new(std::collections::BTreeMap::new());
    let result = runner.run(&case(), |case| {
        let code = rt.block_on(run_case(&mut env.borrow_mut(), &real, case.clone()));
        prop_assert!(
            !matches!(code, Code::Unknown | Code::Internal),
            "{code:?} for {case:?}"
        );
        *codes.borrow_mut().entry(format!("{code:?}")).or_insert(0) += 1;
        Ok(())
    });
    result.unwrap();
    eprintln!(
        "answers over {} cases: {:?}",
        runner.config().cases,
        codes.borrow()
    );
    assert_eq!(
        tree(&canary),
        before,
        "nothing outside the allowed directories changed"
    );
    assert!(
        !kernel_state_under(&canary).0.iter().any(|_| true),
        "no mount outside"
    );
    assert!(!Path::new("/etc/strata-test").exists());
    let _ = fs::remove_dir_all(&canary);
    drop(env.into_inner());
}
